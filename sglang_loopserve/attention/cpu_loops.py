"""The planner's per-segment loops, compiled for the CPU (numba).

On a GPU the planner is batched tensor code (``select.py``); on a CPU the
same work as tensor ops is a dozen passes over arrays of tens of MB with
random gathers, and this 2-core machine spends more time moving memory than
computing.  Here each ``(head, segment)`` problem is one loop nest over its 8
sampled rows (``8 x n_ctx`` floats, cache-resident), parallel over problems:

* ``segment_lines``: per problem, each sampled row's softmax taken from the
  estimate's logits as the row is read (``numba_rows``: bf16 widened by a
  shift, exp as a vectorised polynomial), so the ``H x S x n_ctx``
  probabilities are never written out; every line's standalone mass (column
  sums, and diagonal sums read backwards along each row) in the same pass;
  then the greedy itself: lines counting-sorted by mass bucket (only the
  buckets the greedy can reach are placed, and no line past the segment's last
  position: those hold no mass), each line adding the mass of its cells not
  already covered by a chosen line of the other kind (8 lookups, as 0/1
  factors: no branch to mispredict), until the union covers the target.
  That is the exact union coverage by definition, in ``O(k * rows)`` per
  problem after two ``O(n_ctx)`` passes.  A bucket is sorted by mass only
  where the greedy may stop in it: one whose lines' standalone masses cannot
  reach the target is taken whole, in line order (the same set; sorting such
  buckets would cost a fifth of the planner's time).
* ``block_mask_arrays``: per ``(head, span of segments)``, the union of the
  span's lines mapped to each query block's key blocks and leftover columns.

It gives the same lines as ``select.segment_lines`` (tests compare them as
sets; the order within a bucket taken whole differs).  numba is a dependency of SGLang; the loops
compile on first use (``numba_setup``); where numba cannot be imported the
tensor path runs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cpu_runtime.numba_rows import READS, numba_view
from ..cpu_runtime.numba_setup import available, lock as _lock, numba, njit  # noqa: F401 (available: re-exported)
from ..cpu_runtime.torch_threads import n_threads, parallel_for
from .workspace import scratch

if numba is not None:
    from ..cpu_runtime.numba_rows import exp_shifted, load_row, row_max

if numba is not None:

    #: Lines are bucketed by the top 11 bits of their float32 mass (exponent and 3
    #: mantissa bits: buckets 9% wide), then each bucket sorted when reached.
    _BUCKET_SHIFT = 20
    _N_BUCKETS = 1 << 11
    #: Only the buckets down to the one where the columns alone, or the diagonals
    #: alone, reach the goal are placed at first (columns are disjoint, and so are
    #: diagonals: the greedy stops there at the latest), plus 2 for rounding; the
    #: rest only if the greedy ever gets there.
    _FILL_MARGIN = 2

    @njit(inline="always")
    def _fill(bits, n_ctx, reach, n_sink, n_local, lo, hi, fill, order, candidates):
        """Place the lines of buckets ``lo..hi`` (forced ones excluded, and those of index
        ``reach`` on: no mass) at their slots, in line order within a bucket.  First the lines
        to place, listed without a branch (``candidates``: scratch), then only those scattered:
        a scatter over every line waits on its bucket's cursor whenever neighbours share one."""
        n = 0
        for first, last in ((n_sink, reach), (n_ctx + n_local, n_ctx + reach)):
            for line in range(first, last):
                b = _N_BUCKETS - 1 - (bits[line] >> _BUCKET_SHIFT)
                candidates[n] = line
                n += (b >= lo) & (b <= hi)
        for x in range(n):
            line = candidates[x]
            b = _N_BUCKETS - 1 - (bits[line] >> _BUCKET_SHIFT)
            order[fill[b]] = line
            fill[b] += 1

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})  # not inlined: its own flags
    def _add_row(row, n, softmax, out, col_m, diag_m, scratch):
        """``out[:n]`` = the softmax of ``row[:n]`` (float32 logits or bfloat16 bits), or
        ``row[:n]`` itself where ``softmax`` is False (a sample given as probabilities); added
        to the column masses ``col_m[j]`` and, read backwards, the diagonal masses ``diag_m[n-1-j]``."""
        x = out[:n]
        load_row(row[:n], x)
        inv = np.float32(1.0)
        if softmax:
            inv = inv / exp_shifted(x, row_max(x), scratch)
        for j in range(n):
            x[j] *= inv
            col_m[j] += x[j]
        for t in range(n):
            diag_m[t] += x[n - 1 - t]

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _sum(values):
        total = 0.0
        for j in range(values.shape[0]):
            total += values[j]
        return total

    @njit(cache=True, nogil=True)
    def _segment_problem(problem, thread, rows_in, softmax, positions, rows_per_segment, sink, local,
                         fraction, mass, lines, counts, ranked, col_on, diag_on, row_scratch, exp_scratch,
                         line_scratch, bucket_count, bucket_mass, bucket_start):
        """Problem ``(h, g)``, one loop nest: the softmax of its sampled rows (``rows_in [H, S,
        n_ctx]``: logits, or probabilities where ``softmax`` is False; each row read up to its
        position) into this thread's ``row_scratch``, the masses of its lines (``mass [H, G, 2n]``:
        columns, then diagonals), then the greedy: lines in the order taken (by mass, except within a
        bucket taken whole: there by line) into ``lines`` (not padded), their number into
        ``counts``.  ``ranked``, ``col_on``, ``diag_on``: per-problem scratch (the flags as floats,
        one spare slot each); ``row_scratch``, ``exp_scratch``, ``line_scratch``, ``bucket_*``:
        per-thread scratch."""
        n_ctx = rows_in.shape[2]
        n_rows = rows_in.shape[1]
        n_seg = mass.shape[1]
        h = problem // n_seg
        g = problem % n_seg
        first = g * rows_per_segment
        last = min(first + rows_per_segment, n_rows)
        probs = row_scratch[thread]  # the segment's rows: probs[s - first]
        m = mass[h, g]
        col_m = m[:n_ctx]
        diag_m = m[n_ctx:]
        m[:] = 0.0
        for s in range(first, last):
            _add_row(rows_in[h, s], positions[s] + 1, softmax, probs[s - first], col_m, diag_m,
                     exp_scratch[thread])
        bits = m.view(np.int32)
        out = lines[problem]
        order = ranked[problem]
        candidates = line_scratch[thread]
        col = col_on[problem]
        diag = diag_on[problem]
        col[:] = 0.0
        diag[:] = 0.0
        start = bucket_start[thread]
        fill = bucket_count[thread]
        bmass = bucket_mass[thread]
        goal = fraction * _sum(col_m)  # every cell lies in one column
        # Forced lines come first (sink columns, local diagonals); the others are
        # counting-sorted by bucket, highest first.
        n_sink = min(sink, n_ctx)
        n_local = min(local, n_ctx)
        n_forced = n_sink + n_local
        fill[:] = 0
        bmass[:] = 0.0  # [:NB] columns, [NB:] diagonals
        col_reach = 0.0
        diag_reach = 0.0
        for line in range(n_sink):
            col_reach += m[line]
        for line in range(n_ctx, n_ctx + n_local):
            diag_reach += m[line]
        # Column j and diagonal j in one pass, each kind counted in its own half of ``fill``
        # (two independent chains of increments: neighbouring lines often share a bucket).
        # Columns after the segment's last position and diagonals longer than it hold no
        # mass: the greedy stops before it would reach them, so they are not even bucketed.
        reach = positions[last - 1] + 1
        for j in range(min(n_sink, n_local), reach):
            if j >= n_sink:
                b = _N_BUCKETS - 1 - (bits[j] >> _BUCKET_SHIFT)
                fill[b] += 1
                bmass[b] += m[j]
            if j >= n_local:
                b = _N_BUCKETS - 1 - (bits[n_ctx + j] >> _BUCKET_SHIFT)
                fill[_N_BUCKETS + 1 + b] += 1
                bmass[_N_BUCKETS + b] += m[n_ctx + j]
        for b in range(_N_BUCKETS):
            fill[b] += fill[_N_BUCKETS + 1 + b]
        placed = 0
        cut = _N_BUCKETS - 1
        for b in range(_N_BUCKETS):
            c = fill[b]
            start[b] = placed
            fill[b] = placed
            placed += c
            if cut == _N_BUCKETS - 1:
                col_reach += bmass[b]
                diag_reach += bmass[_N_BUCKETS + b]
                if col_reach >= goal or diag_reach >= goal:
                    cut = b
        start[_N_BUCKETS] = placed
        filled = min(cut + _FILL_MARGIN, _N_BUCKETS - 1)
        _fill(bits, n_ctx, reach, n_sink, n_local, 0, filled, fill, order, candidates)
        covered = 0.0
        k = 0
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
                if at == end:  # the next non-empty bucket
                    while b < _N_BUCKETS and start[b] == start[b + 1]:
                        b += 1
                    if b == _N_BUCKETS:
                        break
                    if b > filled:  # rare: the union needs lines below the margin
                        _fill(bits, n_ctx, reach, n_sink, n_local, filled + 1, _N_BUCKETS - 1, fill, order,
                              candidates)
                        filled = _N_BUCKETS - 1
                    at, end = start[b], start[b + 1]
                    # Sorted by mass only if the greedy may stop in it: a bucket whose standalone
                    # masses leave the goal unreached is taken whole, whatever the order.
                    may_stop = covered + bmass[b] + bmass[_N_BUCKETS + b] >= goal * (1.0 - 1e-9)
                    if may_stop and end - at > 32:  # by mass, descending
                        seg = order[at:end].copy()
                        keys = np.empty(end - at, dtype=np.float32)
                        for x in range(end - at):
                            keys[x] = -m[seg[x]]
                        perm = np.argsort(keys, kind="mergesort")
                        for x in range(end - at):
                            order[at + x] = seg[perm[x]]
                    elif may_stop:  # insertion sort, stable: equal masses keep the lower line first
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
            # The cells of this line already covered by a chosen line of the other kind: flags
            # read as 0/1 factors (a spare slot for cells before key 0), no branch per row.
            overlap = 0.0
            if line < n_ctx:
                for s in range(first, last):
                    delta = positions[s] - line
                    overlap += probs[s - first, line if delta >= 0 else 0] * diag[delta if delta >= 0 else n_ctx]
                col[line] = 1.0
            else:
                delta = line - n_ctx
                for s in range(first, last):
                    j = positions[s] - delta
                    overlap += probs[s - first, max(j, 0)] * col[j if j >= 0 else n_ctx]
                diag[delta] = 1.0
            out[k] = line
            k += 1
            covered += np.float64(m[line]) - overlap
        counts[problem] = k  # the wrapper pads the rows up to the longest: not n_lines here

    @njit(cache=True, nogil=True)
    def _key_mass(h, thread, mass, key_mass):
        """Head ``h``: the sampled mass of each key, its column masses summed over the segments
        (rows of contiguous columns: the inner loop vectorises)."""
        n_ctx = key_mass.shape[1]
        km = key_mass[h]
        km[:] = 0.0
        for g in range(mass.shape[1]):
            col_m = mass[h, g]
            for j in range(n_ctx):
                km[j] += col_m[j]

    @njit(cache=True, nogil=True)
    def _span_blocks(task, thread, lines, counts, span_lo, span_hi, span_first_block, span_n_blocks, n_new,
                     n_ctx, block_size, promote, blocks, n_cols, span_cols, span_n_cols, col_on, diag_on, diags,
                     per_block):
        """Pass 1, task ``(head, span)``: the union of the span's segment lines; each of its query
        blocks' visited key blocks into ``blocks [H*nqb, nkb]`` and its number of leftover
        columns into ``n_cols``; the span's columns, ascending, into ``span_cols``.  ``col_on``,
        ``diag_on`` (all False on entry, left so), ``diags``, ``per_block``: per-thread scratch."""
        n_heads = lines.shape[0]
        n_span = span_lo.shape[0]
        n_qb = blocks.shape[0] // n_heads
        offset = n_ctx - n_new
        h = task // n_span
        u = task % n_span
        col = col_on[thread]
        diag = diag_on[thread]
        found = diags[thread]
        in_block = per_block[thread]
        for g in range(span_lo[u], span_hi[u] + 1):
            for i in range(counts[h, g]):
                line = lines[h, g, i]
                if line < n_ctx:
                    col[line] = True
                else:
                    diag[line - n_ctx] = True
        # Both lists ascending by a scan that writes every index and advances on a flag: no
        # branch to mispredict; the flags are cleared as they are listed.
        cols = span_cols[task]
        nc = 0
        for j in range(n_ctx):
            cols[nc] = j
            nc += col[j]
        span_n_cols[task] = nc
        nd = 0
        for d in range(n_ctx):
            found[nd] = d
            nd += diag[d]
        in_block[:] = 0
        for x in range(nc):
            col[cols[x]] = False
            in_block[cols[x] // block_size] += 1
        for x in range(nd):
            diag[found[x]] = False
        for b in range(span_first_block[u], span_first_block[u] + span_n_blocks[u]):
            row = blocks[h * n_qb + b]
            row[:] = False
            q_first = offset + b * block_size
            q_last = min(q_first + block_size, n_ctx) - 1
            for x in range(nd):
                d = found[x]
                if q_last - d < 0:
                    break
                row[max(q_first - d, 0) // block_size] = True
                row[(q_last - d) // block_size] = True
            for c in range(q_first // block_size, q_last // block_size + 1):
                row[c] = True
            for c in range(q_first // block_size):
                if in_block[c] >= promote:
                    row[c] = True
            left = 0
            for x in range(nc):
                j = cols[x]
                if j >= q_first:
                    break
                left += not row[j // block_size]
            n_cols[h * n_qb + b] = left

    @njit(cache=True, nogil=True)
    def _span_columns(task, thread, span_first_block, span_n_blocks, n_new, n_ctx, block_size, blocks,
                      col_indptr, span_cols, span_n_cols, col_indices):
        """Pass 2, task ``(head, span)``: each query block's leftover columns into the CSR."""
        n_span = span_first_block.shape[0]
        n_heads = span_cols.shape[0] // n_span
        n_qb = blocks.shape[0] // n_heads
        offset = n_ctx - n_new
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


def segment_lines(rows: torch.Tensor, positions: torch.Tensor, rows_per_segment: int, sink: int,
                  local: int, fraction: float, softmax: bool = False):
    """Per problem ``(h, g)`` of ``rows [H, S, n_ctx]`` (``g``: a segment of ``rows_per_segment``
    sampled rows) the lines in the order taken until their union covers ``fraction`` of the
    segment's mass: ``(lines [H*G, L] int32, padded with 2 n_ctx; counts [H*G] int64;
    key_mass [H, n_ctx])``.  ``rows``: probabilities, or (``softmax``) the logits they are the
    causal softmax of (float32 or bfloat16; row ``s`` is read up to ``positions[s]``)."""
    if rows.dtype not in READS:
        raise TypeError(f"rows must be float32 or bfloat16, got {rows.dtype}")
    n_heads, n_rows, n_ctx = rows.shape
    n_seg = -(-n_rows // rows_per_segment)
    n_problems, n_lines = n_heads * n_seg, 2 * n_ctx
    mass = scratch("cpu_loops.mass", (n_heads, n_seg, n_lines), torch.float32, "cpu")
    lines = scratch("cpu_loops.lines", (n_problems, n_lines), torch.int32, "cpu")
    ranked = scratch("cpu_loops.ranked", (n_problems, n_lines), torch.int32, "cpu")
    col_on = scratch("cpu_loops.col_on", (n_problems, n_ctx + 1), torch.float32, "cpu")
    diag_on = scratch("cpu_loops.diag_on", (n_problems, n_ctx + 1), torch.float32, "cpu")
    threads = n_threads()
    row_scratch = scratch("cpu_loops.rows", (threads, rows_per_segment, n_ctx), torch.float32, "cpu")
    exp_scratch = scratch("cpu_loops.exp", (threads, n_ctx), torch.int32, "cpu")
    line_scratch = scratch("cpu_loops.candidates", (threads, n_lines), torch.int32, "cpu")
    bucket_count = scratch("cpu_loops.bucket_count", (threads, 2 * _N_BUCKETS + 1), torch.int64, "cpu")
    bucket_start = scratch("cpu_loops.bucket_start", (threads, _N_BUCKETS + 1), torch.int64, "cpu")
    bucket_mass = scratch("cpu_loops.bucket_mass", (threads, 2 * _N_BUCKETS), torch.float64, "cpu")
    counts = torch.empty(n_problems, dtype=torch.int64)
    key_mass = torch.empty(n_heads, n_ctx, dtype=torch.float32)
    mass_np = mass.numpy()
    with _lock:
        parallel_for(_segment_problem, n_problems, numba_view(rows.contiguous()), bool(softmax),
                     positions.contiguous().numpy(), rows_per_segment, sink, local, float(fraction), mass_np,
                     lines.numpy(), counts.numpy(), ranked.numpy(), col_on.numpy(), diag_on.numpy(),
                     row_scratch.numpy(), exp_scratch.numpy(), line_scratch.numpy(), bucket_count.numpy(),
                     bucket_mass.numpy(), bucket_start.numpy())
        parallel_for(_key_mass, n_heads, mass_np, key_mass.numpy())
    width = max(int(counts.max()), 1)
    taken = torch.arange(width)[None, :] < counts[:, None]
    return torch.where(taken, lines[:, :width], n_lines), counts, key_mass


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
    span_cols = scratch("cpu_loops.span_cols", (n_heads * n_span, n_ctx + 1), torch.int32, "cpu")
    span_n_cols = torch.empty(n_heads * n_span, dtype=torch.int64)
    threads = n_threads()
    col_on = torch.zeros(threads, n_ctx, dtype=torch.bool)
    diag_on = torch.zeros(threads, n_ctx, dtype=torch.bool)
    diags = scratch("cpu_loops.diags", (threads, n_ctx + 1), torch.int32, "cpu")
    per_block = scratch("cpu_loops.per_block", (threads, n_kb), torch.int32, "cpu")
    with _lock:
        parallel_for(_span_blocks, n_heads * n_span, lines32.numpy(), counts.contiguous().numpy(),
                     span_lo.numpy(), span_hi.numpy(), first_block.numpy(), n_blocks.numpy(), n_new, n_ctx,
                     block_size, promote, blocks.numpy(), n_cols.numpy(), span_cols.numpy(),
                     span_n_cols.numpy(), col_on.numpy(), diag_on.numpy(), diags.numpy(), per_block.numpy())
    col_indptr = torch.zeros(n_heads * n_qb + 1, dtype=torch.int64)
    torch.cumsum(n_cols, 0, out=col_indptr[1:])
    col_indices = torch.empty(int(col_indptr[-1]), dtype=torch.int32)
    with _lock:
        parallel_for(_span_columns, n_heads * n_span, first_block.numpy(), n_blocks.numpy(), n_new, n_ctx,
                     block_size, blocks.numpy(), col_indptr.numpy(), span_cols.numpy(), span_n_cols.numpy(),
                     col_indices.numpy())
    return blocks, col_indptr.to(torch.int32), col_indices
