"""Sparse vs dense prefill attention of a new turn over its history, side by side in one run.

For each context length ``L`` the new turn is the last ``new_frac * L`` tokens
(``--new-frac 1`` is a first prefill).  Per case, all timed in the same run, in rounds (one
call of each per round; medians):

* ``dense``: torch SDPA over the turn's rows with a bottom-right causal mask
  (the dense baseline; FlashAttention on a GPU, and FlashInfer's dense
  prefill when installed);
* ``exact``: ``exact_prefill_attention``, the exact rectangle the server runs
  below the length gate (on the CPU: the prefix unmasked + the causal square,
  merged by log-sum-exp);
* ``plan``: estimate + select + index (``build_block_mask``), split into its
  three stages, and its share of ``dense``;
* per sparse kernel: the kernel alone on the planned mask, and the whole
  sparse prefill (plan + kernel) as a ratio of ``dense`` and of ``exact``;
* the density and the relative output error against dense.

Inputs: ``captured`` (real q/k/v saved by ``benchmarks/real_attention.py
--save``; SmolLM2, bf16) and ``synthetic`` (planted vertical/slash structure,
SmolLM2's head layout 9/3 x 64).  ``--large N`` adds a synthetic case of N
tokens timing the plan and the kernel (no dense baseline: its time is
extrapolated from the largest measured case, cells x rate).

``--break-even`` instead sweeps context lengths over the captured layers and
prints, per length, exact vs sparse (plan + the default kernel, with the
server's density gate, and in its steady state for layers whose plan is too
dense: exact, planning once every ``DenseLayers.probe_every`` forwards if the plan is far too
dense, ``DenseLayers.REMEMBER_FROM``, else every time)
summed over the layers: the first length where sparse wins is the CPU's
measured ``--loopserve-min-prefill-len``.

    python benchmarks/prefill_attention.py --inputs captured synthetic --lengths 4096 8000 --layers 5 15 25
    python benchmarks/prefill_attention.py --inputs synthetic --lengths 8192 --large 65536
    python benchmarks/prefill_attention.py --break-even --lengths 1024 2048 3072 4096 6144 8000
    python benchmarks/prefill_attention.py --device cuda --lengths 8192 32768 131072 --kernels triton flashinfer
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_loopserve.attention import build_block_mask  # noqa: E402
from sglang_loopserve.calibrate import median_times  # noqa: E402
from sglang_loopserve.config import LoopServeConfig  # noqa: E402
from sglang_loopserve.srt.backend import DenseLayers  # noqa: E402
from sglang_loopserve.attention.exact import exact_prefill_attention  # noqa: E402
from sglang_loopserve.attention.kernels import KERNELS, default_kernel  # noqa: E402
from sglang_loopserve.attention.sparse_prefill import dense_is_cheaper  # noqa: E402
from sglang_loopserve.attention.synthetic import planted_qkv  # noqa: E402
from sglang_loopserve.testing import dense_sdpa  # noqa: E402,F401 (also imported from here by the other benchmarks)


def timeit_rounds(fns, device, repeats=3, warmup=1):
    """Median seconds of each of ``fns`` (a dict), timed in rounds (``calibrate.median_times``)."""
    return median_times(fns, device, repeats, warmup)


def timeit(fn, device, repeats=3, warmup=1):
    """Median seconds of ``fn``."""
    return timeit_rounds({"fn": fn}, device, repeats, warmup)["fn"]


def dense_flashinfer(q, k, v):
    import flashinfer

    return flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True)


#: Synthetic structure: 5 planted diagonals, 16 hot columns per KV head, logit 12
#: (density about 0.6 at alpha 0.95; stronger planting on d = 64 leaves noise peaks the sample misses).
SYNTHETIC = dict(diagonals=(0, 1, 2, 500, 1500), n_columns=16, strength=12.0, value_spread=0.3)


def inputs(kind, n_ctx, new_frac, device, dtype, captured=None):
    n_new = max(1, int(n_ctx * new_frac))
    if kind == "synthetic":
        p = planted_qkv(n_new, n_ctx, 9, 3, 64, seed=n_ctx, **SYNTHETIC)
        q, k, v = p.q, p.k, p.v
    else:
        total = captured["k"].shape[0]
        if n_ctx > total:
            return None
        # The last n_ctx positions of the capture keep real RoPE distances.
        q = captured["q"][total - n_new:]
        k, v = captured["k"][total - n_ctx:], captured["v"][total - n_ctx:]
    return tuple(t.to(device, dtype).contiguous() for t in (q, k, v))


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


class Plan:
    """The plan (``build_block_mask``) as a timed callable; ``stages()``: the median seconds
    of its estimate, select and index over the calls so far."""

    def __init__(self, q, k, alpha, q_window):
        self.q, self.k, self.alpha, self.q_window = q, k, alpha, q_window
        self.timings = []

    def __call__(self):
        timings = {}
        mask, _ = build_block_mask(self.q, self.k, alpha=self.alpha, q_window=self.q_window, block_size=64,
                                   timings=timings, sharpen=True)  # as served: a sharp layer plans twice
        self.timings.append(timings)
        return mask

    def stages(self):
        return {key: statistics.median(t[key] for t in self.timings) for key in ("estimate", "select", "index")}


def plan_stages(q, k, alpha, q_window, repeats, device):
    """Median seconds of the whole plan and of its stages (estimate, select, index)."""
    plan = Plan(q, k, alpha, q_window)
    total = timeit(plan, device, repeats)
    return total, plan.stages(), plan()


def compare(a, device, dtype, kernels, captured):
    cases = []
    for kind in a.inputs:
        if kind == "captured":
            for layer in a.layers or [len(captured["layers"]) // 2]:
                cases += [(f"captured L{layer}", "captured", n, captured["layers"][layer]) for n in a.lengths]
        else:
            cases += [("synthetic", "synthetic", n, None) for n in a.lengths]
    dense_fns = {"sdpa": dense_sdpa}
    if device.type == "cuda":
        try:
            import flashinfer  # noqa: F401

            dense_fns["flashinfer"] = dense_flashinfer
        except ImportError:
            pass
    head = (f"{'input':<13} {'ctx':>6} {'new':>6} {'density':>7} {'dense ms':>8} {'exact ms':>8} "
            f"{'plan ms':>7} {'(est/sel/idx)':>16} {'plan/dense':>10} | "
            + " | ".join(f"{k + ' ms':>10} {'total/dense':>11} {'total/exact':>11}" for k in kernels)
            + f" | {'rel err':>7}")
    print(head)
    rates = []  # dense cells per second, for extrapolating --large
    rows = []
    for label, kind, n_ctx, cap in cases:
        qkv = inputs(kind, n_ctx, a.new_frac, device, dtype, cap)
        if qkv is None:
            print(f"{label:<13} {n_ctx:>6}: skipped (the capture has fewer tokens)")
            continue
        q, k, v = qkv
        ref = dense_sdpa(q, k, v)
        plan = Plan(q, k, a.alpha, a.q_window)
        mask = plan()
        fns = {f"dense {name}": (lambda f=f: f(q, k, v)) for name, f in dense_fns.items()}
        fns["exact"] = lambda: exact_prefill_attention(q, k, v)
        fns["plan"] = plan
        fns.update({kname: (lambda kn=kname: KERNELS[kn](q, k, v, mask)) for kname in kernels})
        times = timeit_rounds(fns, device, a.repeats)
        t_dense = {name: times[f"dense {name}"] for name in dense_fns}
        t_exact, t_plan, stages = times["exact"], times["plan"], plan.stages()
        rates.append(q.shape[0] * n_ctx * q.shape[1] / t_dense["sdpa"])
        row = dict(label=label, ctx=n_ctx, new=q.shape[0], density=mask.density(), dense=t_dense["sdpa"],
                   exact=t_exact, plan=t_plan, kernels={})
        cells = []
        err = 0.0
        for kname in kernels:
            t_kernel = times[kname]
            err = rel_err(KERNELS[kname](q, k, v, mask), ref)
            row["kernels"][kname] = t_kernel
            total = t_plan + t_kernel
            cells.append(f"{t_kernel * 1e3:>10.1f} {total / t_dense['sdpa']:>10.2f}x {total / t_exact:>10.2f}x")
        stage = "/".join(f"{stages[s] * 1e3:.0f}" for s in ("estimate", "select", "index"))
        print(f"{label:<13} {n_ctx:>6} {q.shape[0]:>6} {row['density']:>7.3f} {t_dense['sdpa'] * 1e3:>8.1f} "
              f"{t_exact * 1e3:>8.1f} {t_plan * 1e3:>7.1f} {stage:>16} {t_plan / t_dense['sdpa']:>10.1%} | "
              + " | ".join(cells) + f" | {err:>7.4f}", flush=True)
        for name, t in t_dense.items():
            if name != "sdpa":
                print(f"{'':<13} dense {name}: {t * 1e3:.1f} ms")
        rows.append(row)
    return rows, (statistics.median(rates) if rates else None)


def large_case(a, device, dtype, kernels, rate):
    n_ctx = a.large
    q, k, v = inputs("synthetic", n_ctx, a.new_frac, device, dtype)
    t_plan, stages, mask = plan_stages(q, k, a.alpha, a.q_window, 1, device)
    cells = q.shape[0] * n_ctx * q.shape[1]
    est = f"{cells / rate:.1f} s (extrapolated: {cells / 1e9:.1f} G cells at the measured dense rate)" if rate else "-"
    print(f"\nlarge synthetic: {n_ctx} tokens, {q.shape[0]} new; density {mask.density():.3f}; plan "
          f"{t_plan * 1e3:.0f} ms (estimate {stages['estimate'] * 1e3:.0f}, select {stages['select'] * 1e3:.0f}, "
          f"index {stages['index'] * 1e3:.0f}); dense SDPA {est}")
    if rate:
        print(f"  plan / dense: {t_plan / (cells / rate):.2%}")
    for kname in kernels:
        t_kernel = timeit(lambda: KERNELS[kname](q, k, v, mask), device, 1, warmup=0)
        print(f"  {kname} kernel: {t_kernel:.1f} s; plan + kernel vs dense: "
              + (f"{(t_plan + t_kernel) / (cells / rate):.2f}x" if rate else "-"))


def break_even(a, device, dtype, captured):
    """Exact vs sparse summed over captured layers, per context length."""
    layers = a.layers or list(range(len(captured["layers"])))
    kname = default_kernel(device)
    print(f"break-even sweep: {len(layers)} captured layers, new tokens = {a.new_frac} x context, "
          f"kernel {kname}, alpha {a.alpha}")
    print(f"{'ctx':>6} {'new':>6} {'exact ms':>9} {'sparse ms':>9} {'sparse/exact':>12} {'sparse layers':>13}")
    gate = None
    for n_ctx in a.lengths:
        t_exact = t_sparse = 0.0
        n_sparse = 0
        for layer in layers:
            qkv = inputs("captured", n_ctx, a.new_frac, device, dtype, captured["layers"][layer])
            if qkv is None:
                break
            q, k, v = qkv
            t_layer_exact = timeit(lambda: exact_prefill_attention(q, k, v), device, a.repeats)
            t_exact += t_layer_exact

            def plan():
                return build_block_mask(q, k, alpha=a.alpha, q_window=a.q_window, block_size=64, sharpen=True)[0]

            mask = plan()
            if dense_is_cheaper(mask):
                # The server's steady state (DenseLayers): this layer runs exact, and plans again
                # once every ``probe_every`` forwards if remembered (far too dense), else every time.
                remembered = mask.density() >= DenseLayers.REMEMBER_FROM
                t_sparse += t_layer_exact + timeit(plan, device, a.repeats) / (
                    DenseLayers().probe_every if remembered else 1)
            else:
                t_sparse += timeit(lambda: KERNELS[kname](q, k, v, plan()), device, a.repeats)
                n_sparse += 1
        else:
            ratio = t_sparse / t_exact
            print(f"{n_ctx:>6} {q.shape[0]:>6} {t_exact * 1e3:>9.0f} {t_sparse * 1e3:>9.0f} {ratio:>11.2f}x "
                  f"{n_sparse:>6} / {len(layers)}", flush=True)
            if gate is None and ratio < 1.0:
                gate = n_ctx
            continue
        print(f"{n_ctx:>6}: the capture has fewer tokens; stopped")
        break
    print(f"measured break-even (first length where sparse is faster): {gate}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8000])
    p.add_argument("--new-frac", type=float, default=0.5, help="new tokens / context (default 0.5)")
    p.add_argument("--alpha", type=float, default=LoopServeConfig().alpha)
    p.add_argument("--q-window", type=int, default=LoopServeConfig().q_window, help="the estimate's sampled rows")
    p.add_argument("--kernels", nargs="+", default=None, help="default: the device's default kernel")
    p.add_argument("--inputs", nargs="+", default=["captured", "synthetic"], choices=["synthetic", "captured"])
    p.add_argument("--captured", default="benchmarks/results/captured_qkv.pt")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="captured layers to use")
    p.add_argument("--dtype", default=None,
                   help="default: what the server runs (GPU bf16; CPU bf16 where it is native, else fp32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large", type=int, default=0, help="also a synthetic case of this many tokens")
    p.add_argument("--break-even", action="store_true", help="sweep lengths: exact vs sparse per length")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.dtype is None:
        from sglang_loopserve.srt.platform import default_cpu_dtype

        a.dtype = "bfloat16" if device.type == "cuda" else default_cpu_dtype()
    dtype = getattr(torch, a.dtype)
    kernels = a.kernels or [default_kernel(device)]
    for kname in kernels:
        if kname not in KERNELS:
            raise SystemExit(f"unknown kernel {kname!r}; choose from {sorted(KERNELS)}")
    torch.set_grad_enabled(False)
    captured = None
    if a.break_even or "captured" in a.inputs:
        path = Path(a.captured)
        if not path.exists():
            raise SystemExit(f"{path} is missing: python benchmarks/real_attention.py --save {path}")
        captured = torch.load(path)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"dtype {dtype}, alpha {a.alpha}, new tokens = {a.new_frac} x context, threads {torch.get_num_threads()}")
    if a.break_even:
        break_even(a, device, dtype, captured)
        return
    _, rate = compare(a, device, dtype, kernels, captured)
    if a.large:
        large_case(a, device, dtype, kernels, rate)


if __name__ == "__main__":
    main()
