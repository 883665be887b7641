"""The CPU kernel: gathered key blocks through torch's fused CPU attention, merged by log-sum-exp.

Every ``(head, query block)`` pair's keys split in three parts that need no
per-cell mask:

* **own**: the key blocks holding the query block's own positions, causal.
  They have the same shape for every pair and are read in place from the key
  buffer (a strided window); the query heads of a KV group are stacked as
  rows, so one fused call covers every pair with one shared ``[rows, keys]``
  mask;
* **blocks**: the other visited key blocks, all before the query block's
  first position, so every row sees every key.  Pairs with the same number of
  blocks form one batch; each block is gathered whole (one contiguous copy of
  ``block_size`` keys), and the batch is one fused call without any mask;
* **columns**: the single columns, also before the block.  Pairs are cut into
  batches whose counts differ by at most ``WIDTH_STEP``; the padding is masked.

torch's fused CPU attention (``fused_cpu.attend``) returns each row's
log-sum-exp, so the parts merge exactly.  The cost is the cells the mask
keeps at the dense kernel's speed per cell, plus one copy of the keys and
values each pair visits outside its own blocks (``1 / block_size`` of the
cell work).  No Python loop per head or block: per batch of pairs only.
"""

from __future__ import annotations

import math

import torch

from ..block_mask import BlockMask
from ..fused_cpu import attend, merge

#: Pairs in one batch of columns have counts within a factor ``WIDTH_STEP`` (the padding is masked).
WIDTH_STEP = 1.25
#: Gathered keys and values per batch, bytes.
BATCH_BYTES = 32 << 20


def own_window(n_new: int, n_ctx: int, block_size: int):
    """The keys of the query blocks' own diagonal blocks: ``(first key block of block 0, width)``.

    Query block ``b``'s queries start at ``offset + b * block_size``; its own
    keys are the key blocks from there to its last query: one block when the
    offset is a multiple of the block size, else two.
    """
    offset = n_ctx - n_new
    return offset // block_size, block_size if offset % block_size == 0 else 2 * block_size


