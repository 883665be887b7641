"""``sparse_prefill_attention``: LoopServe's online sparse prefill for one sequence.

estimate (``estimate.py``) -> select lines (``select.py``) -> ``BlockMask``
(``block_mask.py``) -> a block-sparse kernel (``kernels/``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .block_mask import BlockMask
from .estimate import sample_attention, sample_query_rows
from .kernels import KERNELS, default_kernel
from .select import select_vertical_slash


@dataclass
class SparsePrefillStats:
    density: float  # fraction of causal (query, key) pairs computed, in (0, 1]
    head_density: torch.Tensor  # [H]
    vertical_counts: torch.Tensor  # [H] mean chosen columns per segment
    slash_counts: torch.Tensor  # [H] mean chosen diagonals per segment
    kernel: str
    timings: dict = field(default_factory=dict)  # seconds: estimate, index, attention
    #: ``[Hk, n_ctx]`` estimated attention mass per key (summed over the sampled
    #: rows and the query heads of each group); ``None`` when alpha = 1 (no estimate).
    #: Seeds the decode selection (``DecodeCompressor.seed``).
    key_scores: torch.Tensor | None = None


def validate_prefill_inputs(q, k, v, alpha, q_window, block_size) -> None:
    """Raise ``ValueError`` naming the first bad parameter."""
    if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not isinstance(q_window, int) or q_window < 1:
        raise ValueError(f"q_window must be an integer >= 1, got {q_window!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims of q, k, v differ: q {q.shape[-1]}, k/v {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads H={q.shape[1]} must be a multiple of key heads "
                         f"Hk={k.shape[1]} (H % Hk != 0)")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"n_new={q.shape[0]} new queries exceed n_ctx={k.shape[0]} keys")
    if q.shape[0] < 1:
        raise ValueError("q must hold at least one new token (n_new >= 1)")


def _now(device) -> float:
    """Wall time after the device's queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _plan(q, k, *, alpha, q_window, block_size, sink, local, rows_per_segment, timings):
    """Estimate, select and index: ``(BlockMask, segment counts [H, S, 2], sample or None)``."""
    t0 = time.perf_counter()
    n_new, n_heads = q.shape[0], q.shape[1]
    if alpha >= 1.0:
        mask = BlockMask.dense(n_heads, n_new, k.shape[0], block_size, device=q.device)
        counts = torch.full((n_heads, 1, 2), k.shape[0], device=q.device)
        if timings is not None:
            timings.update(estimate=0.0, index=_now(q.device) - t0)
        return mask, counts, None
    rows = sample_query_rows(n_new, q_window, device=q.device)
    sample = sample_attention(q, k, rows)
    t1 = _now(q.device) if timings is not None else 0.0
    lines = select_vertical_slash(sample, n_new, alpha=alpha, block_size=block_size, sink=sink,
                                  local=block_size if local is None else local,
                                  rows_per_segment=rows_per_segment)
    mask = BlockMask.from_lines(lines)
    if timings is not None:
        timings.update(estimate=t1 - t0, index=_now(q.device) - t1)
    return mask, lines.segment_counts, sample


def build_block_mask(q, k, *, alpha, q_window, block_size, sink=4, local=None,
                     rows_per_segment=8, timings=None) -> tuple[BlockMask, torch.Tensor]:
    """Estimate, select and index: the ``BlockMask`` and per-segment line counts."""
    mask, counts, _ = _plan(q, k, alpha=alpha, q_window=q_window, block_size=block_size, sink=sink,
                            local=local, rows_per_segment=rows_per_segment, timings=timings)
    return mask, counts


def sparse_prefill_attention(q, k, v, *, alpha: float = 0.95, q_window: int = 64,
                             block_size: int = 64, return_stats: bool = False,
                             kernel: str = "auto", sink: int = 4, local: int | None = None):
    """Attention of a turn's new tokens over the whole sequence, on the cells that matter.

    Args:
        q: ``[n_new, H, d]`` queries of the new tokens (post-RoPE).
        k, v: ``[n_ctx, Hk, d]`` keys and values of the whole sequence, cached
            history first, the new tokens last; ``H % Hk == 0`` (GQA).
        alpha: fraction of the estimated attention mass to cover, in (0, 1];
            1.0 computes dense causal attention.
        q_window: sampled query rows: the last ``q_window`` plus as many spread
            over the rest of the new tokens.
        block_size: query and key block size (power of two >= 16).
        return_stats: also return a ``SparsePrefillStats``.
        kernel: ``"auto"`` (fastest available for the device) or one of
            ``sglang_loopserve.attention.kernels.KERNELS``.
        sink: leading key columns always kept.
        local: diagonals ``0..local-1`` always kept (default ``block_size``).

    Returns ``out [n_new, H, d]`` in ``q.dtype``, or ``(out, stats)``.
    """
    validate_prefill_inputs(q, k, v, alpha, q_window, block_size)
    name = default_kernel(q.device) if kernel == "auto" else kernel
    if name not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}, got {kernel!r}")
    timings: dict = {}
    mask, counts, sample = _plan(q, k, alpha=float(alpha), q_window=q_window, block_size=block_size,
                                 sink=sink, local=local, rows_per_segment=8, timings=timings)
    t = time.perf_counter()
    out = KERNELS[name](q, k, v, mask)
    timings["attention"] = _now(q.device) - t
    if not return_stats:
        return out
    head_density = mask.head_density()
    key_scores = None
    if sample is not None:
        key_scores = sample.probs.sum(1).view(k.shape[1], -1, k.shape[0]).sum(1)  # [Hk, n_ctx]
    stats = SparsePrefillStats(
        density=float(head_density.mean()), head_density=head_density,
        vertical_counts=counts[..., 0].float().mean(-1), slash_counts=counts[..., 1].float().mean(-1),
        kernel=name, timings=timings, key_scores=key_scores)
    return out, stats
