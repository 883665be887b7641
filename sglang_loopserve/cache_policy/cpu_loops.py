"""A decode re-selection in one compiled call (CPU, numba).

The two-stage re-selection (``decode.select_decode_kv_pruned``: key-block
bounds pick candidates, exact scores among them) is two dozen small torch
ops; on a CPU each costs tens of microseconds whatever its size, and a
re-selection took 2-5 ms where its arithmetic needs a tenth of that.  Here the
same steps run per KV head in one loop nest (parallel over heads): bring the
block summaries up to date, score the blocks, take the best, read the
candidates' keys through their slots, score them, keep the top ``budget``
(selection by ``np.partition``, not a sort) and measure how much of the new
selection's mass the previous one held.  Keys are read as raw bits (float32,
or bfloat16 widened by a shift), so the KV pool is never converted.

Same selection as the torch path (tests compare them; ties of equal scores
aside, which neither orders).
"""

from __future__ import annotations

import numpy as np
import torch

from ..numba_setup import available, lock, numba, njit, prange

#: KV pool dtypes read in place: the integer type of the same width, and the shift
#: that places its bits in a float32's high bits.
_BITS = {torch.float32: (torch.int32, 0), torch.bfloat16: (torch.int16, 16)}


def supports(k_buffer: torch.Tensor) -> bool:
    return available() and k_buffer.device.type == "cpu" and k_buffer.dtype in _BITS


