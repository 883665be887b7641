"""Sparse vs dense prefill attention of a new turn over its history, side by side.

For each context length ``L`` the new turn is the last ``new_frac * L`` tokens
(``--new-frac 1`` is a first prefill).  Dense is torch SDPA with a
bottom-right causal mask (FlashAttention on a GPU; also FlashInfer's dense
prefill when installed); sparse is ``sparse_prefill_attention`` with each
kernel asked for.  Printed per row: time of dense and sparse (end to end:
estimation + index building + kernel), speedup, density, the goal
``0.5 / density`` (CPU) or ``0.7 / density`` (GPU), the time spent estimating
and building indices as a share of the dense time, and the relative output
error against dense.

Inputs: ``synthetic`` (planted vertical/slash structure, SmolLM2's head
layout 9/3 x 64) and ``captured`` (real q/k/v saved by
``benchmarks/real_attention.py --save``).

    python benchmarks/prefill_attention.py --device cpu --lengths 2048 4096 8192
    python benchmarks/prefill_attention.py --device cuda --lengths 8192 32768 131072 --kernels triton flashinfer
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_loopserve.attention import build_block_mask, sparse_prefill_attention  # noqa: E402
from sglang_loopserve.attention.kernels import KERNELS  # noqa: E402
from sglang_loopserve.attention.synthetic import planted_qkv  # noqa: E402
from sglang_loopserve.testing import dense_sdpa  # noqa: E402,F401 (also imported from here by the other benchmarks)


def timeit(fn, device, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dense_flashinfer(q, k, v):
    import flashinfer

    return flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True)


def inputs(kind, n_ctx, new_frac, device, dtype, captured=None):
    n_new = max(1, int(n_ctx * new_frac))
    if kind == "synthetic":
        p = planted_qkv(n_new, n_ctx, 9, 3, 64, diagonals=(0, 1, 2, 500, 1500), n_columns=16,
                        strength=10.0, seed=n_ctx)
        q, k, v = p.q, p.k, p.v
    else:
        data = captured
        total = data["k"].shape[0]
        if n_ctx > total:
            return None
        # The last n_ctx positions of the capture keep real RoPE distances.
        q = data["q"][total - n_new:]
        k, v = data["k"][total - n_ctx:], data["v"][total - n_ctx:]
    return tuple(t.to(device, dtype).contiguous() for t in (q, k, v))


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--new-frac", type=float, default=0.5, help="new tokens / context (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.95)
    p.add_argument("--kernels", nargs="+", default=None, help="default: gather (CPU) / triton (GPU)")
    p.add_argument("--inputs", nargs="+", default=["synthetic"], choices=["synthetic", "captured"])
    p.add_argument("--captured", default="benchmarks/results/captured_qkv.pt")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="captured layers to use")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kernels = a.kernels or (["triton"] if device.type == "cuda" else ["gather"])
    goal = 0.7 if device.type == "cuda" else 0.5
    dense_fns = {"sdpa": dense_sdpa}
    if device.type == "cuda":
        try:
            import flashinfer  # noqa: F401

            dense_fns["flashinfer"] = dense_flashinfer
        except ImportError:
            pass
    torch.set_grad_enabled(False)

    cases = []
    for kind in a.inputs:
        if kind == "captured":
            cap = torch.load(a.captured)
            for layer in a.layers or [len(cap["layers"]) // 2]:
                cases += [(f"captured L{layer}", "captured", n, cap["layers"][layer]) for n in a.lengths]
        else:
            cases += [("synthetic", "synthetic", n, None) for n in a.lengths]

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"dtype {dtype}, alpha {a.alpha}, new tokens = {a.new_frac} x context, threads {torch.get_num_threads()}")
    hdr = (f"{'input':<14} {'ctx':>7} {'new':>7} {'sparse/dense':<18} {'dense ms':>9} {'sparse ms':>10} "
           f"{'speedup':>8} {'density':>8} {'goal':>6} {'idx/dense':>9} {'rel err':>8}")
    print(hdr)
    for label, kind, n_ctx, cap in cases:
        qkv = inputs(kind, n_ctx, a.new_frac, device, dtype, cap)
        if qkv is None:
            continue
        q, k, v = qkv
        dense_out = dense_sdpa(q, k, v)
        dense_t = {name: timeit(lambda f=f: f(q, k, v), device, a.repeats) for name, f in dense_fns.items()}
        for kname in kernels:
            if kname not in KERNELS:
                raise SystemExit(f"unknown kernel {kname!r}; choose from {sorted(KERNELS)}")
            run = lambda: sparse_prefill_attention(q, k, v, alpha=a.alpha, kernel=kname)  # noqa: E731
            t_sparse = timeit(run, device, a.repeats)
            t_index = timeit(lambda: build_block_mask(q, k, alpha=a.alpha, q_window=64, block_size=64),
                             device, a.repeats)
            out, st = sparse_prefill_attention(q, k, v, alpha=a.alpha, kernel=kname, return_stats=True)
            for name, t_dense in dense_t.items():
                print(f"{label:<14} {n_ctx:>7} {q.shape[0]:>7} {kname + '/' + name:<18} {t_dense * 1e3:>9.1f} "
                      f"{t_sparse * 1e3:>10.1f} {t_dense / t_sparse:>7.2f}x {st.density:>8.3f} "
                      f"{goal / st.density:>5.2f}x {t_index / t_dense:>9.1%} "
                      f"{rel_err(out, dense_out):>8.4f}", flush=True)


if __name__ == "__main__":
    main()
