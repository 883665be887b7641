"""FlashInfer path: block-sparse prefill as a batch of paged-prefill requests (GPU).

FlashInfer's ``BlockSparseAttentionWrapper`` shares one pattern across heads
(per-head patterns only on Blackwell), and ``VariableBlockSparseAttentionWrapper``
plans on the host for hundreds of ms.  Instead we drive the primitive under
both, ``BatchPrefillWithPagedKVCacheWrapper``, with page size 1 (as SGLang's
own FlashInfer backend does):

* each ``(head, query block)`` pair is one request with one query head and
  one KV head: its rows are that head's queries of the block;
* the KV cache ``[n_ctx, Hk, d]`` is viewed, without a copy, as
  ``n_ctx * Hk`` pages of one token and one head: page ``t * Hk + kv_head``;
* a request's pages are ``BlockMask.key_lists()``: ascending, ending at the
  block's last query, so FlashInfer's bottom-right causal alignment is exact.

``FlashInferBlockSparse.plan(mask)`` builds the index arrays on the device once
(per layer, or once for a group of layers sharing a mask); ``run(q, k, v)`` is
then a single kernel launch.
"""

from __future__ import annotations

import torch

from ..block_mask import BlockMask

_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def _workspace(device) -> torch.Tensor:
    if device not in _WORKSPACE:
        _WORKSPACE[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    return _WORKSPACE[device]


class FlashInferBlockSparse:
    def __init__(self, device):
        import flashinfer  # GPU only; imported here so the CPU path never needs it

        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD")
        self.mask: BlockMask | None = None

    def plan(self, mask: BlockMask, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             scale: float | None = None) -> None:
        dev = mask.block_indptr.device
        H, nqb, bs = mask.num_heads, mask.n_qblocks, mask.block_size
        group = H // num_kv_heads
        kv_indptr, keys = mask.key_lists()
        pair_kv = (torch.arange(H * nqb, device=dev) // nqb) // group
        counts = kv_indptr[1:] - kv_indptr[:-1]
        kv_indices = keys * num_kv_heads + torch.repeat_interleave(pair_kv, counts)
        rows = torch.full((nqb,), bs, device=dev)
        rows[-1] = mask.n_new - (nqb - 1) * bs
        qo_indptr = torch.zeros(H * nqb + 1, dtype=torch.int32, device=dev)
        qo_indptr[1:] = rows.repeat(H).cumsum(0)
        self.wrapper.plan(
            qo_indptr, kv_indptr.to(torch.int32), kv_indices.to(torch.int32),
            torch.ones(H * nqb, dtype=torch.int32, device=dev),
            num_qo_heads=1, num_kv_heads=1, head_dim_qk=head_dim, page_size=1, causal=True,
            sm_scale=head_dim**-0.5 if scale is None else scale, q_data_type=dtype, kv_data_type=dtype)
        self.mask = mask

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_new, H, d = q.shape
        qp = q.transpose(0, 1).reshape(H * n_new, 1, d)  # pair (h, b) rows are contiguous
        kp = k.reshape(-1, 1, 1, d)  # page = token * Hk + kv_head, one token per page
        vp = v.reshape(-1, 1, 1, d)
        out = self.wrapper.run(qp, (kp, vp))
        return out.view(H, n_new, d).transpose(0, 1)


def block_sparse_attention_flashinfer(q, k, v, mask: BlockMask, scale: float | None = None):
    if q.device.type != "cuda":
        raise RuntimeError("the flashinfer kernel needs a CUDA device")
    runner = FlashInferBlockSparse(q.device)
    runner.plan(mask, k.shape[1], q.shape[-1], q.dtype, scale)
    return runner.run(q, k.contiguous(), v.contiguous())
