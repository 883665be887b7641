"""The decode's two CPU loops, each one compiled call (numba): a re-selection,
and attention over selected positions.

The two-stage re-selection (``decode.select_decode_kv_pruned``: key-block
summaries pick candidates, exact scores among them) is two dozen small torch
ops; on a CPU each costs tens of microseconds whatever its size, so as torch
ops a re-selection takes 2-5 ms where its arithmetic needs a tenth of that.  Here the
same steps run per KV head in one loop nest (parallel over heads): bring the
block summaries up to date, score the blocks, take the best, read the
candidates' keys through their slots, score them, keep the top ``budget``
(selection by ``np.partition``, not a sort) and measure how much of the new
selection's mass the previous one held.  Keys are read in place (float32 rows
as they are, bfloat16 rows widened by a shift of their bits), so the KV pool is
never converted.

Same selection as the torch path (tests compare them; ties of equal scores
aside, which neither orders).

Attention over a selection (``sparse_decode``) reads each selected key and
value row once, through its slot, in chunks of the selection (parallel over
(request, KV head, chunk), merged by their softmax maxima and sums): the torch
path's gather copies the rows first and its batched matmuls of a few queries
cost more in overhead than in arithmetic (measured: 1.2 ms a layer for 1,040
positions x 3 KV heads where this needs a tenth).
"""

from __future__ import annotations

import numpy as np
import torch

from ..cpu_runtime.numba_rows import READS, numba_view
from ..cpu_runtime.numba_setup import available, lock, numba, njit
from ..cpu_runtime.torch_threads import parallel_for
from . import summaries as summaries_module
from .summaries import block_parts

if numba is not None:
    from ..cpu_runtime.numba_rows import exp_shifted, float_row, row_max

#: Tasks per head of the heavy stages (at most, for attention over a selection).
_CHUNKS = 4


def supports(k_buffer: torch.Tensor) -> bool:
    return available() and k_buffer.device.type == "cpu" and k_buffer.dtype in READS


