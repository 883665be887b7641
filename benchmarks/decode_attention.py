"""Compressed vs full decode attention, and what re-selection costs, side by side in one run.

For each context length ``L``, budget ``B`` and batch size: the time of one
decode step's attention over the full cache (torch SDPA on contiguous K/V, the
strongest dense baseline here) and over the ``B`` selected positions
(``batched_decode_attention``, ``auto``: on a CPU torch's fused kernel for bf16
and the compiled loop for float32, with the padded tensor path beside it as
``tensor``; the Triton kernel on a GPU), the speedup
against the goal ``0.5 x L/B`` (CPU) or ``0.6 x L/B`` (GPU), and the cost of
re-selecting, per request as the server does it (``DecodeCompressor.reselect_from``
reading keys from a KV pool through their slots):

* ``every key``: the window's attention over every cached key (the paper's
  scoring: ``candidate_factor=0``);
* ``two-stage``: candidates from key-block summaries, exact scores among them,
  as the server runs it (on a CPU one compiled call, ``cache_policy/cpu_loops``);
* ``tensor``: the same two stages as torch ops (a GPU's path; on a CPU, the
  alternative to the compiled call);
* ``mean``: the two stages with the window's mean query only (``decode_pooling all``:
  cheaper, less faithful; the default ranks blocks by it and scores candidates by each query).

``+qblocks``: the step as the server runs it by default, each request's query adding its
``--query-blocks`` key blocks (``DecodeCompressor.attended``: the compiled walk over the block
bounds on a CPU) to its selection, then one batched attention; its speedup over the full step
and the re-selection's share of it.

The re-selection *share* is its cost amortised over the interval, as a share
of the step's attention time: ``(t_re / interval) / (t_step + t_re / interval)``
(``t_re`` summed over the batch's requests).  Shown at the base interval (the
server's default, 32: every re-selection disagreeing with the previous one; the
paper's 16 with ``--interval 16``) and at ``--steady-interval`` (twice that:
after an agreeing one; the interval doubles up to
``--loopserve-decode-max-interval``, 128; ``benchmarks/decode_fidelity.py``
prints how often real answers re-select).  Keys are random here, so the
candidates are as hard to find as they get.  SmolLM2's head layout: 9 query
/ 3 KV heads of 64.

    python benchmarks/decode_attention.py [--lengths 8192 32768] [--budgets 512 1024 2048] [--batches 1 8]
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

from sglang_loopserve.cache_policy import DecodeCompressor, batched_decode_attention, select_decode_kv_batched  # noqa: E402
from sglang_loopserve.cache_policy.decode import CANDIDATE_FACTOR, INTERVAL, QUERY_BLOCKS, WINDOW, reselect_pruned  # noqa: E402


#: Timed calls per figure (their median): single calls here move by 2x on a shared 2-core machine.
REPEATS = 11


def reselect_time(pool_k, slots, recent_q, budget, interval, factor, device, method="auto", pooling="bounds",
                  repeats=REPEATS):
    """Seconds to re-select every request of the batch once, as ``DecodeCompressor.reselect_from``
    does (``pooling``: its ``pool_window``; the previous selection's share measured; the summaries are built first,
    as the server's first re-selection of a turn does: later ones only add the new keys)."""
    comps = [DecodeCompressor(budget=budget, interval=interval, window=recent_q.shape[1],
                              candidate_factor=factor) for _ in range(slots.shape[0])]
    for i, comp in enumerate(comps):
        comp._queries = list(recent_q[i])
        comp.reselect_from(pool_k, slots[i])  # builds the summaries

    def run():
        for i, comp in enumerate(comps):
            window = torch.stack(comp._queries)
            pooled = window.float().mean(0, keepdim=True)
            score_q = pooled if pooling == "all" else window
            reselect_pruned(score_q, pool_k, slots[i], comp.summaries, budget=budget, sink=comp.sink,
                            recent=comp.recent, factor=factor, previous=comp.selection, method=method,
                            bound_q=window if pooling == "none" else pooled)

    return timeit(run, device, repeats)


def query_block_step_time(pool_k, pool_v, slots, recent_q, q, budget, blocks, device, attend, repeats=REPEATS):
    """Seconds of one decode step of the batch as the server runs it with query blocks: per
    request the read set (``DecodeCompressor.attended`` with the step's query: the selection, the
    query's ``blocks`` key blocks, the fresh tokens), then one batched attention over them."""
    length = slots.shape[1]
    comps = []
    for i in range(slots.shape[0]):
        comp = DecodeCompressor(budget=budget, window=recent_q.shape[1], query_blocks=blocks)
        comp._queries = list(recent_q[i])
        comp.reselect_from(pool_k, slots[i, :length - 8])  # 8 tokens generated since
        comps.append(comp)

    def step():
        rows = [comp.attended(length, q[i], pool_k, slots[i]) for i, comp in enumerate(comps)]
        counts = [c for _, cs in rows for c in cs]
        indptr = torch.tensor([0] + counts, device=device).cumsum(0)
        return attend(q, pool_k, pool_v, slots, indptr, torch.cat([flat for flat, _ in rows]))

    return timeit(step, device, repeats)


def share(t_re, interval, t_step):
    amortised = t_re / interval
    return amortised / (t_step + amortised)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--interval", type=int, default=INTERVAL, help=f"default {INTERVAL}: the server's")
    p.add_argument("--steady-interval", type=int, default=None,
                   help="a second interval to amortise over (default twice --interval: after an agreeing re-selection)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"default {WINDOW}: the server's")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per figure (their median)")
    p.add_argument("--query-blocks", type=int, default=QUERY_BLOCKS,
                   help="key blocks each step's query adds (the server's default); 0: no such column")
    p.add_argument("--dtype", default=None, help="default: the server's (GPU bf16; CPU: platform default)")
    a = p.parse_args(argv)
    a.steady_interval = a.steady_interval or 2 * a.interval
    dev = torch.device(a.device)
    if a.dtype is None:
        from sglang_loopserve.srt.platform import default_cpu_dtype

        a.dtype = "bfloat16" if dev.type == "cuda" else default_cpu_dtype()
    dtype = getattr(torch, a.dtype)
    goal = 0.6 if dev.type == "cuda" else 0.5
    attend = batched_decode_attention
    if dev.type == "cuda":
        from sglang_loopserve.cache_policy.triton_decode import batched_decode_attention_triton as attend
    torch.set_grad_enabled(False)
    H, Hk, d = 9, 3, 64
    print(f"device {dev}, dtype {dtype}, interval {a.interval} (steady {a.steady_interval}), window {a.window}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'L':>6} {'B':>5} {'batch':>5} {'full ms':>8} {'sel. ms':>8} {'tensor':>7} {'speedup':>8} {'goal':>6} | "
          f"{'every key':>9} {'tensor':>7} {'two-stage':>9} (ms, reselect) | share: {'every@' + str(a.interval):>8} "
          f"{'tensor@' + str(a.interval):>9} {'two@' + str(a.interval):>7} {'two@' + str(a.steady_interval):>7} "
          f"{'mean@' + str(a.interval):>7} | "
          f"{'+qblocks ms':>11} {'speedup':>7} {'two@' + str(a.interval):>7} {'two@' + str(a.steady_interval):>7}")
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
            t_full = timeit(lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True), dev, a.repeats)
            for budget in a.budgets:
                if budget >= length:
                    continue
                indptr, pos = select_decode_kv_batched(rq, pool_k, slots, lens, budget=budget)
                t_sel = timeit(lambda: attend(q, pool_k, pool_v, slots, indptr, pos), dev, a.repeats)
                # The padded-tensor path side by side (on the CPU ``attend`` is the fused kernel or the compiled loop).
                t_tensor_step = (timeit(lambda: batched_decode_attention(q, pool_k, pool_v, slots, indptr, pos,
                                                                          method="tensor"), dev, a.repeats)
                                 if dev.type == "cpu" else float("nan"))
                t_every = reselect_time(pool_k, slots, rq, budget, a.interval, 0, dev, repeats=a.repeats)
                t_tensor = reselect_time(pool_k, slots, rq, budget, a.interval, CANDIDATE_FACTOR, dev, "tensor", repeats=a.repeats)
                t_two = reselect_time(pool_k, slots, rq, budget, a.interval, CANDIDATE_FACTOR, dev, repeats=a.repeats)
                t_mean = reselect_time(pool_k, slots, rq, budget, a.interval, CANDIDATE_FACTOR, dev, pooling="all",
                                        repeats=a.repeats)
                t_qb = (query_block_step_time(pool_k, pool_v, slots, rq, q, budget, a.query_blocks, dev, attend,
                                              a.repeats)
                        if a.query_blocks else float("nan"))
                print(f"{length:>6} {budget:>5} {batch:>5} {t_full * 1e3:>8.3f} {t_sel * 1e3:>8.3f} "
                      f"{t_tensor_step * 1e3:>7.3f} "
                      f"{t_full / t_sel:>7.2f}x {goal * length / budget:>5.1f}x | {t_every * 1e3:>9.2f} "
                      f"{t_tensor * 1e3:>7.2f} {t_two * 1e3:>9.2f}                | "
                      f"{share(t_every, a.interval, t_sel):>15.1%} {share(t_tensor, a.interval, t_sel):>9.1%} "
                      f"{share(t_two, a.interval, t_sel):>7.1%} {share(t_two, a.steady_interval, t_sel):>7.1%} "
                      f"{share(t_mean, a.interval, t_sel):>7.1%} | {t_qb * 1e3:>11.3f} {t_full / t_qb:>6.2f}x "
                      f"{share(t_two, a.interval, t_qb):>7.1%} {share(t_two, a.steady_interval, t_qb):>7.1%}",
                      flush=True)


if __name__ == "__main__":
    main()