if numba is not None:

    @njit(inline="always")
    def _load(k_bits, row, h, shift, out_bits):
        """Key ``(row, h)`` into ``out_bits`` (a uint32 view of a float32 row)."""
        for x in range(out_bits.shape[0]):
            out_bits[x] = (np.uint32(k_bits[row, h, x]) & np.uint32(0xFFFFFFFF >> shift)) << shift

    @njit(inline="always", fastmath={"reassoc", "contract"})
    def _softmax_sum_into(logits, acc, scratch):
        """``acc += softmax(logits)`` for a row of float32 logits (``-inf``: masked), ``logits``
        overwritten.  ``exp`` as a polynomial (Cephes' ``expf``, relative error ~1e-7) that
        vectorizes: numba's ``np.exp`` is a libm call per element."""
        top = logits.max()
        m = logits.shape[0]
        for c in range(m):
            x = max(logits[c] - top, np.float32(-87.0))  # e^-87 is still a normal float
            t = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
            r = x - t * np.float32(0.693359375) + t * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            logits[c] = p * r * r + r + np.float32(1.0)
            scratch[c] = np.int32(t) << 23
        bits = logits.view(np.int32)
        total = np.float32(0.0)
        for c in range(m):
            bits[c] += scratch[c]  # times 2^t
            total += logits[c]
        inv = np.float32(1.0) / total
        for c in range(m):
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

    #: Tasks per head of the heavy stages.
    _CHUNKS = 4

    # Reassociation lets the dot products vectorize (a float32 sum in strict order waits on
    # each add); infinities stay meaningful (masked logits), so no "ninf"/"nnan".
    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _reselect(queries, qpos, k_bits, shift, slots, storage, first_block, length, block, take, budget,
                  sink, recent, previous, n_previous, kept, kept_mass, held):
        n_kv, n_q, d = queries.shape
        n_blocks = -(-length // block)
        n_cand = take * block
        sink_blocks = -(-sink // block)
        recent_block = (length - recent) // block
        # The heavy stages run over (head, chunk) tasks: a few heads on two cores
        # would leave one idle half the time.
        b_chunk = -(-n_blocks // _CHUNKS)
        c_chunk = -(-n_cand // _CHUNKS)
        # 1. Summaries of the blocks with new keys (the last, partial one is redone).
        for h in prange(n_kv):
            bits = np.empty(d, dtype=np.uint32)
            key = bits.view(np.float32)
            for b in range(first_block, n_blocks):
                hi = storage[h, b, :d]
                lo = storage[h, b, d:]
                for pos in range(b * block, min((b + 1) * block, length)):
                    _load(k_bits, slots[pos], h, shift, bits)
                    if pos == b * block:
                        hi[:] = key
                        lo[:] = key
                    else:
                        for x in range(d):
                            hi[x] = max(hi[x], key[x])
                            lo[x] = min(lo[x], key[x])
        # 2. Each block's bound per query: the query's positive parts times the block's
        # maxima plus its negative parts times the minima.
        split = np.empty((n_kv, n_q, 2 * d), dtype=np.float32)
        for h in range(n_kv):
            for i in range(n_q):
                for x in range(d):
                    qx = queries[h, i, x]
                    split[h, i, x] = max(qx, np.float32(0.0))
                    split[h, i, d + x] = min(qx, np.float32(0.0))
        bound = np.empty((n_kv, n_q, n_blocks), dtype=np.float32)
        for task in prange(n_kv * _CHUNKS):
            h = task // _CHUNKS
            for b in range((task % _CHUNKS) * b_chunk, min((task % _CHUNKS + 1) * b_chunk, n_blocks)):
                row = storage[h, b]
                for i in range(n_q):
                    acc = np.float32(0.0)
                    for x in range(2 * d):
                        acc += split[h, i, x] * row[x]
                    bound[h, i, b] = acc
        # 3. Per head, the blocks' bound mass (softmax over blocks per query, summed), the best
        # ``take`` blocks and their positions (past the cache: ``length``).
        cand = np.empty((n_kv, n_cand), dtype=np.int64)
        for h in prange(n_kv):
            mass = np.zeros(n_blocks, dtype=np.float32)
            exponents = np.empty(n_blocks, dtype=np.int32)
            for i in range(n_q):
                _softmax_sum_into(bound[h, i], mass, exponents)
            for b in range(n_blocks):
                if b < sink_blocks or b >= recent_block:
                    mass[b] = np.inf
            chosen = np.empty(take, dtype=np.int64)
            _top(mass, n_blocks, take, chosen)
            for c in range(n_cand):
                cand[h, c] = min(chosen[c // block] * block + c % block, length)
        # 4. The candidates' logits, their keys read through their slots (-inf: past the
        # cache, or after the query).
        logits = np.empty((n_kv, n_q, n_cand), dtype=np.float32)
        for task in prange(n_kv * _CHUNKS):
            h = task // _CHUNKS
            bits = np.empty(d, dtype=np.uint32)
            key = bits.view(np.float32)
            for c in range((task % _CHUNKS) * c_chunk, min((task % _CHUNKS + 1) * c_chunk, n_cand)):
                pos = cand[h, c]
                if pos < length:
                    _load(k_bits, slots[pos], h, shift, bits)
                for i in range(n_q):
                    if pos >= length or pos > qpos[i]:
                        logits[h, i, c] = -np.inf
                        continue
                    acc = np.float32(0.0)
                    for x in range(d):
                        acc += queries[h, i, x] * key[x]
                    logits[h, i, c] = acc
        # 5. Per head, the candidates' mass, the top ``budget`` ascending (candidates ascend)
        # and the share of their mass the previous selection held.
        for h in prange(n_kv):
            score = np.zeros(n_cand, dtype=np.float32)
            exponents = np.empty(n_cand, dtype=np.int32)
            for i in range(n_q):
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


def reselect(queries: torch.Tensor, qpos: torch.Tensor, k_buffer: torch.Tensor, slots: torch.Tensor,
             summaries, *, budget: int, take: int, sink: int, recent: int,
             previous: torch.Tensor | None):
    """The two-stage re-selection of one request (``decode.select_decode_kv_pruned``'s pruning
    branch), in place on ``summaries``: ``queries [Hk, Q, d]`` float32, already scaled, at
    positions ``qpos [Q]``; ``take`` blocks of candidates.  Returns ``(kept [Hk, budget]
    ascending, their window mass, held)``: ``held`` the share of the mass on positions
    ``previous [Hk, n]`` (ascending) holds too, ``None`` without ``previous``."""
    length = slots.shape[0]  # read as int64, whatever the pool's index type: one compiled signature
    n_kv, _, d = queries.shape
    bs = summaries.block
    n_blocks = -(-length // bs)
    summaries.reserve(n_kv, n_blocks, d, k_buffer.device)
    int_dtype, shift = _BITS[k_buffer.dtype]
    k_bits = k_buffer.view(int_dtype)
    kept = torch.empty(n_kv, budget, dtype=torch.int64)
    kept_mass = torch.empty(n_kv, budget, dtype=torch.float32)
    held = torch.zeros(n_kv, 2, dtype=torch.float64)
    prev = previous.to(torch.int64).contiguous() if previous is not None else torch.zeros(n_kv, 1, dtype=torch.int64)
    with lock:
        _reselect(queries.contiguous().numpy(), qpos.numpy(), k_bits.numpy(), shift,
                  slots.to(torch.int64).contiguous().numpy(), summaries.storage.numpy(), summaries.length // bs,
                  length, bs, take, budget, sink, recent, prev.numpy(), 0 if previous is None else prev.shape[1],
                  kept.numpy(), kept_mass.numpy(), held.numpy())
    summaries.n_blocks, summaries.length = n_blocks, length
    if previous is None:
        return kept, kept_mass, None
    if not previous.numel():
        return kept, kept_mass, 0.0
    den = float(held[:, 1].sum())
    return kept, kept_mass, float(held[:, 0].sum()) / den if den > 0 else 1.0
