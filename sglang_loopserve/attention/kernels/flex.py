"""CPU (and GPU) path through torch FlexAttention, compiled.

FlexAttention skips the key blocks a block mask leaves out, so its cost
follows the density.  Our ``BlockMask`` maps onto Flex's directly, without
evaluating a mask function densely (``create_block_mask`` would take seconds
at 8K): visited blocks that lie wholly before a query block are *full* (no
mask function); the query block's own diagonal blocks, and the key blocks
holding single columns, are *partial*: a mask function checks causality and
the pair's key set (``BlockMask.pair_keys_dense``).  A block holding single
columns is therefore computed whole and masked: Flex on the CPU returns no
log-sum-exp, so the columns cannot be computed apart and merged.

The first call compiles (about 30 s on 2 cores; inductor caches the result on
disk for later processes).  ``dynamic=True`` and the query offset passed as a
tensor keep one compiled kernel for every sequence length.
"""

from __future__ import annotations

import torch

from ..block_mask import BlockMask, per_key_block, query_block_span

_compiled = None


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def _flex_block_mask(mask: BlockMask):
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    bs, dev, nqb = mask.block_size, mask.block_indptr.device, mask.n_qblocks
    keys = mask.pair_keys_dense()  # [H*nqb, n_ctx]
    n_kb = mask.n_kblocks
    touched = per_key_block(keys, bs).any(-1).view(mask.num_heads, nqb, n_kb)
    q_first, _ = query_block_span(mask.n_new, mask.n_ctx, bs, dev)
    k_end = (torch.arange(n_kb, device=dev) + 1) * bs - 1
    before = k_end[None, :] <= q_first[:, None]  # every key visible to every row
    full = mask.pair_blocks() & before
    partial = touched & ~full

    def to_indices(m):
        num = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None], idx[None]

    offset = torch.tensor(mask.offset, device=dev)

    flat = keys.reshape(-1)
    n_ctx, n_qb = torch.tensor(mask.n_ctx, device=dev), torch.tensor(nqb, device=dev)

    def allowed(b, h, q_idx, kv_idx):
        pair = h * n_qb + torch.div(q_idx, bs, rounding_mode="floor")
        return (kv_idx <= q_idx + offset) & flat[pair * n_ctx + kv_idx]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    return FlexBlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs,
                                        mask_mod=allowed, seq_lengths=(mask.n_new, mask.n_ctx))


def block_sparse_attention_flex(q, k, v, mask: BlockMask, scale: float | None = None):
    n_heads = q.shape[1]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = _flex()(qh, kh, vh, block_mask=_flex_block_mask(mask), scale=scale,
                  enable_gqa=n_heads != k.shape[1])
    return out[0].transpose(0, 1).to(q.dtype)
