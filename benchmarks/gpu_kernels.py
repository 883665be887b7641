"""GPU kernels against the torch reference on the same mask (run on a CUDA machine).

For each case: the fp64 reference over the ``BlockMask`` cells vs the Triton
and FlashInfer kernels in bf16 (and Triton in fp32), max abs error and
relative error, plus each kernel's time.

    python benchmarks/gpu_kernels.py            # correctness
    python benchmarks/gpu_kernels.py --sweep    # speed at fixed densities, 8K-128K
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_loopserve.attention import build_block_mask  # noqa: E402
from sglang_loopserve.attention.kernels import KERNELS  # noqa: E402
from sglang_loopserve.attention.kernels.reference import block_sparse_attention_reference  # noqa: E402
from sglang_loopserve.attention.synthetic import planted_qkv  # noqa: E402


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    print(f"{'n_new':>6} {'n_ctx':>6} {'alpha':>5} {'density':>7} {'cols':>6} {'kernel':<10} {'dtype':<8} "
          f"{'max abs':>9} {'rel':>9} {'ms':>7}")
    for n_new, n_ctx, alpha in [(1000, 4000, 0.9), (777, 3001, 0.95), (2048, 2048, 0.9), (512, 8192, 1.0)]:
        p = planted_qkv(n_new, n_ctx, 9, 3, 64, diagonals=(0, 1, 300), seed=n_new)
        q, k, v = (t.to(dev) for t in (p.q, p.k, p.v))
        mask, _ = build_block_mask(q, k, alpha=alpha, q_window=64, block_size=64)
        ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask,
                                               compute_dtype=torch.float64)
        for name, dtype in [("triton", torch.float32), ("triton", torch.bfloat16),
                            ("flashinfer", torch.bfloat16)]:
            qd, kd, vd = (t.to(dtype) for t in (q, k, v))
            try:
                out = KERNELS[name](qd, kd, vd, mask)
                ms = timed(lambda: KERNELS[name](qd, kd, vd, mask)) * 1e3
            except Exception as exc:  # report and go on: one missing kernel must not hide the others
                print(f"{n_new:>6} {n_ctx:>6} {alpha:>5} {name:<10} FAILED: {type(exc).__name__}: {exc}"[:300])
                continue
            err = (out.double() - ref).abs().max().item()
            rel = ((out.double() - ref).norm() / ref.norm()).item()
            print(f"{n_new:>6} {n_ctx:>6} {alpha:>5} {mask.density():>7.3f} {mask.col_indices.numel():>6} "
                  f"{name:<10} {str(dtype)[6:]:<8} {err:>9.2e} {rel:>9.2e} {ms:>7.2f}", flush=True)


def random_block_mask(heads, n_new, n_ctx, bs, density, device, seed=0):
    """Random visited blocks at about ``density`` of the causal blocks, plus each diagonal."""
    from sglang_loopserve.attention.block_mask import BlockMask, query_block_span

    g = torch.Generator(device=device).manual_seed(seed)
    nqb, nkb = -(-n_new // bs), -(-n_ctx // bs)
    q_first, q_last = query_block_span(n_new, n_ctx, bs, device)
    kb = torch.arange(nkb, device=device)
    causal = kb[None, :] <= (q_last // bs)[:, None]
    diag = kb[None, :] >= (q_first // bs)[:, None]
    blocks = (torch.rand(heads, nqb, nkb, generator=g, device=device) < density) & causal | (diag & causal)
    cols = torch.zeros(heads, nqb, n_ctx, dtype=torch.bool, device=device)
    return BlockMask._from_dense(blocks, cols, n_new, n_ctx, bs)


def speed_sweep(lengths=(8192, 32768, 131072), densities=(0.05, 0.1, 0.25, 0.5)):
    """Kernel time against dense at fixed densities, and index-building time, long contexts.

    The new turn is half the context.  FlashInfer is planned once per mask and
    only its ``run`` is timed (the plan is reported apart), as in a server that
    plans once per layer group.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prefill_attention import dense_flashinfer, dense_sdpa
    from sglang_loopserve.attention.kernels.flashinfer_kernel import FlashInferBlockSparse
    from sglang_loopserve.attention.kernels.triton_kernel import block_sparse_attention_triton

    dev = torch.device("cuda")
    print(f"\n{'n_ctx':>7} {'n_new':>6} {'density':>7} {'dense FA ms':>11} {'dense FI ms':>11} "
          f"{'triton ms':>9} {'x vs FA':>7} {'FI run ms':>9} {'x vs FI':>7} {'FI plan ms':>10} {'goal':>5}")
    for n_ctx in lengths:
        n_new = n_ctx // 2
        q = torch.randn(n_new, 9, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(n_ctx, 3, 64, device=dev, dtype=torch.bfloat16)
        v = torch.randn(n_ctx, 3, 64, device=dev, dtype=torch.bfloat16)
        t_fa = timed(lambda: dense_sdpa(q, k, v))
        t_fi = timed(lambda: dense_flashinfer(q, k, v))
        t_index = timed(lambda: build_block_mask(q, k, alpha=0.95, q_window=64, block_size=64), reps=2)
        for density in densities:
            mask = random_block_mask(9, n_new, n_ctx, 64, density, dev)
            t_tr = timed(lambda: block_sparse_attention_triton(q, k, v, mask))
            fi = FlashInferBlockSparse(dev)
            t_plan = timed(lambda: fi.plan(mask, 3, 64, torch.bfloat16), reps=2)
            t_run = timed(lambda: fi.run(q, k, v))
            d = mask.density()
            print(f"{n_ctx:>7} {n_new:>6} {d:>7.3f} {t_fa * 1e3:>11.2f} {t_fi * 1e3:>11.2f} "
                  f"{t_tr * 1e3:>9.2f} {t_fa / t_tr:>6.2f}x {t_run * 1e3:>9.2f} {t_fi / t_run:>6.2f}x "
                  f"{t_plan * 1e3:>10.1f} {0.7 / d:>4.1f}x", flush=True)
        print(f"{n_ctx:>7} {n_new:>6}  estimate + select + BlockMask (alpha 0.95): {t_index * 1e3:.1f} ms "
              f"= {t_index / t_fa:.1%} of dense FA", flush=True)


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        speed_sweep()
    else:
        main()
