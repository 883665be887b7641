"""Exact attention of a turn's new tokens over the cached history and themselves.

A prefill over a radix hit has ``n_new`` new queries after ``prefix`` cached
keys; its causal cells are ``n_new x prefix`` (every new query sees the whole
prefix) plus the ``n_new x n_new`` causal square of the new tokens.  SGLang's
torch-native backend computes the square of the *whole* sequence instead
(``n_ctx x n_ctx / 2`` cells, most of them for cached rows it throws away):
a 32-token follow-up over 7.4K cached tokens costs it a 7.4K-token prefill.
Here only the new rows are computed, at the dense kernel's speed per cell:

* CPU: two calls of torch's fused CPU attention, the prefix without any mask
  (the query heads of a KV group stacked as rows: one pass over each key
  head) and the square with its causal flag, merged by log-sum-exp;
* other devices: one ``scaled_dot_product_attention`` with a bottom-right
  causal mask (FlashAttention on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_cpu import attend, merge


def exact_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """``[n_new, H, d]``: causal attention of ``q [n_new, H, d]`` (the last ``n_new`` positions)
    over ``k, v [n_ctx, Hk, d]``."""
    n_new, n_heads, d = q.shape
    n_ctx, n_kv, _ = k.shape
    group = n_heads // n_kv
    prefix = n_ctx - n_new
    scale = d**-0.5 if scale is None else scale
    qh = q.transpose(0, 1)  # [H, n_new, d]
    if q.device.type != "cpu":
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(
            qh[None], k.transpose(0, 1).repeat_interleave(group, 0)[None],
            v.transpose(0, 1).repeat_interleave(group, 0)[None],
            attn_mask=causal_lower_right(n_new, n_ctx), scale=scale)
        return out[0].transpose(0, 1)
    k_new = k[prefix:].transpose(0, 1).repeat_interleave(group, 0)[None]  # [1, H, n_new, d]
    v_new = v[prefix:].transpose(0, 1).repeat_interleave(group, 0)[None]
    square = attend(qh[None], k_new, v_new, scale=scale, causal=True)
    if prefix == 0:
        return square[0][0].transpose(0, 1)
    stacked = qh.reshape(n_kv, group * n_new, d)[None]  # rows of a group's heads, one after another
    o, lse = attend(stacked, k[:prefix].transpose(0, 1)[None], v[:prefix].transpose(0, 1)[None], scale=scale)
    past = (o.reshape(n_heads, n_new, d), lse.reshape(n_heads, n_new))
    out = merge([past, (square[0][0], square[1][0])])
    return out.transpose(0, 1).to(q.dtype)
