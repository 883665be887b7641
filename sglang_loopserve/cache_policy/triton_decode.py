"""Triton decode attention over selected positions (GPU; CPU via ``TRITON_INTERPRET=1``).

Same contract as ``batched_decode_attention``: one program per
``(request, KV head)`` loads the query heads of the group, walks the row's
selected positions ``BLOCK_N`` at a time, maps them to pool rows through
``slots`` and folds them into an online softmax.  Each selected KV row is read
once for the whole group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.kernels.triton_kernel import _online_softmax_step


@triton.jit
def _decode_fwd(Q, K, V, Out, slots, indptr, positions,
                stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh, stride_sb,
                n_kv, group, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0)
    req = row // n_kv
    kvh = row % n_kv
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    g_ok = g < group
    dim_ok = dims < HEAD_DIM
    heads = kvh * group + g
    q = tl.load(Q + req * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=g_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = tl.load(indptr + row)
    end = tl.load(indptr + row + 1)
    cols = tl.arange(0, BLOCK_N)
    for c in range(start, end, BLOCK_N):
        ok = c + cols < end
        pos = tl.load(positions + c + cols, mask=ok, other=0)
        rows = tl.load(slots + req * stride_sb + pos, mask=ok, other=0)
        both = (g[:, None] >= 0) & ok[None, :]
        m_i, l_i, acc = _online_softmax_step(q, K, V, rows, ok, both, dims, dim_ok, kvh, stride_kt,
                                             stride_kh, scale, m_i, l_i, acc, IEEE)
    out = acc / l_i[:, None]
    tl.store(Out + req * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(Out.dtype.element_ty), mask=g_ok[:, None] & dim_ok[None, :])


def batched_decode_attention_triton(q, k, v, slots, indptr, positions, block_n: int = 64):
    """``[B, H, d]``; every row of ``indptr`` must hold at least one position."""
    n_req, n_heads, d = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    q, k, v, slots = q.contiguous(), k.contiguous(), v.contiguous(), slots.contiguous()
    out = torch.empty_like(q)
    _decode_fwd[(n_req * n_kv,)](
        q, k, v, out, slots, indptr, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), slots.stride(0),
        n_kv, group, d**-0.5,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
    )
    return out
