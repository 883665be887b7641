"""The planner's per-segment loops, compiled for the CPU (numba).

On a GPU the planner is batched tensor code (``select.py``); on a CPU the
same work as tensor ops is a dozen passes over arrays of tens of MB with
random gathers, and this 2-core machine spends more time moving memory than
computing.  Here each ``(head, segment)`` problem is one loop nest over its 8
sampled rows (``8 x n_ctx`` floats, cache-resident), parallel over problems:

* ``segment_masses``: every line's standalone mass (column sums, and
  diagonal sums read backwards along each row), one pass over the samples;
* ``greedy_lines``: the greedy itself, lines taken in decreasing mass from a
  heap, each adding the mass of its cells not already covered by a chosen line
  of the other kind (8 lookups), until the union covers the target.  That is
  the exact union coverage by definition, in ``O(k * rows)`` per problem
  after an ``O(n_ctx)`` heap build.

Both give the same lines as ``select.segment_lines`` (tests compare them; the
order of equal masses aside).  numba is a dependency of SGLang; the loops
compile on first use (seconds, cached on disk) and ``available()`` is False
where numba cannot be imported, and the tensor path runs.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .workspace import scratch

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba ships with SGLang
    numba = None
else:
    # numba's OpenMP layer runs its own OpenMP runtime beside torch's: measured
    # here, torch's attention ran 3x slower after one parallel loop (the two
    # runtimes' threads fight over the cores).  The workqueue layer's threads
    # sleep between calls.  It takes one parallel launch at a time: ``_lock``.
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"

_lock = threading.Lock()


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(parallel=True, cache=True, fastmath=False, nogil=True)
    def _segment_masses(probs, positions, rows_per_segment, mass):
        n_heads, n_rows, n_ctx = probs.shape
        n_seg = mass.shape[1]
        for problem in prange(n_heads * n_seg):
            h = problem // n_seg
            g = problem % n_seg
            col = mass[h, g, :n_ctx]
            diag = mass[h, g, n_ctx:]
            col[:] = 0.0
            diag[:] = 0.0
            for i in range(rows_per_segment):
                s = g * rows_per_segment + i
                if s >= n_rows:
                    break
                p = probs[h, s]
                pos = positions[s]
                for j in range(pos + 1):
                    col[j] += p[j]
                for t in range(pos + 1):
                    diag[t] += p[pos - t]

    #: Lines are bucketed by the top 11 bits of their float32 mass (exponent and 3
    #: mantissa bits: buckets 9% wide), then each bucket sorted when reached.
    _BUCKET_SHIFT = 20
    _N_BUCKETS = 1 << 11

    @njit(parallel=True, cache=True, fastmath=False, nogil=True)
    def _greedy_lines(mass, mass_bits, probs, positions, rows_per_segment, sink, local, fraction,
                      lines, counts, ranked, col_on, diag_on):
        """Per problem ``(h, g)`` (``mass [P, 2n]``: columns, then diagonals): the lines in the
        order taken into ``lines``, their number into ``counts``.  ``ranked``, ``col_on`` and
        ``diag_on`` are scratch of the same leading shape."""
        n_problems, n_lines = mass.shape
        n_ctx = n_lines // 2
        n_rows = probs.shape[1]
        n_seg = n_problems // probs.shape[0]
        for problem in prange(n_problems):
            h = problem // n_seg
            g = problem % n_seg
            m = mass[problem]
            bits = mass_bits[problem]
            out = lines[problem]
            order = ranked[problem]
            col = col_on[problem]
            diag = diag_on[problem]
            col[:] = False
            diag[:] = False
            first = g * rows_per_segment
            last = min(first + rows_per_segment, n_rows)
            total = 0.0
            for j in range(n_ctx):  # every cell lies in one column
                total += m[j]
            goal = fraction * total
            covered = 0.0
            k = 0
            # Forced lines come first (sink columns, local diagonals); the others are
            # counting-sorted by bucket, highest first.
            n_sink = min(sink, n_ctx)
            n_local = min(local, n_ctx)
            start = np.zeros(_N_BUCKETS + 1, dtype=np.int64)
            for line in range(n_lines):
                if line < n_sink or (line >= n_ctx and line < n_ctx + n_local):
                    continue
                start[_N_BUCKETS - 1 - (bits[line] >> _BUCKET_SHIFT)] += 1
            placed = 0
            for b in range(_N_BUCKETS):
                c = start[b]
                start[b] = placed
                placed += c
            start[_N_BUCKETS] = placed
            fill = start.copy()
            for line in range(n_lines):
                if line < n_sink or (line >= n_ctx and line < n_ctx + n_local):
                    continue
                b = _N_BUCKETS - 1 - (bits[line] >> _BUCKET_SHIFT)
                order[fill[b]] = line
                fill[b] += 1
            n_forced = n_sink + n_local
            b = 0
            at = 0  # next position in ``order``
            end = 0  # end of the current, sorted bucket
            i = 0
            while True:
                if i < n_forced:
                    line = i if i < n_sink else n_ctx + (i - n_sink)
                    i += 1
                else:
                    if covered >= goal:
                        break
                    if at == end:  # sort the next non-empty bucket by mass, descending
                        while b < _N_BUCKETS and start[b] == start[b + 1]:
                            b += 1
                        if b == _N_BUCKETS:
                            break
                        at, end = start[b], start[b + 1]
                        if end - at > 32:
                            seg = order[at:end].copy()
                            keys = np.empty(end - at, dtype=np.float32)
                            for x in range(end - at):
                                keys[x] = -m[seg[x]]
                            perm = np.argsort(keys, kind="mergesort")
                            for x in range(end - at):
                                order[at + x] = seg[perm[x]]
                        else:  # insertion sort, stable: equal masses keep the lower line first
                            for x in range(at + 1, end):
                                item = order[x]
                                value = m[item]
                                y = x - 1
                                while y >= at and m[order[y]] < value:
                                    order[y + 1] = order[y]
                                    y -= 1
                                order[y + 1] = item
                        b += 1
                    line = order[at]
                    at += 1
                gain = np.float64(m[line])
                if line < n_ctx:
                    for s in range(first, last):
                        delta = positions[s] - line
                        if delta >= 0 and diag[delta]:
                            gain -= probs[h, s, line]
                    col[line] = True
                else:
                    delta = line - n_ctx
                    for s in range(first, last):
                        j = positions[s] - delta
                        if j >= 0 and col[j]:
                            gain -= probs[h, s, j]
                    diag[delta] = True
                out[k] = line
                k += 1
                covered += gain
            counts[problem] = k

    @njit(parallel=True, cache=True, nogil=True)
    def _span_blocks(lines, counts, span_lo, span_hi, span_first_block, span_n_blocks, n_new, n_ctx,
                     block_size, promote, blocks, n_cols, span_cols, span_n_cols):
        """Pass 1, per ``(head, span)``: the union of the span's segment lines; each of its query
        blocks' visited key blocks into ``blocks [H*nqb, nkb]`` and its number of leftover
        columns into ``n_cols``; the span's columns, ascending, into ``span_cols``."""
        n_heads = lines.shape[0]
        n_span = span_lo.shape[0]
        n_qb = blocks.shape[0] // n_heads
        n_kb = blocks.shape[1]
        offset = n_ctx - n_new
        for task in prange(n_heads * n_span):
            h = task // n_span
            u = task % n_span
            col_on = np.zeros(n_ctx, dtype=np.bool_)
            diag_on = np.zeros(n_ctx, dtype=np.bool_)
            for g in range(span_lo[u], span_hi[u] + 1):
                for i in range(counts[h, g]):
                    line = lines[h, g, i]
                    if line < n_ctx:
                        col_on[line] = True
                    else:
                        diag_on[line - n_ctx] = True
            cols = span_cols[task]
            nc = 0
            per_block = np.zeros(n_kb, dtype=np.int32)
            for j in range(n_ctx):
                if col_on[j]:
                    cols[nc] = j
                    nc += 1
                    per_block[j // block_size] += 1
            span_n_cols[task] = nc
            diags = np.empty(n_ctx, dtype=np.int64)
            nd = 0
            for d in range(n_ctx):
                if diag_on[d]:
                    diags[nd] = d
                    nd += 1
            for b in range(span_first_block[u], span_first_block[u] + span_n_blocks[u]):
                row = blocks[h * n_qb + b]
                row[:] = False
                q_first = offset + b * block_size
                q_last = min(q_first + block_size, n_ctx) - 1
                for x in range(nd):
                    d = diags[x]
                    if q_last - d < 0:
                        break
                    row[max(q_first - d, 0) // block_size] = True
                    row[(q_last - d) // block_size] = True
                for c in range(q_first // block_size, q_last // block_size + 1):
                    row[c] = True
                for c in range(q_first // block_size):
                    if per_block[c] >= promote:
                        row[c] = True
                left = 0
                for x in range(nc):
                    j = cols[x]
                    if j >= q_first:
                        break
                    if not row[j // block_size]:
                        left += 1
                n_cols[h * n_qb + b] = left

    @njit(parallel=True, cache=True, nogil=True)
    def _span_columns(span_first_block, span_n_blocks, n_new, n_ctx, block_size, blocks, col_indptr,
                      span_cols, span_n_cols, col_indices):
        """Pass 2, per ``(head, span)``: each query block's leftover columns into the CSR."""
        n_span = span_first_block.shape[0]
        n_heads = span_cols.shape[0] // n_span
        n_qb = blocks.shape[0] // n_heads
        offset = n_ctx - n_new
        for task in prange(n_heads * n_span):
            h = task // n_span
            u = task % n_span
            cols = span_cols[task]
            for b in range(span_first_block[u], span_first_block[u] + span_n_blocks[u]):
                pair = h * n_qb + b
                row = blocks[pair]
                q_first = offset + b * block_size
                at = col_indptr[pair]
                for x in range(span_n_cols[task]):
                    j = cols[x]
                    if j >= q_first:
                        break
                    if not row[j // block_size]:
                        col_indices[at] = j
                        at += 1


def segment_masses(probs: torch.Tensor, positions: torch.Tensor, rows_per_segment: int) -> torch.Tensor:
    """``[H, G, 2 n_ctx]`` float32: per segment of ``probs [H, S, n_ctx]`` the mass of every
    column, then of every diagonal."""
    n_heads, n_rows, n_ctx = probs.shape
    n_seg = -(-n_rows // rows_per_segment)
    mass = torch.empty(n_heads, n_seg, 2 * n_ctx, dtype=torch.float32)
    with _lock:
        _segment_masses(probs.contiguous().numpy(), positions.contiguous().numpy(), rows_per_segment,
                        mass.numpy())
    return mass


def greedy_lines(mass: torch.Tensor, probs: torch.Tensor, positions: torch.Tensor, rows_per_segment: int,
                 sink: int, local: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lines [P, 2n] int32, counts [P])``: per problem of ``mass [P, 2 n_ctx]`` the lines in
    the order taken (the first ``counts[p]`` are valid), until their union covers ``fraction``
    of the problem's mass."""
    n_problems, n_lines = mass.shape
    lines = scratch("cpu_loops.lines", (n_problems, n_lines), torch.int32, "cpu")
    ranked = scratch("cpu_loops.ranked", (n_problems, n_lines), torch.int32, "cpu")
    col_on = scratch("cpu_loops.col_on", (n_problems, n_lines // 2), torch.bool, "cpu")
    diag_on = scratch("cpu_loops.diag_on", (n_problems, n_lines // 2), torch.bool, "cpu")
    counts = torch.empty(n_problems, dtype=torch.int64)
    with _lock:
        _greedy_lines(mass.numpy(), mass.view(torch.int32).numpy(), probs.numpy(), positions.numpy(),
                      rows_per_segment, sink, local, float(fraction), lines.numpy(), counts.numpy(),
                      ranked.numpy(), col_on.numpy(), diag_on.numpy())
    return lines, counts


def block_mask_arrays(lines: torch.Tensor, counts: torch.Tensor, block_segments, n_new: int, n_ctx: int,
                      block_size: int, promote: int):
    """``BlockMask.from_lines`` as loops: ``(blocks [H*nqb, nkb] bool, col_indptr, col_indices)``.

    ``block_segments``: the first and last segment of each query block
    (``VerticalSlashLines.block_segments()``); consecutive blocks with the same
    span share one union of lines.
    """
    g_lo, g_hi = block_segments
    n_heads = lines.shape[0]
    n_qb, n_kb = g_lo.numel(), -(-n_ctx // block_size)
    change = torch.ones(n_qb, dtype=torch.bool)
    change[1:] = (g_lo[1:] != g_lo[:-1]) | (g_hi[1:] != g_hi[:-1])
    first_block = change.nonzero().squeeze(1)
    n_blocks = torch.diff(first_block, append=torch.tensor([n_qb]))
    span_lo, span_hi = g_lo[first_block], g_hi[first_block]
    n_span = first_block.numel()
    lines32 = lines.to(torch.int32).contiguous()
    blocks = torch.empty(n_heads * n_qb, n_kb, dtype=torch.bool)
    n_cols = torch.empty(n_heads * n_qb, dtype=torch.int64)
    span_cols = scratch("cpu_loops.span_cols", (n_heads * n_span, n_ctx), torch.int32, "cpu")
    span_n_cols = torch.empty(n_heads * n_span, dtype=torch.int64)
    with _lock:
        _span_blocks(lines32.numpy(), counts.contiguous().numpy(), span_lo.numpy(), span_hi.numpy(),
                     first_block.numpy(), n_blocks.numpy(), n_new, n_ctx, block_size, promote,
                     blocks.numpy(), n_cols.numpy(), span_cols.numpy(), span_n_cols.numpy())
    col_indptr = torch.zeros(n_heads * n_qb + 1, dtype=torch.int64)
    torch.cumsum(n_cols, 0, out=col_indptr[1:])
    col_indices = torch.empty(int(col_indptr[-1]), dtype=torch.int32)
    with _lock:
        _span_columns(first_block.numpy(), n_blocks.numpy(), n_new, n_ctx, block_size, blocks.numpy(),
                      col_indptr.numpy(), span_cols.numpy(), span_n_cols.numpy(), col_indices.numpy())
    return blocks, col_indptr.to(torch.int32), col_indices
