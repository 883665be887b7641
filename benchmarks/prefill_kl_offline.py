"""Sparse prefill settings by their exact KL to full attention, teacher-forced, offline.

``kl_fidelity.py`` measures a served answer against stock by SGLang's sampled
estimate, above a bf16 floor of about 0.002, with decode compression on top.
This tool isolates the prefill: the embedded model (transformers, fp32)
samples ``--tokens`` tokens at temperature 1 with full attention on
``kl_fidelity``'s conversations (question at the start, middle or end of the
second turn); then, for each setting, the conversation is replayed as the
server runs it (the first turn, then the second turn over the cached first,
each through ``sparse_prefill_attention`` as the setting says) and the answer
is decoded exactly over that cache.  Per answer token the exact
``KL(setting || full)`` over the vocabulary; no sampling noise, no floor.
``pairs`` is the share of the second turn's causal (query, key) pairs computed
(``meta_info``'s ``prefill_density``: a layer run exact counts all of them).

A setting is ``name=JSON`` with any of: ``alpha`` (the server's default), ``gate`` (the plan
density from which a layer runs exact instead, ``SPARSE_BELOW``; ``null``:
never), ``exact_layers`` (layers always run exact), ``layer_alpha``
(``{"layer": alpha}`` overrides), ``first_turn`` (``true``: the first turn's
prefill is sparse too, as a server with ``min_prefill_len 0`` runs it), ``dense_layers``
(``true``: the server's ``DenseLayers`` remembers, over both turns, which layers planned too dense),
``sharpen`` (``true``: a sharp layer is planned again, ``sparse_prefill.SHARP_BELOW``),
``sharp_below`` and ``sharp_miss`` (that rule's two constants; default the module's),
``q_window`` (the estimate's sampled rows, ``sparse_prefill_attention``'s; default the server's).

    python benchmarks/prefill_kl_offline.py [--settings name=JSON ...] [--docs 3] [--tokens 64]
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from kl_replay import arguments, conversations, position_means, replayed_model, sample_answer  # noqa: E402

from sglang_loopserve.attention import sparse_prefill  # noqa: E402
from sglang_loopserve.attention.exact import exact_prefill_attention  # noqa: E402
from sglang_loopserve.config import LoopServeConfig  # noqa: E402
from sglang_loopserve.srt.backend import DenseLayers  # noqa: E402

SETTINGS = {
    "defaults": {},
    "no density gate": {"gate": None},
    "alpha 0.9, no gate": {"alpha": 0.9, "gate": None},
}
DEFAULTS = {"alpha": LoopServeConfig().alpha, "gate": sparse_prefill.SPARSE_BELOW["cpu"], "exact_layers": [], "layer_alpha": {},
            "first_turn": True, "dense_layers": True, "sharpen": True,
            "sharp_below": sparse_prefill.SHARP_BELOW, "sharp_miss": sparse_prefill.SHARP_MISS,
            "q_window": LoopServeConfig().q_window}


class Replay:
    """The attention function of the replay: ``setting`` for the turns' prefills, exact otherwise."""

    def __init__(self):
        self.setting, self.sparse, self.density = None, False, {}
        self.dense_layers = DenseLayers()

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        # Every forward is causal aligned bottom-right (the new rows are the last keys'); a custom
        # attention function gets no mask from transformers, and SDPA's own ``is_causal`` is aligned
        # top-left, wrong over a cache.
        s = self.setting
        layer = module.layer_idx
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [n, H, d], [L, Hk, d]
        q = q * (module.scaling * q.shape[-1] ** 0.5)  # our kernels use 1/sqrt(d)
        if s is None or not self.sparse:
            return exact_prefill_attention(q, k, v)[None], None
        alpha = float(s["layer_alpha"].get(str(layer), s["alpha"]))
        if (layer in s["exact_layers"] or alpha >= 1.0
                or (s["dense_layers"] and s["gate"] is not None
                    and self.dense_layers.skip(layer, k.shape[0], alpha))):
            out, density = exact_prefill_attention(q, k, v), 1.0
        else:
            kernel = "auto" if s["gate"] is not None else sparse_prefill.default_kernel(q.device)
            saved = (sparse_prefill.SPARSE_BELOW["cpu"], sparse_prefill.SHARP_BELOW, sparse_prefill.SHARP_MISS)
            sparse_prefill.SPARSE_BELOW["cpu"] = s["gate"] if s["gate"] is not None else saved[0]
            sparse_prefill.SHARP_BELOW, sparse_prefill.SHARP_MISS = s["sharp_below"], s["sharp_miss"]
            try:
                out, st = sparse_prefill.sparse_prefill_attention(q, k, v, alpha=alpha, kernel=kernel,
                                                                  return_stats=True, sharpen=s["sharpen"],
                                                                  q_window=s["q_window"])
            finally:
                sparse_prefill.SPARSE_BELOW["cpu"], sparse_prefill.SHARP_BELOW, sparse_prefill.SHARP_MISS = saved
            density = st.density
            self.dense_layers.observe(layer, st.planned_density, k.shape[0], alpha)
        self.density[layer] = density
        return out[None], None


