"""LoopServe's per-layer decode step against stock's, through the backends a CPU server runs.

One attention layer, one request decoding over ``--lengths`` cached tokens (random KV in a pool
through scattered slots, SmolLM2's 9 query / 3 KV heads of 64), timed per step, median of
``--steps`` steps after a warm-up that lets the compressed turn make its first selections:

* ``stock``: SGLang's torch-native backend alone (``TorchNativeAttnBackend.forward_decode``: every
  cached row gathered, one SDPA), what a stock CPU server runs;
* ``disabled``: the same request through ``LoopServeAttnBackend`` with ``{"enabled": false}``: the
  cost of having the plugin loaded;
* ``gated``: a LoopServe turn the decode gate sends to exact decoding (``decode_min_len`` above
  it), on the base path (``exact_decode_min_len`` never);
* ``exact``: the same turn reading every position through the measured decode kernel, as the
  server runs it from the measured ``exact_decode_min_len`` on;
* ``compressed``: a LoopServe turn at the defaults (budget 512 + 144 query blocks of 8, re-selection
  every 32-128 steps amortised in the median's neighbourhood, the measured decode kernel).

Each column's overhead is its time minus stock's; ``x`` is stock over compressed.  Every backend
runs side by side in the same process, in rounds (one step of each per round, the order turning
from round to round).

    python benchmarks/decode_overhead.py [--lengths 2048 8192] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_loopserve.config import MAX_INT, LoopServeConfig  # noqa: E402
from sglang_loopserve.cpu_runtime.cpu_info import cpu_kind  # noqa: E402
from sglang_loopserve.srt.backend import LoopServeAttnBackend  # noqa: E402
from sglang_loopserve.srt.request_state import store  # noqa: E402
from sglang_loopserve.testing import KVPool, Request, attention_layer, decode_batch, model_runner  # noqa: E402

KINDS = ("stock", "disabled", "gated", "exact", "compressed")


def run_length(cached, heads, dtype, steps, warmup):
    """Median seconds per step of each kind over ``cached`` tokens."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    h, hk, d = heads
    total = cached + warmup + steps + 1
    gen = torch.Generator().manual_seed(cached)
    pool = KVPool(len(KINDS) * total + 1, hk, d, dtype=dtype)
    pool.k.copy_(torch.randn(pool.k.shape, generator=gen))
    pool.v.copy_(torch.randn(pool.v.shape, generator=gen))
    req_to_token = torch.zeros(len(KINDS), total, dtype=torch.int32)
    for row in range(len(KINDS)):  # scattered slots, as a served pool holds them
        req_to_token[row] = (torch.randperm(total, generator=gen) + row * total).to(torch.int32)
    runner = model_runner(pool, req_to_token, h, dtype, context_len=1 << 20)
    base = TorchNativeAttnBackend(runner)
    config = LoopServeConfig(calibration="auto")
    backend = LoopServeAttnBackend(runner, base, config)
    on_base = LoopServeAttnBackend(runner, base, dataclasses.replace(config, exact_decode_min_len=MAX_INT))
    exact_from = dataclasses.replace(config, exact_decode_min_len=0)
    backends = {"stock": base, "disabled": backend, "gated": on_base,
                "exact": LoopServeAttnBackend(runner, base, exact_from), "compressed": backend}
    layer = attention_layer(h, hk, d, attn_type=AttentionType.DECODER)
    options = {"stock": config, "disabled": config.override({"enabled": False}),
               "gated": config.override({"decode_min_len": 1 << 30}),
               "exact": config.override({"decode_min_len": 1 << 30}),
               "compressed": config.override({"decode_min_len": 0})}
    reqs = {kind: Request(f"{kind}-{cached}", options[kind]) for kind in KINDS}
    times = {kind: [] for kind in KINDS}
    for step in range(warmup + steps):
        seq = cached + step + 1
        # The order turns each round: a kind that always ran first ran 0.4-0.7 ms faster at 8K.
        for row in [(step + i) % len(KINDS) for i in range(len(KINDS))]:
            kind = KINDS[row]
            q = torch.randn(1, h * d, generator=gen).to(dtype)
            k, v = (torch.randn(1, hk * d, generator=gen).to(dtype) for _ in "kv")
            fb = decode_batch([reqs[kind].rid], [row], [seq], req_to_token[row, seq - 1:seq].clone(),
                              mode=ForwardMode.DECODE)
            run = backends[kind]
            t = time.perf_counter()
            run.forward_decode(q, k, v, layer, fb)
            if step >= warmup:
                times[kind].append(time.perf_counter() - t)
    for req in reqs.values():
        store.drop(req.rid)
    read = reqs["compressed"].loopserve_stats.summary()
    return {kind: statistics.median(ts) for kind, ts in times.items()}, backend.gates, read


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    p.add_argument("--steps", type=int, default=64, help="timed steps (their median)")
    p.add_argument("--warmup", type=int, default=40, help="steps first: the turn's first selections")
    a = p.parse_args(argv)
    heads = tuple(int(x) for x in a.heads.split(","))
    torch.set_grad_enabled(False)
    print(f"# cpu ({cpu_kind()}), {torch.get_num_threads()} threads, heads {heads}, one layer, one request; "
          f"median of {a.steps} steps after {a.warmup}")
    print(f"{'dtype':>9} {'cached':>7} | " + " ".join(f"{k + ' ms':>14}" for k in KINDS)
          + f" | {'overhead ms (disabled, gated, exact, compressed)':>50} | {'x':>5} {'read':>6}")
    for name in a.dtypes:
        dtype = getattr(torch, name)
        for cached in a.lengths:
            t, gates, read = run_length(cached, heads, dtype, a.steps, a.warmup)
            share = read["decode_tokens_attended"] / max(read["decode_tokens_cached"], 1)
            over = ", ".join(f"{(t[k] - t['stock']) * 1e3:+.3f}" for k in KINDS[1:])
            print(f"{name:>9} {cached:>7} | " + " ".join(f"{t[k] * 1e3:>14.3f}" for k in KINDS)
                  + f" | {over:>50} | {t['stock'] / t['compressed']:>4.2f}x {share:>6.2f}", flush=True)
        print(f"#   {name}: the measured decode kernel {gates.decode_kernel}, exact decode on it from "
              f"{gates.exact_decode_min_len} cached tokens ({gates.source})")


if __name__ == "__main__":
    main()