if numba is not None:

    @njit(inline="always", fastmath={"reassoc", "contract"})
    def _softmax_sum_into(logits, acc, scratch):
        """``acc += softmax(logits)`` for a row of float32 logits (``-inf``: masked), ``logits``
        overwritten."""
        inv = np.float32(1.0) / exp_shifted(logits, row_max(logits), scratch)
        for c in range(logits.shape[0]):
            acc[c] += logits[c] * inv

    @njit(inline="always")
    def _top(values, count, keep, out):
        """Indices of the ``keep`` largest of ``values[:count]``, ascending, into ``out``
        (at a tie with the threshold, the lower indices)."""
        if keep >= count:
            for i in range(count):
                out[i] = i
            return count
        thr = np.partition(values[:count].copy(), count - keep)[count - keep]
        n = 0
        for i in range(count):
            if values[i] > thr:
                n += 1
        ties = keep - n
        n = 0
        for i in range(count):
            v = values[i]
            if v > thr or (v == thr and ties > 0):
                if v == thr:
                    ties -= 1
                out[n] = i
                n += 1
        return n

    # Reassociation lets the dot products vectorize (a float32 sum in strict order waits on
    # each add); infinities stay meaningful (masked logits), so no "ninf"/"nnan".  The
    # re-selection's five stages, each a task body for ``parallel_for``; the heavy ones (2 and 4)
    # run over (head, chunk) tasks: a few heads on two cores would leave one idle half the time.
    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _update_summaries(h, thread, k_pool, slots, storage, first_block, length, block):
        """1. Head ``h``'s summaries of the blocks with new keys (the last, partial one is redone):
        per dimension the keys' maxima, their minima, then their mean."""
        d = storage.shape[2] // 3
        buf = np.empty(d, dtype=np.uint32)
        for b in range(first_block, -(-length // block)):
            hi = storage[h, b, :d]
            lo = storage[h, b, d:2 * d]
            mean = storage[h, b, 2 * d:]
            end = min((b + 1) * block, length)
            for pos in range(b * block, end):
                key = float_row(k_pool[slots[pos], h], buf)
                if pos == b * block:
                    hi[:] = key
                    lo[:] = key
                    mean[:] = key
                else:
                    for x in range(d):
                        hi[x] = max(hi[x], key[x])
                        lo[x] = min(lo[x], key[x])
                        mean[x] += key[x]
            inv = np.float32(1.0) / np.float32(end - b * block)
            for x in range(d):
                mean[x] *= inv

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _block_logits(task, thread, split, storage, bound):
        """2. Each block's logit per query (``summaries.block_parts``): the query's weighted positive
        parts times the block's maxima, its negative parts times the minima, itself times the mean."""
        n_bq, n_blocks = bound.shape[1], bound.shape[2]
        h = task // _CHUNKS
        chunk = -(-n_blocks // _CHUNKS)
        for b in range((task % _CHUNKS) * chunk, min((task % _CHUNKS + 1) * chunk, n_blocks)):
            row = storage[h, b]
            for i in range(n_bq):
                acc = np.float32(0.0)
                for x in range(split.shape[2]):
                    acc += split[h, i, x] * row[x]
                bound[h, i, b] = acc

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _candidate_blocks(h, thread, bound, sink, recent, length, block, cand):
        """3. Head ``h``: the blocks' mass (softmax of their logits over blocks per query, summed), the best
        ``take`` blocks (sink and recent ones first) and their positions (past the cache: ``length``)."""
        n_blocks = bound.shape[2]
        n_cand = cand.shape[1]
        take = n_cand // block
        sink_blocks = -(-sink // block)
        recent_block = (length - recent) // block
        mass = np.zeros(n_blocks, dtype=np.float32)
        exponents = np.empty(n_blocks, dtype=np.int32)
        for i in range(bound.shape[1]):
            _softmax_sum_into(bound[h, i], mass, exponents)
        for b in range(n_blocks):
            if b < sink_blocks or b >= recent_block:
                mass[b] = np.inf
        chosen = np.empty(take, dtype=np.int64)
        _top(mass, n_blocks, take, chosen)
        for c in range(n_cand):
            cand[h, c] = min(chosen[c // block] * block + c % block, length)

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _candidate_logits(task, thread, queries, qpos, k_pool, slots, cand, length, logits):
        """4. The candidates' logits, their keys read through their slots (-inf: past the cache,
        or after the query)."""
        n_q, d = queries.shape[1], queries.shape[2]
        n_cand = cand.shape[1]
        h = task // _CHUNKS
        chunk = -(-n_cand // _CHUNKS)
        buf = np.empty(d, dtype=np.uint32)
        key = buf.view(np.float32)
        for c in range((task % _CHUNKS) * chunk, min((task % _CHUNKS + 1) * chunk, n_cand)):
            pos = cand[h, c]
            if pos < length:
                key = float_row(k_pool[slots[pos], h], buf)
            for i in range(n_q):
                if pos >= length or pos > qpos[i]:
                    logits[h, i, c] = -np.inf
                    continue
                acc = np.float32(0.0)
                for x in range(d):
                    acc += queries[h, i, x] * key[x]
                logits[h, i, c] = acc

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _keep_top(h, thread, logits, cand, length, sink, recent, previous, n_previous, kept, kept_mass, held):
        """5. Head ``h``: the candidates' mass, the top ``budget`` ascending (candidates ascend) and
        the share of their mass the previous selection held."""
        n_cand = cand.shape[1]
        budget = kept.shape[1]
        score = np.zeros(n_cand, dtype=np.float32)
        exponents = np.empty(n_cand, dtype=np.int32)
        for i in range(logits.shape[1]):
            _softmax_sum_into(logits[h, i], score, exponents)
        ranked = np.empty(n_cand, dtype=np.float32)
        for c in range(n_cand):
            pos = cand[h, c]
            if pos >= length:
                score[c] = -np.inf
                ranked[c] = -np.inf
            elif pos < sink or pos >= length - recent:
                ranked[c] = np.inf
            else:
                ranked[c] = score[c]
        at = np.empty(budget, dtype=np.int64)
        _top(ranked, n_cand, budget, at)
        num = 0.0
        den = 0.0
        for j in range(budget):
            pos = cand[h, at[j]]
            m = score[at[j]]
            kept[h, j] = pos
            kept_mass[h, j] = m
            if n_previous > 0 and np.isfinite(m):
                den += m
                k = np.searchsorted(previous[h, :n_previous], pos)
                if k < n_previous and previous[h, k] == pos:
                    num += m
        held[h, 0] = num
        held[h, 1] = den

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _decode_chunk(task, thread, q, k_pool, v_pool, slots, indptr, positions, n_chunks, part_max, part_sum,
                      part_acc):
        """Task ``(request, KV head, chunk)``: the chunk's softmax maximum, sum and weighted values."""
        n_kv, group, d = q.shape[1], q.shape[2], q.shape[3]
        seg = task // n_chunks
        r, h = seg // n_kv, seg % n_kv
        start, end = indptr[seg], indptr[seg + 1]
        span = -(-(end - start) // n_chunks)
        lo = start + (task % n_chunks) * span
        n = min(end, lo + span) - lo
        if n <= 0:
            part_max[task, :] = -np.inf
            return
        buf = np.empty(d, dtype=np.uint32)
        qh = q[r, h]
        logits = np.empty((group, n), dtype=np.float32)
        scratch = np.empty(n, dtype=np.int32)
        # Rows are copied first, in a loop of independent loads the CPU overlaps (a row's
        # address waits on two index loads; reading and scoring each in turn stalls on every one).
        rows = np.empty((n, d), dtype=np.float32)
        for j in range(n):
            rows[j] = float_row(k_pool[slots[r, positions[lo + j]], h], buf)
        for j in range(n):
            for g in range(group):
                acc = np.float32(0.0)
                for x in range(d):
                    acc += qh[g, x] * rows[j, x]
                logits[g, j] = acc
        for g in range(group):
            top = row_max(logits[g])
            part_max[task, g] = top
            part_sum[task, g] = exp_shifted(logits[g], top, scratch)
        for j in range(n):
            rows[j] = float_row(v_pool[slots[r, positions[lo + j]], h], buf)
        acc_v = part_acc[task]
        for j in range(n):
            for g in range(group):
                p = logits[g, j]
                for x in range(d):
                    acc_v[g, x] += p * rows[j, x]

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _decode_merge(seg, thread, part_max, part_sum, part_acc, n_chunks, n_kv, out):
        """Task ``(request, KV head)``: its chunks merged by their softmax maxima and sums."""
        group, d = part_acc.shape[1], part_acc.shape[2]
        r, h = seg // n_kv, seg % n_kv
        for g in range(group):
            top = -np.inf
            for c in range(n_chunks):
                top = max(top, part_max[seg * n_chunks + c, g])
            total = np.float32(0.0)
            out[r, h * group + g, :] = 0.0
            for c in range(n_chunks):
                t = seg * n_chunks + c
                if part_sum[t, g] > 0:
                    w = np.float32(np.exp(part_max[t, g] - top))
                    total += w * part_sum[t, g]
                    for x in range(d):
                        out[r, h * group + g, x] += w * part_acc[t, g, x]
            if total > 0:
                for x in range(d):
                    out[r, h * group + g, x] /= total


if numba is not None:

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _query_block_rows(h, thread, q, scale, weight, storage, n_blocks, block, held, whole, selection,
                          selected_at, length, extra, out):
        """Head ``h``: ``out[h] = selection[h]``, then the first ``extra`` positions the selection does
        not hold, walking the blocks by descending mass (``KeySummaries.block_mass``; ties: the lower
        block first), then the positions ``selected_at..length-1``.  ``q [Hk, g, d]``: the step's
        query heads by KV head, unscaled; their ``block_parts`` (``scale``, ``weight``) are built here."""
        n_kv, group, d = q.shape
        n_sel = selection.shape[1]
        parts = np.empty((group, 3 * d), dtype=np.float32)
        for g in range(group):
            for x in range(d):
                v = np.float32(q[h, g, x] * scale)
                parts[g, x] = max(v, np.float32(0.0)) * weight
                parts[g, d + x] = min(v, np.float32(0.0)) * weight
                parts[g, 2 * d + x] = v * (np.float32(1.0) - weight)
        logits = np.empty((group, n_blocks), dtype=np.float32)
        mass = np.zeros(n_blocks, dtype=np.float32)
        exponents = np.empty(n_blocks, dtype=np.int32)
        # Enough ranked blocks for ``extra`` positions unless the selection holds much of them;
        # the rest are ranked only when the walk gets there.
        first = min(n_blocks, 2 * (-(-extra // block)) + 2)
        idx = np.empty(n_blocks, dtype=np.int64)
        for b in range(n_blocks):  # each block's summary read once, for the group's query heads
            row = storage[h, b]
            for g in range(group):
                acc = np.float32(0.0)
                for x in range(3 * d):
                    acc += parts[g, x] * row[x]
                logits[g, b] = acc
        for g in range(group):
            _softmax_sum_into(logits[g], mass, exponents)  # every block: a query head's whole mass
        for b in range(n_blocks):
            if whole[h, b]:
                mass[b] = -np.inf
        for i in range(n_sel):
            out[h, i] = selection[h, i]
        n = n_sel
        goal = n_sel + extra
        count = _top(mass, n_blocks, first, idx)
        ranked = idx[:count][np.argsort(-mass[idx[:count]], kind="mergesort")]
        for rank in range(2):
            if rank == 1:  # every block, in order: the ones walked already add nothing new
                if n >= goal:
                    break
                ranked = np.argsort(-mass[:n_blocks], kind="mergesort")
                n = n_sel
            for b in ranked:
                if n >= goal:
                    break
                for p in range(b * block, (b + 1) * block):
                    if not held[h, p]:
                        out[h, n] = p
                        n += 1
                        if n >= goal:
                            break
        for p in range(selected_at, length):
            out[h, n] = p
            n += 1


def query_block_rows(q: torch.Tensor, summaries, n_blocks: int, held: torch.Tensor, whole: torch.Tensor,
                     selection: torch.Tensor, selected_at: int, length: int, extra: int) -> torch.Tensor:
    """``DecodeCompressor.attended``'s read set with query blocks, one compiled call, parallel over
    KV heads: ``[Hk, n_sel + extra + length - selected_at]`` positions
    (``DecodeCompressor.query_block_positions`` gives the same extra positions as tensor ops).
    The query's ``block_parts`` are built inside: as torch ops they took a sixth of the call."""
    n_kv = selection.shape[0]
    d = q.shape[-1]
    qs = q.detach().float().reshape(n_kv, -1, d).contiguous()  # [Hk, g, d]: heads of a group are adjacent
    out = torch.empty(n_kv, selection.shape[1] + extra + length - selected_at, dtype=torch.int64)
    with lock:
        parallel_for(_query_block_rows, n_kv, qs.numpy(), float(d**-0.5), float(summaries_module.BOUND_WEIGHT),
                     summaries.storage.numpy(), n_blocks, summaries.block, held.numpy(), whole.numpy(),
                     selection.to(torch.int64).contiguous().numpy(), selected_at, length, extra, out.numpy())
    return out


def sparse_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor,
                  indptr: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``batched_decode_attention``'s compiled CPU path (same contract): ``q [B, H, d]`` over the
    positions of each ``(request, KV head)`` CSR row, keys and values read in place through
    ``slots``.  Returns float32 ``[B, H, d]``."""
    n_req, n_heads, d = q.shape
    n_kv = k_buffer.shape[1]
    # Chunks of >= 256 positions (on average): enough tasks for two cores at batch 1, few merges.
    n_chunks = max(1, min(_CHUNKS, positions.numel() // max(indptr.numel() - 1, 1) // 256))
    qs = (q.float() * d**-0.5).reshape(n_req, n_kv, n_heads // n_kv, d).contiguous()
    out = torch.empty(n_req, n_heads, d, dtype=torch.float32)
    n_seg = n_req * n_kv
    part_max = torch.empty(n_seg * n_chunks, n_heads // n_kv)
    part_sum = torch.zeros(n_seg * n_chunks, n_heads // n_kv)
    part_acc = torch.zeros(n_seg * n_chunks, n_heads // n_kv, d)
    with lock:
        parallel_for(_decode_chunk, n_seg * n_chunks, qs.numpy(), numba_view(k_buffer), numba_view(v_buffer),
                     slots.to(torch.int64).contiguous().numpy(), indptr.to(torch.int64).contiguous().numpy(),
                     positions.to(torch.int64).contiguous().numpy(), n_chunks, part_max.numpy(),
                     part_sum.numpy(), part_acc.numpy())
        parallel_for(_decode_merge, n_seg, part_max.numpy(), part_sum.numpy(), part_acc.numpy(), n_chunks, n_kv,
                     out.numpy())
    return out


def reselect(queries: torch.Tensor, qpos: torch.Tensor, k_buffer: torch.Tensor, slots: torch.Tensor,
             summaries, *, budget: int, take: int, sink: int, recent: int,
             previous: torch.Tensor | None, bound_queries: torch.Tensor | None = None):
    """The two-stage re-selection of one request (``decode.select_decode_kv_pruned``'s pruning
    branch), in place on ``summaries``: ``queries [Hk, Q, d]`` float32, already scaled, at
    positions ``qpos [Q]``, score the candidates; ``bound_queries [Hk, Qb, d]`` (same form;
    default ``queries``) rank the blocks; ``take`` blocks of candidates.  Returns ``(kept [Hk, budget]
    ascending, their window mass, held)``: ``held`` the share of the mass on positions
    ``previous [Hk, n]`` (ascending) holds too, ``None`` without ``previous``."""
    length = slots.shape[0]  # read as int64, whatever the pool's index type: one compiled signature
    n_kv, _, d = queries.shape
    bs = summaries.block
    n_blocks = -(-length // bs)
    summaries.reserve(n_kv, n_blocks, d, k_buffer.device)
    kept = torch.empty(n_kv, budget, dtype=torch.int64)
    kept_mass = torch.empty(n_kv, budget, dtype=torch.float32)
    held = torch.zeros(n_kv, 2, dtype=torch.float64)
    prev = previous.to(torch.int64).contiguous() if previous is not None else torch.zeros(n_kv, 1, dtype=torch.int64)
    bound_queries = queries if bound_queries is None else bound_queries
    bound_queries = bound_queries.contiguous()
    split = block_parts(bound_queries)  # [Hk, Qb, 3d]
    bound = torch.empty(n_kv, bound_queries.shape[1], n_blocks)
    cand = torch.empty(n_kv, take * bs, dtype=torch.int64)
    logits = torch.empty(n_kv, queries.shape[1], take * bs)
    pool, slot_rows, storage = numba_view(k_buffer), slots.to(torch.int64).contiguous().numpy(), summaries.storage.numpy()
    with lock:
        parallel_for(_update_summaries, n_kv, pool, slot_rows, storage, summaries.length // bs, length, bs)
        parallel_for(_block_logits, n_kv * _CHUNKS, split.numpy(), storage, bound.numpy())
        parallel_for(_candidate_blocks, n_kv, bound.numpy(), sink, recent, length, bs, cand.numpy())
        parallel_for(_candidate_logits, n_kv * _CHUNKS, queries.contiguous().numpy(), qpos.contiguous().numpy(),
                     pool, slot_rows, cand.numpy(), length, logits.numpy())
        parallel_for(_keep_top, n_kv, logits.numpy(), cand.numpy(), length, sink, recent, prev.numpy(),
                     0 if previous is None else prev.shape[1], kept.numpy(), kept_mass.numpy(), held.numpy())
    summaries.n_blocks, summaries.length = n_blocks, length
    if previous is None:
        return kept, kept_mass, None
    if not previous.numel():
        return kept, kept_mass, 0.0
    den = float(held[:, 1].sum())
    return kept, kept_mass, float(held[:, 0].sum()) / den if den > 0 else 1.0
