"""torch's fused CPU attention, with each row's log-sum-exp, and the exact merge of parts.

``_scaled_dot_product_flash_attention_for_cpu`` is the kernel behind
``scaled_dot_product_attention`` on the CPU (flash-style tiles, bf16 or fp32
inputs, fp32 accumulation).  Called directly it also returns each row's
log-sum-exp, so attention over a key set split into parts (no per-cell mask
inside each part) merges exactly: ``merge`` weighs each part by
``exp(lse_part - lse_all)``.
"""

from __future__ import annotations

import torch

_fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attend(q, k, v, *, scale: float, mask: torch.Tensor | None = None, causal: bool = False):
    """``(out, lse)``: ``q [B, H, L, d]``, ``k, v [B, H, S, d]``; ``mask``: additive, in ``q``'s
    dtype, broadcastable to ``[B, H, L, S]``; ``causal``: row ``i`` sees keys ``<= i``."""
    out, lse = _fused(q, k, v, is_causal=causal, attn_mask=mask, scale=scale)[:2]
    return out, lse


def merge(parts) -> torch.Tensor:
    """Exact softmax attention over the union of disjoint key sets, from ``[(out, lse), ...]``
    of matching shapes ``[..., d]`` / ``[...]`` (a part a row has no key in: ``lse = -inf``);
    float32."""
    lse = parts[0][1]
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    out = None
    for part_out, part_lse in parts:
        term = part_out.float() * (part_lse - lse).exp()[..., None]
        out = term if out is None else out.add_(term)
    return out
