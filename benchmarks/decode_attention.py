"""Compressed vs full decode attention, side by side in one run.

For each context length ``L``, budget ``B`` and batch size: the time of one
decode step's attention over the full cache (torch SDPA on contiguous K/V, the
strongest dense baseline here) and over the ``B`` selected positions
(``batched_decode_attention``, or the Triton kernel on a GPU), the speedup
against the goal ``0.5 x L/B`` (CPU) or ``0.6 x L/B`` (GPU), and the share of
time spent re-selecting (``select_decode_kv_batched`` once every ``interval``
steps, amortised).  SmolLM2's head layout: 9 query / 3 KV heads of 64.

    python benchmarks/decode_attention.py [--lengths 4096 8192 32768] [--budgets 512 1024 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefill_attention import timeit  # noqa: E402

from sglang_loopserve.cache_policy import batched_decode_attention, select_decode_kv_batched  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 32768])
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--interval", type=int, default=16)
    p.add_argument("--window", type=int, default=16)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    goal = 0.6 if dev.type == "cuda" else 0.5
    attend = batched_decode_attention
    if dev.type == "cuda":
        from sglang_loopserve.cache_policy.triton_decode import batched_decode_attention_triton as attend
    torch.set_grad_enabled(False)
    H, Hk, d = 9, 3, 64
    print(f"device {dev}, dtype {dtype}, interval {a.interval}, window {a.window}, threads {torch.get_num_threads()}")
    print(f"{'L':>6} {'B':>5} {'batch':>5} {'full ms':>8} {'sel. ms':>8} {'speedup':>8} {'goal':>6} "
          f"{'reselect ms':>11} {'reselect share':>14}")
    for length in a.lengths:
        for batch in a.batches:
            g = torch.Generator().manual_seed(length + batch)
            pool_k = torch.randn(batch * length, Hk, d, generator=g).to(dev, dtype)
            pool_v = torch.randn(batch * length, Hk, d, generator=g).to(dev, dtype)
            slots = torch.arange(batch * length, device=dev).view(batch, length)
            lens = torch.full((batch,), length, device=dev)
            q = torch.randn(batch, H, d, generator=g).to(dev, dtype)
            rq = torch.randn(batch, a.window, H, d, generator=g).to(dev, dtype)
            kc = pool_k.view(batch, length, Hk, d).transpose(1, 2)
            vc = pool_v.view(batch, length, Hk, d).transpose(1, 2)
            t_full = timeit(lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True), dev, 5)
            for budget in a.budgets:
                if budget >= length:
                    continue
                indptr, pos = select_decode_kv_batched(rq, pool_k, slots, lens, budget=budget)
                t_sel = timeit(lambda: attend(q, pool_k, pool_v, slots, indptr, pos), dev, 5)
                t_re = timeit(lambda: select_decode_kv_batched(rq, pool_k, slots, lens, budget=budget), dev,
                              repeats=3)
                share = (t_re / a.interval) / (t_sel + t_re / a.interval)
                print(f"{length:>6} {budget:>5} {batch:>5} {t_full * 1e3:>8.3f} {t_sel * 1e3:>8.3f} "
                      f"{t_full / t_sel:>7.2f}x {goal * length / budget:>5.1f}x {t_re * 1e3:>11.2f} "
                      f"{share:>13.1%}", flush=True)


if __name__ == "__main__":
    main()
