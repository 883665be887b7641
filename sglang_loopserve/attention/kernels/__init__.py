"""Block-sparse attention kernels over a ``BlockMask``; all share one signature.

``kernel(q [n_new, H, d], k [n_ctx, Hk, d], v [n_ctx, Hk, d], mask) -> [n_new, H, d]``

* ``reference``: dense masked softmax (the oracle; small inputs only);
* ``gather``: batched gather + matmul over each pair's keys;
* ``flex``: compiled torch FlexAttention over the blocks + gathered single columns;
* ``triton``: a Triton kernel (GPU; CPU under ``TRITON_INTERPRET=1``);
* ``flashinfer``: FlashInfer's paged prefill, one request per (head, block) pair (GPU).
"""

from __future__ import annotations

import torch

from .gather import block_sparse_attention_gather
from .reference import block_sparse_attention_reference


def _triton(q, k, v, mask):
    from .triton_kernel import block_sparse_attention_triton

    return block_sparse_attention_triton(q, k, v, mask)


def _flex(q, k, v, mask):
    from .flex import block_sparse_attention_flex

    return block_sparse_attention_flex(q, k, v, mask)


def _flashinfer(q, k, v, mask):
    from .flashinfer_kernel import block_sparse_attention_flashinfer

    return block_sparse_attention_flashinfer(q, k, v, mask)


KERNELS = {
    "reference": block_sparse_attention_reference,
    "gather": block_sparse_attention_gather,
    "flex": _flex,
    "triton": _triton,
    "flashinfer": _flashinfer,
}


def default_kernel(device: torch.device) -> str:
    """Fastest measured kernel for the device (``benchmarks/prefill_attention.py``).

    CPU: ``flex`` (4K-token turn over 4K of context, real SmolLM2 attention at
    density ~0.5-0.7: flex 1.6x faster per computed cell than SDPA, gather 4x
    slower).  GPU: ``triton`` (faster than FlashInfer's page-size-1 path at
    every density measured on an H100).
    """
    return "triton" if device.type == "cuda" else "flex"
