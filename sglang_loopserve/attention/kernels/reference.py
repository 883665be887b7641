"""Torch reference: exact attention over a ``BlockMask``'s cells (the oracle).

Materialises the dense ``[H, n_new, n_ctx]`` mask, so it is for tests and
small inputs only.  ``compute_dtype=torch.float64`` gives the ground truth the
fast kernels are checked against.
"""

from __future__ import annotations

import torch

from ..block_mask import BlockMask


def masked_attention(q, k, v, allowed: torch.Tensor, scale: float | None = None,
                     compute_dtype=torch.float32) -> torch.Tensor:
    """Softmax attention of ``q [n, H, d]`` over ``k, v [N, Hk, d]`` where ``allowed [H, n, N]``."""
    n_new, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    qh = q.to(compute_dtype).transpose(0, 1)  # [H, n, d]
    kh = k.to(compute_dtype).transpose(0, 1).repeat_interleave(group, 0)  # [H, N, d]
    vh = v.to(compute_dtype).transpose(0, 1).repeat_interleave(group, 0)
    logits = (qh @ kh.transpose(1, 2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ vh
    return out.transpose(0, 1).to(q.dtype)


def causal_attention(q, k, v, scale: float | None = None, compute_dtype=torch.float32):
    """Dense causal attention of the new queries over the whole sequence."""
    n_new, n_ctx = q.shape[0], k.shape[0]
    qpos = n_ctx - n_new + torch.arange(n_new, device=q.device)
    allowed = torch.arange(n_ctx, device=q.device)[None, :] <= qpos[:, None]
    return masked_attention(q, k, v, allowed.expand(q.shape[1], -1, -1), scale, compute_dtype)


def block_sparse_attention_reference(q, k, v, mask: BlockMask, scale: float | None = None,
                                     compute_dtype=torch.float32) -> torch.Tensor:
    return masked_attention(q, k, v, mask.to_dense(), scale, compute_dtype)
