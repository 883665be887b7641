"""Query-key logits for scoring (the prefill estimate, the decode re-selection), as fp32.

Both score a few queries against many cached keys and then take a softmax.
The keys are what the KV cache holds: bf16 (or fp16) in a served model.
Widening every key to fp32 for an fp32 product costs more than the product
itself on a CPU; a product in the keys' own dtype accumulates in fp32 and
rounds each logit once to that dtype (a relative error of 2^-9 in bf16: 0.04
at a logit of 20), 4x faster here (``benchmarks/prefill_attention.py``'s
estimate column, ``benchmarks/decode_attention.py``'s re-selection).  The
softmax that follows runs in fp32.  fp32 keys keep an fp32 product.
"""

from __future__ import annotations

import torch

from .workspace import scratch

#: Key dtypes whose product runs in their own precision.
HALF_TYPES = (torch.bfloat16, torch.float16)


def product_dtype(key_dtype: torch.dtype) -> torch.dtype:
    """The dtype a product with keys of ``key_dtype`` comes out in."""
    return key_dtype if key_dtype in HALF_TYPES else torch.float32


def scoring_product(queries: torch.Tensor, keys_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, R, N]``: ``queries [B, R, d]`` (float32, already scaled) times ``keys_t [B, d, N]`` (the
    cache's dtype; fastest as the transpose of contiguous ``[B, N, d]`` keys), in the keys' dtype
    (``product_dtype``): half-precision keys multiply in their precision with fp32 accumulation.
    ``out``: a buffer of that shape and dtype to write into."""
    dtype = product_dtype(keys_t.dtype)
    if out is None:
        out = torch.empty(queries.shape[0], queries.shape[1], keys_t.shape[2], dtype=dtype, device=queries.device)
    return torch.bmm(queries.to(dtype), keys_t.to(dtype), out=out)


def scoring_logits(queries: torch.Tensor, keys_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, R, N]`` float32: ``scoring_product`` widened to fp32.  ``out``: an fp32 buffer of that
    shape to write into."""
    n_batch, n_rows, n_keys = queries.shape[0], queries.shape[1], keys_t.shape[2]
    if out is None:
        out = torch.empty(n_batch, n_rows, n_keys, device=queries.device)
    if keys_t.dtype in HALF_TYPES:
        half = scratch("scoring_logits.half", (n_batch, n_rows, n_keys), keys_t.dtype, keys_t.device)
        return out.copy_(scoring_product(queries, keys_t, out=half))
    return scoring_product(queries, keys_t, out=out)
