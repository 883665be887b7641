"""Batched decode selection and attention for a server batch of many requests.

Requests have different lengths and their KV rows live anywhere in a shared
pool ``k, v [T, Hk, d]``; ``slots [B, Lmax]`` maps each request's positions to
pool rows (padded past ``lengths[b]``, like SGLang's ``req_to_token``).
Selections are ragged: one CSR row per ``(request, KV head)``,
``indptr [B*Hk + 1]`` into a flat ``positions`` tensor of logical positions.
Everything is padded tensor work: no Python loop per request or head.
"""

from __future__ import annotations

import torch

from ..attention.fused_cpu import attend
from . import cpu_loops
from .scoring import attention_mass_padded, check_gqa, keep_top_padded, validate_budget


def every_position(length: int, n_kv: int, device) -> tuple[torch.Tensor, list[int]]:
    """A decode read set of every position of a ``length``-token cache, per KV head
    (``DecodeCompressor.attended``'s form: flat positions, each head's count)."""
    return torch.arange(length, device=device).repeat(n_kv), [length] * n_kv


def gather_padded(pool: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, Lmax, Hk, d]`` rows of ``pool`` for each request (zeros past its length)."""
    valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lengths[:, None]
    return pool[slots.clamp(min=0) * valid] * valid[..., None, None]


def select_decode_kv_batched(recent_q: torch.Tensor, k: torch.Tensor, slots: torch.Tensor,
                             lengths: torch.Tensor, *, budget: int, sink: int = 4, recent: int = 32
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_decode_kv`` for a batch: ``recent_q [B, w, H, d]`` -> (``indptr [B*Hk+1]``,
    ``positions [nnz]``), each row ascending with ``min(budget, lengths[b])`` entries."""
    validate_budget(budget, sink, recent)
    n_req, n_kv = slots.shape[0], k.shape[1]
    scores = attention_mass_padded(recent_q, gather_padded(k, slots, lengths), lengths)  # [B, Hk, Lmax]
    kept, valid = keep_top_padded(scores.view(n_req * n_kv, -1), lengths.repeat_interleave(n_kv),
                                  budget, sink, recent)
    indptr = torch.zeros(n_req * n_kv + 1, dtype=torch.long, device=k.device)
    indptr[1:] = valid.sum(-1).cumsum(0)
    return indptr, kept[valid]


def batched_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                             indptr: torch.Tensor, positions: torch.Tensor, method: str = "auto"
                             ) -> torch.Tensor:
    """``[B, H, d]``: each request's decode query over its selected positions per KV head.

    ``method``: ``"tensor"`` (any device: one padded gather and two batched float32 matmuls
    for the whole batch; the reference), ``"fused"`` (CPU: the same gather, then torch's fused
    CPU attention kernel in the pool's dtype, each ``(request, KV head)`` one batch entry with its
    query heads as rows, padding masked), ``"loops"`` (CPU, numba: ``cpu_loops.sparse_decode``,
    rows read in place) or ``"auto"``: on a CPU the fused kernel for bfloat16 (and float16) K/V,
    the loops for float32; elsewhere, and for other dtypes, the tensor ops.  Measured
    (``benchmarks/decode_attention.py``; 9 query / 3 KV heads, d 64): on a Xeon with AMX, bf16,
    budget 1024 over 8K, fused 0.21 / tensor 0.30 / loops 0.83 ms for one request, 1.05 / 2.58 /
    3.09 ms for 8, a full read of 7.4K 1.01 / 1.36 / 2.61 ms; on an AMD EPYC with AVX-512 bf16,
    tensor 0.29 / loops 0.79 ms for one request, and in float32 the loops win from 8 requests or
    a full read on (4.5 vs 6.6 ms, 2.4 vs 5.7 ms).
    """
    if method not in ("auto", "fused", "loops", "tensor"):
        raise ValueError(f"method must be 'auto', 'fused', 'loops' or 'tensor', got {method!r}")
    n_req, n_heads, d = q.shape
    n_kv = k.shape[1]
    group = check_gqa(n_heads, n_kv)
    on_cpu = q.device.type == "cpu"
    usable = cpu_loops.supports(k) and v.dtype == k.dtype and on_cpu
    if method == "loops" and not usable:
        raise ValueError(f"method 'loops' needs numba and CPU float32/bfloat16 K/V, got {k.dtype}/{v.dtype} "
                         f"on {k.device}")
    if method == "fused" and not (on_cpu and k.dtype == v.dtype == q.dtype):
        raise ValueError(f"method 'fused' needs CPU tensors of one dtype, got q {q.dtype}, K/V {k.dtype}/{v.dtype} "
                         f"on {q.device}")
    if method == "auto" and on_cpu:
        if usable and k.dtype == torch.float32:
            method = "loops"
        elif k.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype:
            method = "fused"
    if method == "loops":
        return cpu_loops.sparse_decode(q, k, v, slots, indptr, positions).to(q.dtype)
    ks, vs, valid = _gather_selected(k, v, slots, indptr, positions)  # [B*Hk, W, d], [B*Hk, W]
    qg = q.reshape(n_req * n_kv, group, d)
    if method == "fused":
        pad = None
        if valid is not None:
            pad = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
            pad = pad[:, None, None, :]
        out, _ = attend(qg[:, None], ks[:, None], vs[:, None], scale=d**-0.5, mask=pad)
        return out.view(n_req, n_heads, d)
    logits = torch.bmm(qg.float(), ks.float().transpose(1, 2)) * d**-0.5
    if valid is not None:
        logits.masked_fill_(~valid[:, None, :], float("-inf"))
    out = torch.bmm(torch.softmax(logits, dim=-1), vs.float())
    return out.view(n_req, n_heads, d).to(q.dtype)


def _gather_selected(k, v, slots, indptr, positions):
    """Each ``(request, KV head)`` row's selected keys and values, padded to the widest row:
    ``[B*Hk, W, d]`` twice (the pool's dtype), and which entries are real (``[B*Hk, W]``; ``None``
    when every row has ``W``, the server's usual case: a few tensor ops less per layer and step)."""
    n_req, n_kv, d = slots.shape[0], k.shape[1], k.shape[2]
    n_rows = indptr.numel() - 1
    counts = indptr[1:] - indptr[:-1]  # [B*Hk]
    head = torch.arange(n_kv, device=k.device).repeat(n_req)[:, None]
    if n_rows and bool((counts == counts[0]).all()):
        width, valid = positions.numel() // n_rows, None
        pos = positions.view(n_req, n_kv * width)
    else:
        width = int(counts.max()) if counts.numel() else 0
        col = torch.arange(width, device=k.device)
        valid = col[None, :] < counts[:, None]
        flat = (indptr[:-1, None] + col[None, :]).clamp(max=max(positions.numel() - 1, 0))
        pos = torch.where(valid, positions[flat], torch.zeros_like(flat)).view(n_req, n_kv * width)
    # Rows of the pool seen as [T * Hk, d]: one index_select each for keys and values.
    rows = (slots.gather(1, pos).view(n_rows, width).long() * n_kv + head).view(-1)
    ks = k.reshape(-1, d).index_select(0, rows).view(n_rows, width, d)
    vs = v.reshape(-1, d).index_select(0, rows).view(n_rows, width, d)
    return ks, vs, valid