def parse_setting(text):
    name, sep, body = text.partition("=")
    if not sep:
        if text not in SETTINGS:
            raise SystemExit(f"--settings: unknown {text!r}; known: {', '.join(SETTINGS)} (or name=JSON)")
        body = json.dumps(SETTINGS[text])
    setting = json.loads(body)
    unknown = set(setting) - set(DEFAULTS)
    if not isinstance(setting, dict) or unknown:
        raise SystemExit(f"--settings {name}: a JSON object of {', '.join(DEFAULTS)}; unknown {sorted(unknown)}")
    return name, {**DEFAULTS, **setting}


def main(argv=None):
    p = arguments(__doc__, SETTINGS)
    p.add_argument("--per-layer", action="store_true", help="print each setting's density per layer")
    a = p.parse_args(argv)
    settings = dict(parse_setting(s) for s in a.settings)
    replay = Replay()
    model, tok = replayed_model(replay, "loopserve_prefill_replay", a.seed, a.model)
    rows = {name: [] for name in settings}
    layers = {name: [] for name in settings}
    for doc, position, first_ids, prompt_ids in conversations(tok, a.docs, a.prompt_tokens):
        prompt = torch.tensor(prompt_ids)[None]
        replay.setting = None
        answer = sample_answer(model, prompt, a.tokens, a.seed, doc, position)
        cut = len(first_ids)

        def logprobs(setting):
            replay.setting, replay.density, replay.dense_layers = setting, {}, DenseLayers()
            replay.sparse = setting is not None and setting["first_turn"]
            first = model(prompt[:, :cut], use_cache=True)
            replay.sparse, replay.density = setting is not None, {}
            second = model(prompt[:, cut:], past_key_values=first.past_key_values, use_cache=True)
            replay.sparse = False
            out = model(answer, past_key_values=second.past_key_values, use_cache=True)
            lp = torch.cat([second.logits[0, -1:], out.logits[0, :-1]]).float().log_softmax(-1)
            return lp, dict(replay.density)

        full, _ = logprobs(None)
        for name, setting in settings.items():
            lp, density = logprobs(copy.deepcopy(setting))
            kl = (lp.exp() * (lp - full)).sum(-1)
            pairs = sum(density.values()) / len(density)
            rows[name].append((position, kl.mean().item(), pairs))
            layers[name].append(density)
            print(f"doc {doc} {position:6} {name:32} KL {kl.mean():.5f}  pairs {pairs:.3f}", flush=True)
    print("\n| setting | KL start | KL middle | KL end | mean | prefill pairs computed |")
    print("|---|---|---|---|---|---|")
    for name, got in rows.items():
        means = position_means(got)
        print(f"| {name} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {sum(means) / 3:.4f} | "
              f"{sum(r[2] for r in got) / len(got):.3f} |")
    if a.per_layer:
        for name, got in layers.items():
            mean = {layer: sum(d[layer] for d in got) / len(got) for layer in sorted(got[0])}
            print(f"{name}: " + " ".join(f"{layer}:{v:.2f}" for layer, v in mean.items()))


if __name__ == "__main__":
    main()
