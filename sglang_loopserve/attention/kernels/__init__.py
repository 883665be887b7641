"""Block-sparse attention kernels over a ``BlockMask``; all share one signature.

``kernel(q [n_new, H, d], k [n_ctx, Hk, d], v [n_ctx, Hk, d], mask) -> [n_new, H, d]``

* ``reference``: dense masked softmax (the oracle; small inputs only);
* ``gather``: the query block's own blocks, its other key blocks (gathered
  whole) and its single columns, each through torch's fused CPU attention,
  merged by log-sum-exp (the CPU default);
* ``flex``: compiled torch FlexAttention over the blocks + masked columns;
* ``triton``: a Triton kernel (the GPU default; CPU under ``TRITON_INTERPRET=1``);
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

    CPU: ``gather``.  SmolLM2 layers, bf16, 2-core x86, a turn of half the
    context: at 8K tokens and density 0.39 it takes 0.41x the time of dense
    SDPA over the same rows, where FlexAttention takes 0.96x (its bf16 path
    on this CPU computes a cell at a third of SDPA's speed).  GPU: ``triton``
    (faster than FlashInfer's page-size-1 path at every density measured on
    an H100).
    """
    return "triton" if torch.device(device).type == "cuda" else "gather"
