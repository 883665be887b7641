"""Fast CPU path: batched gather + matmul over each pair's keys.

Every ``(head, query block)`` pair gathers the keys it visits (its blocks'
tokens, then its single columns) into a padded buffer; pairs are sorted by key
count and processed in batches under a memory budget, so padding stays small
and there is no Python loop per head or per block, only per batch.  Inside a
batch one ``bmm`` computes the scores, one softmax (fp32) and one ``bmm`` the
output: all keys of a pair are in the same batch, so no online rescaling is
needed.
"""

from __future__ import annotations

import torch

from ..block_mask import BlockMask

#: Scores buffer per batch, bytes (fp32 ``[pairs, block, keys]``).
DEFAULT_BUDGET = 64 << 20


def pair_keys(mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat key positions of all pairs in CSR order, and ``indptr[pairs+1]``.

    A pair's keys: the tokens of its blocks (ascending), then its columns.
    Tokens past ``n_ctx`` in a ragged last block are kept as ``n_ctx`` (a pad
    the kernel masks).
    """
    bs, dev = mask.block_size, mask.block_indptr.device
    nblk = (mask.block_indptr[1:] - mask.block_indptr[:-1]).long()
    ncol = (mask.col_indptr[1:] - mask.col_indptr[:-1]).long()
    count = nblk * bs + ncol
    indptr = torch.zeros(len(count) + 1, dtype=torch.long, device=dev)
    indptr[1:] = count.cumsum(0)
    keys = torch.empty(int(indptr[-1]), dtype=torch.long, device=dev)

    pair_of_blk = torch.repeat_interleave(torch.arange(len(count), device=dev), nblk)
    blk_rank = torch.arange(len(pair_of_blk), device=dev) - mask.block_indptr[:-1].long()[pair_of_blk]
    blk_start = indptr[:-1][pair_of_blk] + blk_rank * bs  # where the block's tokens go
    tok = mask.block_indices.long()[:, None] * bs + torch.arange(bs, device=dev)
    keys[(blk_start[:, None] + torch.arange(bs, device=dev)).reshape(-1)] = tok.clamp(
        max=mask.n_ctx).reshape(-1)

    pair_of_col = torch.repeat_interleave(torch.arange(len(count), device=dev), ncol)
    col_rank = torch.arange(len(pair_of_col), device=dev) - mask.col_indptr[:-1].long()[pair_of_col]
    keys[indptr[:-1][pair_of_col] + nblk[pair_of_col] * bs + col_rank] = mask.col_indices.long()
    return keys, indptr


def block_sparse_attention_gather(q, k, v, mask: BlockMask, scale: float | None = None,
                                  budget_bytes: int = DEFAULT_BUDGET) -> torch.Tensor:
    n_new, n_heads, d = q.shape
    n_ctx, n_kv, _ = k.shape
    group = n_heads // n_kv
    bs, nqb = mask.block_size, mask.n_qblocks
    scale = d**-0.5 if scale is None else scale
    dev = q.device
    cdt = torch.float32

    # Head-major copies with one zero pad row per head for the pad key n_ctx.
    kh = torch.cat([k.transpose(0, 1).to(cdt), k.new_zeros(n_kv, 1, d, dtype=cdt)], 1)
    vh = torch.cat([v.transpose(0, 1).to(cdt), v.new_zeros(n_kv, 1, d, dtype=cdt)], 1)
    kflat, vflat = kh.reshape(-1, d), vh.reshape(-1, d)
    qh = q.new_zeros(n_heads, nqb * bs, d, dtype=cdt)
    qh[:, :n_new] = q.transpose(0, 1).to(cdt)
    qh = qh.view(n_heads * nqb, bs, d)
    out = torch.zeros(n_heads * nqb, bs, d, dtype=cdt, device=dev)

    keys, indptr = pair_keys(mask)
    count = indptr[1:] - indptr[:-1]
    order = torch.argsort(count, descending=True)
    sorted_count = count[order].tolist()
    pair_kv = (torch.arange(n_heads * nqb, device=dev) // nqb) // group
    qpos_base = mask.offset + (torch.arange(n_heads * nqb, device=dev) % nqb) * bs
    row = torch.arange(bs, device=dev)

    start = 0
    n_pairs = len(sorted_count)
    while start < n_pairs:
        width = max(sorted_count[start], 1)
        batch = max(1, budget_bytes // (bs * width * 4))
        stop = min(n_pairs, start + batch)
        pairs = order[start:stop]
        cols = torch.arange(width, device=dev)
        valid = cols[None, :] < count[pairs][:, None]  # [P, W]
        idx = (indptr[:-1][pairs][:, None] + cols[None, :]).clamp(max=max(len(keys) - 1, 0))
        kpos = torch.where(valid, keys[idx], torch.full_like(idx, n_ctx))  # [P, W]
        flat = pair_kv[pairs][:, None] * (n_ctx + 1) + kpos
        kb, vb = kflat[flat], vflat[flat]  # [P, W, d]
        scores = torch.bmm(qh[pairs], kb.transpose(1, 2)).mul_(scale)  # [P, bs, W]
        qpos = qpos_base[pairs][:, None] + row[None, :]  # [P, bs]
        allowed = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos < n_ctx)[:, None, :]
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # every row sees its own position
        out[pairs] = torch.bmm(probs, vb)
        start = stop
    out = out.view(n_heads, nqb * bs, d)[:, :n_new]
    return out.transpose(0, 1).to(q.dtype)
