"""Online prefill sparsification: estimation, selection, block masks, kernels.

Engine-agnostic (torch tensors in, tensors out); the SGLang backend calls it.
"""

from .block_mask import BlockMask
from .estimate import AttentionSample, sample_attention, sample_query_rows
from .kernels import KERNELS
from .select import VerticalSlashLines, select_vertical_slash
from .sparse_prefill import (SparsePrefillStats, build_block_mask, sparse_prefill_attention,
                             validate_prefill_inputs)

__all__ = [
    "AttentionSample", "BlockMask", "KERNELS", "SparsePrefillStats", "VerticalSlashLines",
    "build_block_mask", "sample_attention", "sample_query_rows", "select_vertical_slash",
    "sparse_prefill_attention", "validate_prefill_inputs",
]
