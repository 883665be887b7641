"""Decode fidelity: how much of full attention's mass each selection keeps, on real SmolLM2.

The embedded model answers the last turn of ``capture.build_conversation``
(question at the start, middle or end of that turn) greedily for ``--steps``
tokens; every layer's q/k of prompt + answer is captured.  At each decode step
after the first ``--skip`` (16) ones, each method's selection at budget ``B`` is
scored by the share of the step's full attention mass (per query head, over
all keys it may see) that falls on the selected positions:

* LoopServe: re-selected from the last ``window`` output queries, plus every
  token generated since (``DecodeCompressor``): two-stage (candidates from
  key-block bounds, exact scores among them), every ``interval`` steps or
  more while consecutive selections agree, and each step's own query blocks
  (``query_blocks``, each layer's as the server sets them, ``layer_query_blocks``: what the
  server reads; ``loopserve_selection``: the selection and the tokens since only);
* ``loopserve_before``: the paper's re-selection, each of the window's queries scoring every
  cached key every 16 steps (the paper's interval and window; no pooling, no candidates, no
  adaptive interval);
* SnapKV: selected once from the prompt's last 32 queries (pooling 5), plus
  the generated tokens;
* StreamingLLM: 4 sink tokens + the most recent.

The compressors read the keys as the server's KV pool holds them (``--kv-dtype``, bf16); the
model runs and the masses are scored in fp32.

    python benchmarks/decode_fidelity.py [--budgets 512 1024] [--steps 64] [--kv-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from capture import QUESTIONS, build_conversation, capture_qkv, load_model  # noqa: E402

from sglang_loopserve.cache_policy import DecodeCompressor, ScoreContext, SnapKV, StreamingLLM  # noqa: E402
from sglang_loopserve.cache_policy.decode import INTERVAL, QUERY_BLOCKS, WINDOW, layer_query_blocks  # noqa: E402

METHOD_NAMES = ("loopserve", "loopserve_selection", "loopserve_before", "snapkv", "streaming_llm")


def kept_mass(q, k, idx):
    """Mean over query heads of the softmax mass of ``q [H, d]`` over ``k [L, Hk, d]`` on ``idx [Hk, n]``."""
    n_heads, d = q.shape
    n_kv = k.shape[1]
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), k.float().repeat_interleave(n_heads // n_kv, 1))
                      * d**-0.5, dim=-1)
    if idx is None:  # everything
        return 1.0
    sel = torch.zeros(n_kv, k.shape[0], dtype=torch.bool)
    sel[torch.arange(n_kv)[:, None], idx] = True
    return float((p * sel.repeat_interleave(n_heads // n_kv, 0)).sum(-1).mean())


#: The paper's re-selection interval and window: the ``loopserve_before`` column.
PAPER_INTERVAL = 16


def run_layer(layer, prompt_len, steps, budget, interval, window, kv_dtype=torch.float32, skip=PAPER_INTERVAL,
              query_blocks=QUERY_BLOCKS):
    q, k = layer["q"], layer["k"]
    pool = k.to(kv_dtype)  # what the compressors read (the server's KV pool); masses are scored on ``k``
    comp = DecodeCompressor(budget=budget, interval=interval, window=window, query_blocks=query_blocks)
    comp.seed(None, prompt_len)
    before = DecodeCompressor(budget=budget, interval=PAPER_INTERVAL, window=PAPER_INTERVAL,
                              max_interval=PAPER_INTERVAL, candidate_factor=0, pool_window="none")
    before.seed(None, prompt_len)
    ctx = ScoreContext(k=k[:prompt_len], prompt_len=prompt_len, prompt_q=q[prompt_len - 32:prompt_len])
    snap = SnapKV(window=32).select(ctx, budget=budget)
    kept = {m: [] for m in METHOD_NAMES}
    for t in range(steps):
        length = prompt_len + t + 1
        qt = q[prompt_len + t]
        if t >= skip:
            since = torch.arange(prompt_len, length).expand(k.shape[1], -1)
            read = comp.attended(length, qt, pool, torch.arange(length))
            kept["loopserve"].append(kept_mass(qt, k[:length], None if read is None else read[0].view(k.shape[1], -1)))
            kept["loopserve_selection"].append(kept_mass(qt, k[:length], comp.indices(length)))
            kept["loopserve_before"].append(kept_mass(qt, k[:length], before.indices(length)))
            kept["snapkv"].append(kept_mass(qt, k[:length], torch.cat([snap, since], 1)))
            stream_now = StreamingLLM().select(ScoreContext(k=k[:length], prompt_len=prompt_len), budget=budget)
            kept["streaming_llm"].append(kept_mass(qt, k[:length], stream_now))
        comp.observe(qt, pool[:length])
        before.observe(qt, pool[:length])
    out = {m: sum(v) / len(v) for m, v in kept.items()}
    out["reselections"] = comp.reselections
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--interval", type=int, default=INTERVAL, help=f"default {INTERVAL}: the server's")
    p.add_argument("--window", type=int, default=WINDOW, help=f"default {WINDOW}: the server's")
    p.add_argument("--skip", type=int, default=PAPER_INTERVAL,
                   help="steps before the scoring starts (default 16: the paper's first re-selection)")
    p.add_argument("--history-tokens", type=int, default=5700)
    p.add_argument("--positions", nargs="+", default=list(QUESTIONS))
    p.add_argument("--kv-dtype", default="bfloat16",
                   help="the keys the compressors read (default bfloat16: the server's KV pool; the model runs fp32)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tok = load_model()
    summary = {}
    for position in a.positions:
        conv = build_conversation(tok, position, history_tokens=a.history_tokens)
        t0 = time.time()
        gen = model.generate(conv.input_ids[None], max_new_tokens=a.steps, min_new_tokens=a.steps,
                             do_sample=False)[0]
        layers = capture_qkv(model, gen)
        prompt_len = len(conv.input_ids)
        print(f"\n== question at the {position}: prompt {prompt_len} tokens, {a.steps} generated "
              f"({time.time() - t0:.0f} s): {tok.decode(gen[prompt_len:prompt_len + 24])!r}...", flush=True)
        cols = [f"{m[:13]}@{b}" for b in a.budgets for m in METHOD_NAMES]
        print(f"{'layer':>5} " + " ".join(f"{c:>16}" for c in cols))
        for li, layer in enumerate(layers):
            row = []
            for b in a.budgets:
                res = run_layer(layer, prompt_len, a.steps, b, a.interval, a.window, getattr(torch, a.kv_dtype),
                                a.skip, layer_query_blocks(QUERY_BLOCKS, li, len(layers)))  # as served
                for m in METHOD_NAMES:
                    summary.setdefault((position, b, m), []).append(res[m])
                    row.append(res[m])
                summary.setdefault((position, b, "reselections"), []).append(res["reselections"])
            print(f"{li:>5} " + " ".join(f"{x:>16.3f}" for x in row), flush=True)
    print("\nmean share of full-attention mass kept (over layers, steps, query heads)")
    print(f"{'question':>8} " + " ".join(f"{m[:13] + '@' + str(b):>16}" for b in a.budgets for m in METHOD_NAMES))
    for position in a.positions:
        vals = [sum(summary[position, b, m]) / len(summary[position, b, m]) for b in a.budgets for m in METHOD_NAMES]
        print(f"{position:>8} " + " ".join(f"{x:>16.3f}" for x in vals))
    print(f"\nLoopServe re-selections per layer in {a.steps} steps (before: one per {PAPER_INTERVAL} steps):")
    for position in a.positions:
        print(f"{position:>8} " + " ".join(
            f"B={b}: {sum(summary[position, b, 'reselections']) / len(summary[position, b, 'reselections']):.1f}"
            for b in a.budgets))


if __name__ == "__main__":
    main()