def block_sparse_attention_gather(q, k, v, mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    """Exact attention over the mask's cells; ``q [n_new, H, d]``, ``k, v [n_ctx, Hk, d]``."""
    n_new, n_heads, d = q.shape
    n_ctx, n_kv, _ = k.shape
    group = n_heads // n_kv
    bs, n_qb = mask.block_size, mask.n_qblocks
    scale = d**-0.5 if scale is None else scale
    dev, dt = q.device, q.dtype
    n_pairs = n_heads * n_qb

    # Queries head-major, rows padded to whole blocks: [H, nqb, bs, d].
    qh = q.new_zeros(n_heads, n_qb * bs, d)
    qh[:, :n_new] = q.transpose(0, 1)
    qh = qh.view(n_heads, n_qb, bs, d)
    q_pairs = qh.view(n_pairs, 1, bs, d)

    # Keys and values head-major, padded with whole zero blocks past n_ctx.
    kb0, width = own_window(n_new, n_ctx, bs)
    n_slots = (kb0 + n_qb + 2) * bs
    kh = k.new_zeros(n_kv, n_slots, d)
    vh = v.new_zeros(n_kv, n_slots, d)
    kh[:, :n_ctx] = k.transpose(0, 1)
    vh[:, :n_ctx] = v.transpose(0, 1)

    # Own part: windows of ``width`` keys starting at each query block's first
    # own key block; the query heads of a group stacked as rows.
    def windows(x):
        return x.as_strided((n_kv, n_qb, width, d), (n_slots * d, bs * d, d, 1), kb0 * bs * d)

    rows = qh.view(n_kv, group, n_qb, bs, d).transpose(1, 2).reshape(n_kv, n_qb, group * bs, d)
    r = (n_ctx - n_new) % bs
    i = torch.arange(bs, device=dev)
    causal = torch.arange(width, device=dev)[None, :] <= (r + i)[:, None]  # [bs, width]
    own_mask = torch.zeros(group * bs, width, dtype=dt, device=dev)
    own_mask.masked_fill_(~causal.repeat(group, 1), float("-inf"))
    o_own, lse_own = attend(rows, windows(kh), windows(vh), scale=scale, mask=own_mask[None, None])
    o_own = o_own.view(n_kv, n_qb, group, bs, d).transpose(1, 2).reshape(n_pairs, bs, d)
    lse_own = lse_own.view(n_kv, n_qb, group, bs).transpose(1, 2).reshape(n_pairs, bs)
    parts = [(o_own, lse_own)]

    pair_head = torch.arange(n_pairs, device=dev) // n_qb // group  # the KV head of each pair

    # Blocks part: visited blocks before the pair's own ones, gathered whole.
    counts = (mask.block_indptr[1:] - mask.block_indptr[:-1]).long()
    pair_of_block = torch.repeat_interleave(torch.arange(n_pairs, device=dev), counts)
    past = mask.block_indices.long() < kb0 + pair_of_block % n_qb
    n_blocks = torch.bincount(pair_of_block[past], minlength=n_pairs)
    if int(n_blocks.max()) > 0:
        past_blocks = mask.block_indices.long()[past]  # ascending per pair
        first = torch.zeros(n_pairs, dtype=torch.long, device=dev)
        first[1:] = n_blocks.cumsum(0)[:-1]
        k_blocks = kh.view(n_kv * (n_slots // bs), bs * d)
        v_blocks = vh.view(n_kv * (n_slots // bs), bs * d)
        o_blk = torch.zeros(n_pairs, bs, d, dtype=dt, device=dev)
        lse_blk = torch.full((n_pairs, bs), float("-inf"), device=dev)
        for pairs, nb in _batches(n_blocks, bs * d * k.element_size(), exact=True):
            at = first[pairs][:, None] + torch.arange(nb, device=dev)[None, :]
            ids = (pair_head[pairs][:, None] * (n_slots // bs) + past_blocks[at]).view(-1)
            kg = k_blocks.index_select(0, ids).view(len(pairs), 1, nb * bs, d)
            vg = v_blocks.index_select(0, ids).view(len(pairs), 1, nb * bs, d)
            o, lse = attend(q_pairs[pairs], kg, vg, scale=scale)
            o_blk[pairs], lse_blk[pairs] = o[:, 0], lse[:, 0]
        parts.append((o_blk, lse_blk))

    # Columns part: gathered key by key, padding masked.
    col_start = mask.col_indptr[:-1].long()
    n_cols = mask.col_indptr[1:].long() - col_start
    if int(n_cols.max()) > 0:
        columns = mask.col_indices.long()
        k_rows = kh.view(n_kv * n_slots, d)
        v_rows = vh.view(n_kv * n_slots, d)
        o_col = torch.zeros(n_pairs, bs, d, dtype=dt, device=dev)
        lse_col = torch.full((n_pairs, bs), float("-inf"), device=dev)
        for pairs, w in _batches(n_cols, d * k.element_size()):
            t = torch.arange(w, device=dev)[None, :]
            valid = t < n_cols[pairs][:, None]
            key = columns[(col_start[pairs][:, None] + t).clamp(max=columns.numel() - 1)]
            slot = torch.where(valid, pair_head[pairs][:, None] * n_slots + key, n_ctx).view(-1)  # n_ctx: zeros
            kg = k_rows.index_select(0, slot).view(len(pairs), 1, w, d)
            vg = v_rows.index_select(0, slot).view(len(pairs), 1, w, d)
            pad = None
            if not bool(valid.all()):
                pad = torch.zeros(len(pairs), 1, 1, w, dtype=dt, device=dev)
                pad.masked_fill_(~valid[:, None, None, :], float("-inf"))
            o, lse = attend(q_pairs[pairs], kg, vg, scale=scale, mask=pad)
            o_col[pairs], lse_col[pairs] = o[:, 0], lse[:, 0]
        parts.append((o_col, lse_col))

    out = merge(parts) if len(parts) > 1 else o_own
    return out.view(n_heads, n_qb * bs, d)[:, :n_new].transpose(0, 1).to(dt)


def _batches(counts: torch.Tensor, bytes_per_unit: int, exact: bool = False):
    """Pairs with ``counts > 0``, sorted by count and cut into batches: ``(pair ids, padded count)``.

    ``exact``: one batch per distinct count (no padding); else counts within a
    factor ``WIDTH_STEP`` share the largest one.  Batches stay under
    ``BATCH_BYTES`` of gathered keys and values.
    """
    order = torch.argsort(counts, descending=True)
    sorted_counts = counts[order]
    keep = sorted_counts > 0
    order, sorted_counts = order[keep], sorted_counts[keep]
    if not order.numel():
        return
    if exact:
        cls = sorted_counts
    else:
        cls = torch.floor(torch.log(sorted_counts.double()) / math.log(WIDTH_STEP)).long()
    _, sizes = torch.unique_consecutive(cls, return_counts=True)
    start = 0
    for size in sizes.tolist():
        width = int(sorted_counts[start])
        per_batch = max(1, BATCH_BYTES // (2 * width * bytes_per_unit))
        for lo in range(start, start + size, per_batch):
            yield order[lo:min(lo + per_batch, start + size)], width
        start += size
