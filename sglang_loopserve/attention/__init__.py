"""Online prefill sparsification: estimation, selection, block masks, kernels."""
