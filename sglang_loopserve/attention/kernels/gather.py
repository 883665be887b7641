"""Fast CPU path: batched gather + matmul over each pair's keys.

Every ``(head, query block)`` pair gathers the keys it visits
(``BlockMask.key_lists``) into a padded buffer; pairs are sorted by key
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


def block_sparse_attention_gather(q, k, v, mask: BlockMask, scale: float | None = None,
                                  budget_bytes: int = DEFAULT_BUDGET) -> torch.Tensor:
    """Exact attention over the mask's keys; every row sees at least its own position."""
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

    indptr, keys = mask.key_lists()
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
        out[pairs] = torch.bmm(torch.softmax(scores, dim=-1), vb)
        start = stop
    out = out.view(n_heads, nqb * bs, d)[:, :n_new]
    return out.transpose(0, 1).to(q.dtype)
