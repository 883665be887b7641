"""Triton block-sparse prefill kernel over a ``BlockMask`` (GPU; CPU via ``TRITON_INTERPRET=1``).

One program per ``(query block, head)``: it walks the pair's key blocks from
the CSR arrays (causal mask against each query's position, which matters in
the query block's own diagonal blocks), then its single columns in chunks of
``BLOCK_N`` gathered keys, with one online softmax across both loops.  No
host-side work beyond reading the CSR arrays the mask already holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_mask import BlockMask


@triton.jit
def _online_softmax_step(q, K, V, keys, key_ok, ok, dims, dim_ok, kvh, stride_kt, stride_kh,
                         scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold one tile of gathered keys (``ok``: which scores count) into the running softmax."""
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + keys[:, None] * stride_kt + kvh * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(ok, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    p = tl.exp(s - m_use[:, None])
    corr = tl.exp(m_i - m_use)
    l_i = l_i * corr + tl.sum(p, 1)
    v = tl.load(V + keys[:, None] * stride_kt + kvh * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out,
    block_indptr, block_indices, col_indptr, col_indices,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    n_new, n_ctx, n_qblocks, group, offset, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // group
    pair = h * n_qblocks + qb

    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_new
    dim_ok = dims < HEAD_DIM
    qpos = offset + rows
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # Dense key blocks, causal against each query's position.
    for i in range(tl.load(block_indptr + pair), tl.load(block_indptr + pair + 1)):
        keys = tl.load(block_indices + i) * BLOCK_N + cols
        key_ok = keys < n_ctx
        ok = key_ok[None, :] & (keys[None, :] <= qpos[:, None])
        m_i, l_i, acc = _online_softmax_step(q, K, V, keys, key_ok, ok, dims, dim_ok, kvh, stride_kt,
                                             stride_kh, scale, m_i, l_i, acc, IEEE)

    # Single columns, gathered BLOCK_N at a time; all lie before the block.
    c_end = tl.load(col_indptr + pair + 1)
    for c in range(tl.load(col_indptr + pair), c_end, BLOCK_N):
        slot = c + cols
        slot_ok = slot < c_end
        keys = tl.load(col_indices + slot, mask=slot_ok, other=0)
        ok = (qpos[:, None] >= 0) & slot_ok[None, :]  # every row sees every column
        m_i, l_i, acc = _online_softmax_step(q, K, V, keys, slot_ok, ok, dims, dim_ok, kvh, stride_kt,
                                             stride_kh, scale, m_i, l_i, acc, IEEE)

    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + dims[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def block_sparse_attention_triton(q, k, v, mask: BlockMask, scale: float | None = None):
    n_new, n_heads, d = q.shape
    n_ctx, n_kv, _ = k.shape
    if k.stride(-1) != 1 or v.stride() != k.stride() or q.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    bs = mask.block_size
    grid = (mask.n_qblocks, n_heads)
    _block_sparse_fwd[grid](
        q, k, v, out,
        mask.block_indptr, mask.block_indices, mask.col_indptr, mask.col_indices,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        n_new, n_ctx, mask.n_qblocks, n_heads // n_kv, mask.offset,
        d**-0.5 if scale is None else scale,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=bs, BLOCK_N=bs,
        IEEE=q.dtype == torch.float32,
    )
    return out
