"""Decode selection rules by their exact KL to full attention, teacher-forced, offline.

``kl_fidelity.py`` measures a served answer against stock by SGLang's sampled
estimate, above a bf16 floor.  This tool isolates decode: the embedded model
(transformers, fp32, exact prefill) samples ``--tokens`` tokens at temperature
1 with full attention on ``kl_fidelity``'s conversations (question at the
start, middle or end); then, for each setting, the answer is replayed as one
forward over the cached prompt in which every layer's answer rows attend only
to what the setting's selection holds at that step (the selection follows the
layer's own queries, as in a server).  Per token the exact
``KL(compressed || full)`` over the vocabulary; no sampling noise, no floor.
The first ``interval`` steps read everything under the default ``auto`` seed
of a long turn, so the table also gives the mean over the later steps.

A setting is ``name=JSON``: ``{"compressor": {...}}`` passes its fields to
``DecodeCompressor`` (``budget``, ``pool_window``, ``max_interval``,
``first_interval``, ...; ``pyramid``: ``layer_query_blocks``' slope, default the server's;
``budget_pyramid``: ``true`` or ``"inverse"``, the budget on that slope too, or upside down;
``bound_weight``: ``summaries.BOUND_WEIGHT``, how the key blocks are ranked);
``{"scorer": {...}}`` runs ``ExactRule``, a plain
re-selection that scores every key with every window query, with
exploratory options (``maxpool``, ``value_norm``, ``ema``, ``group_max``,
``cover``, ``pool``, ``oracle``: each step's own exact top ``budget``, the ceiling of any
selection of that size); ``"layers": [lo, hi]`` compresses only those layers.

    python benchmarks/decode_kl_offline.py [--settings name=JSON ...] [--docs 3] [--tokens 64]
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from kl_replay import arguments, conversations, position_means, replayed_model, sample_answer  # noqa: E402

from sglang_loopserve.cache_policy import summaries  # noqa: E402
from sglang_loopserve.cache_policy.decode import (BUDGET, PYRAMID, QUERY_BLOCKS, DecodeCompressor,  # noqa: E402
                                                   decode_attention, layer_query_blocks)
from sglang_loopserve.cache_policy.scoring import attention_mass, keep_top  # noqa: E402

DEFAULT_BOUND_WEIGHT = summaries.BOUND_WEIGHT
SETTINGS = {
    "defaults": {"compressor": {}},
    "no query blocks, first re-selection at 16": {"compressor": {"query_blocks": 0, "first_interval": 16}},
    "no query blocks": {"compressor": {"query_blocks": 0}},
    "query blocks, first re-selection at 16": {"compressor": {"first_interval": 16}},
    "each step's own top 1024 (oracle)": {"scorer": {"oracle": True}},
    "pooling all": {"compressor": {"pool_window": "all"}},
    "pooling none": {"compressor": {"pool_window": "none"}},
    "budget 2048": {"compressor": {"budget": 2048}},
}


class ExactRule:
    """Re-selection every ``interval`` tokens from the last ``window`` queries over every key,
    with options to try: ``pool`` (score with their mean), ``maxpool`` (max-pool the scores over
    this many neighbours), ``value_norm`` (scores times the value's norm), ``ema`` (blend with the
    previous scores), ``group_max`` (a group's query heads combined by max, not sum), ``cover``
    (per KV head the fewest positions covering this share of the window mass: ragged), ``oracle``
    (once a selection exists, each step reads the top ``budget`` of its own exact attention)."""

    def __init__(self, budget=1024, interval=16, window=16, sink=4, recent=32, pool=False, maxpool=0,
                 value_norm=False, ema=0.0, group_max=False, cover=0.0, oracle=False):
        self.budget, self.interval, self.window, self.sink, self.recent = budget, interval, window, sink, recent
        self.pool, self.maxpool, self.value_norm, self.ema = pool, maxpool, value_norm, ema
        self.group_max, self.cover, self.oracle = group_max, cover, oracle
        self.selection, self.selected_at, self.queries, self.since, self.previous = None, 0, [], 0, None

    def seed(self, length):
        self.selection, self.selected_at = None, length

    def read(self, length, q, k):
        """``[Hk, n]`` positions, or a list of per-head ones (``cover``), or None (everything)."""
        if self.selection is None:
            return None
        if self.oracle:
            return keep_top(attention_mass(q[None], k[:length]), self.budget, self.sink, self.recent)
        fresh = torch.arange(self.selected_at, length)
        if isinstance(self.selection, list):
            return [torch.cat([x, fresh]) for x in self.selection]
        return torch.cat([self.selection, fresh.expand(self.selection.shape[0], -1)], 1)

    def scores(self, k, v):
        window = torch.stack(self.queries).float()
        if self.pool:
            window = window.mean(0, keepdim=True)
        length, n_kv = k.shape[0], k.shape[1]
        if self.group_max:
            w, n_heads, d = window.shape
            group = n_heads // n_kv
            logits = torch.einsum("whd,lhd->hwl", window, k.float().repeat_interleave(group, 1)) * d**-0.5
            qpos = length - w + torch.arange(w)
            logits.masked_fill_(torch.arange(length)[None, None, :] > qpos[None, :, None], float("-inf"))
            s = torch.softmax(logits, -1).sum(1).view(n_kv, group, length).amax(1)
        else:
            s = attention_mass(window, k)
        s = s / s.sum(-1, keepdim=True)
        if self.value_norm:
            s = s * v.float().norm(dim=-1).T
        if self.ema:
            if self.previous is not None:
                s = (1 - self.ema) * s + self.ema * F.pad(self.previous, (0, length - self.previous.shape[1]))
            self.previous = s
        if self.maxpool:
            s = F.max_pool1d(s[:, None], self.maxpool, 1, self.maxpool // 2)[:, 0]
        return s

    def observe(self, q, k, v):
        self.queries = (self.queries + [q])[-self.window:]
        self.since += 1
        if self.since < self.interval:
            return
        s, length = self.scores(k, v), k.shape[0]
        if self.cover:
            pos = torch.arange(length)
            forced = (pos < self.sink) | (pos >= length - self.recent)
            share = s / s.sum(-1, keepdim=True)
            order = share.masked_fill(forced, 0).sort(-1, descending=True)
            need = (order.values.cumsum(-1) < self.cover - (share * forced).sum(-1, keepdim=True)).sum(-1) + 1
            self.selection = [torch.cat([order.indices[h, :int(n)], pos[forced]]).unique() for h, n in enumerate(need)]
        else:
            self.selection = keep_top(s, self.budget, self.sink, self.recent)
        self.selected_at, self.since = length, 0


class CompressorRule:
    """``DecodeCompressor`` as the server runs it (seeded with everything: a long turn's ``auto``)."""

    def __init__(self, **fields):
        self.comp = DecodeCompressor(**fields)

    def seed(self, length):
        self.comp.seed(None, length)

    def read(self, length, q, k):
        rows = self.comp.attended(length, q, k, torch.arange(length))
        return None if rows is None else rows[0].view(len(rows[1]), -1)

    def observe(self, q, k, v):
        self.comp.observe(q, k)


class Replay:
    """The attention function of the replay: exact for the prompt, selected for the answer."""

    def __init__(self):
        self.setting, self.prompt_len, self.reads, self.n_layers = None, -1, [], 1

    def rule(self, layer):
        s = self.setting
        if s is None or ("layers" in s and not s["layers"][0] <= layer <= s["layers"][1]):
            return None
        if "scorer" in s:
            return ExactRule(**s["scorer"])
        fields = dict(s["compressor"])  # the layer's query blocks as the server sets them
        summaries.BOUND_WEIGHT = fields.pop("bound_weight", DEFAULT_BOUND_WEIGHT)  # read when blocks rank
        slope = fields.pop("pyramid", PYRAMID)
        fields["query_blocks"] = layer_query_blocks(fields.get("query_blocks", QUERY_BLOCKS), layer,
                                                    self.n_layers, slope)
        budget_pyramid = fields.pop("budget_pyramid", False)  # the re-selection's budget on the slope
        if budget_pyramid:  # "inverse": the upper layers keep more
            depth = self.n_layers - 1 - layer if budget_pyramid == "inverse" else layer
            fields["budget"] = layer_query_blocks(fields.get("budget", BUDGET), depth, self.n_layers, slope)
        return CompressorRule(**fields)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        n = query.shape[2]
        if key.shape[2] != self.prompt_len + n:  # the prompt's own forward, or sampling: exact
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [n, H, d], [P + n, Hk, d]
        n_heads, d = q.shape[1:]
        n_kv = k.shape[1]
        group = n_heads // n_kv
        rule = self.rule(module.layer_idx)
        if rule is not None:
            rule.seed(self.prompt_len)
        out = torch.empty(1, n, n_heads, d)
        read = 0.0
        for t in range(n):
            length = self.prompt_len + t + 1
            idx = rule.read(length, q[t], k) if rule is not None else None
            if isinstance(idx, list):  # ragged: each KV head with its query heads
                for h, ih in enumerate(idx):
                    heads = slice(h * group, (h + 1) * group)
                    out[0, t, heads] = decode_attention(q[t, heads], k[:length, h:h + 1], v[:length, h:h + 1],
                                                        ih[None])
                read += sum(len(x) for x in idx) / n_kv / length
            else:
                out[0, t] = decode_attention(q[t], k[:length], v[:length], idx)
                read += 1.0 if idx is None else idx.shape[1] / length
            if rule is not None:
                rule.observe(q[t], k[:length], v[:length])
        self.reads.append(read / n)
        return out, None


def parse_setting(text):
    name, sep, body = text.partition("=")
    if not sep:
        if text not in SETTINGS:
            raise SystemExit(f"--settings: unknown {text!r}; known: {', '.join(SETTINGS)} (or name=JSON)")
        return text, SETTINGS[text]
    setting = json.loads(body)
    if not isinstance(setting, dict) or ("compressor" in setting) == ("scorer" in setting):
        raise SystemExit(f"--settings {name}: JSON with exactly one of 'compressor' and 'scorer'")
    return name, setting


def main(argv=None):
    a = arguments(__doc__, SETTINGS).parse_args(argv)
    settings = dict(parse_setting(s) for s in a.settings)
    replay = Replay()
    model, tok = replayed_model(replay, "loopserve_replay", a.seed, a.model)
    replay.n_layers = model.config.num_hidden_layers
    first = 1 + DecodeCompressor().interval  # the prefill's token, then the steps before a re-selection
    rows = {name: [] for name in settings}
    for doc, position, _, prompt_ids in conversations(tok, a.docs, a.prompt_tokens):
        prompt = torch.tensor(prompt_ids)[None]
        replay.setting, replay.prompt_len = None, -1
        answer = sample_answer(model, prompt, a.tokens, a.seed, doc, position)
        replay.prompt_len = prompt.shape[1]
        cached = model(prompt, use_cache=True)
        last = cached.logits[0, -1:].float()

        def logprobs(setting):
            replay.setting, replay.reads = setting, []
            out = model(answer, past_key_values=copy.deepcopy(cached.past_key_values), use_cache=True)
            return torch.cat([last, out.logits[0, :-1].float()]).log_softmax(-1)

        full = logprobs(None)
        for name, setting in settings.items():
            lp = logprobs(setting)
            kl = (lp.exp() * (lp - full)).sum(-1)
            read = sum(replay.reads) / len(replay.reads)
            rows[name].append((position, kl.mean().item(), kl[first:].mean().item(), read))
            print(f"doc {doc} {position:6} {name:32} KL {kl.mean():.5f} (after step {first - 1}: "
                  f"{kl[first:].mean():.5f})  read {read:.3f}", flush=True)
    print(f"\n| setting | KL start | KL middle | KL end | mean | after step {first - 1} | decode read / cached |")
    print("|---|---|---|---|---|---|---|")
    for name, got in rows.items():
        means = position_means(got)
        print(f"| {name} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {sum(means) / 3:.4f} | "
              f"{sum(r[2] for r in got) / len(got):.4f} | {sum(r[3] for r in got) / len(got):.2f} |")


if __name__ == "__main__":
    main()
