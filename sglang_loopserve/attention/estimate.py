"""Estimation: attention of a sample of the new queries, softmax in fp32.

LoopServe picks its lines per turn from the attention of a few query rows
(method.md, phase 1, step 1).  We sample the last ``q_window`` queries of the
new input (the end of a turn is where an instruction usually sits) *and* a
strided sample of the same size over the rest of it, so that a question at the
start or in the middle of a turn is seen too.

Positions: the new tokens are the last ``n_new`` of a sequence of ``n_ctx``,
so new query ``i`` sits at position ``n_ctx - n_new + i`` and sees keys
``0..n_ctx - n_new + i``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .logits import scoring_logits
from .workspace import scratch

def sample_query_rows(n_new: int, q_window: int, device=None) -> torch.Tensor:
    """Sorted, unique indices (into the new queries) of the rows to estimate from.

    The last ``min(q_window, n_new)`` rows, plus up to ``q_window`` rows spread
    evenly over the remaining ``n_new - q_window`` (the centre of each stride).
    """
    if q_window < 1:
        raise ValueError(f"q_window must be >= 1, got {q_window}")
    tail = min(q_window, n_new)
    rest = n_new - tail
    last = torch.arange(rest, n_new, device=device)
    if rest == 0:
        return last
    m = min(q_window, rest)
    strided = (torch.arange(m, device=device) * rest + rest // 2) // m
    return torch.cat([strided, last])


_bias_cache = threading.local()


def _causal_bias(positions: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """``[S, n_ctx]`` float32: 0 up to each sampled row's position, -inf after it.  Every layer of a
    forward samples the same rows: on a CPU the last bias is kept (per thread) and reused."""
    if positions.device.type != "cpu":
        future = torch.arange(n_ctx, device=positions.device)[None, :] > positions[:, None]
        return torch.zeros(future.shape, device=positions.device).masked_fill_(future, float("-inf"))
    key = (n_ctx, tuple(positions.tolist()))
    if getattr(_bias_cache, "key", None) != key:
        future = torch.arange(n_ctx)[None, :] > positions[:, None]
        _bias_cache.bias = torch.zeros(future.shape).masked_fill_(future, float("-inf"))
        _bias_cache.key = key
    return _bias_cache.bias


@dataclass
class AttentionSample:
    """Softmax rows of the sampled queries over every key they may see.

    ``probs[h, s, j]`` is query row ``rows[s]``'s attention to key ``j`` in head
    ``h`` (zero beyond the causal limit); each row sums to one.
    """

    rows: torch.Tensor  # [S] indices into the new queries
    positions: torch.Tensor  # [S] absolute positions of those queries
    probs: torch.Tensor  # [H, S, n_ctx] float32


def sample_attention(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float | None = None
) -> AttentionSample:
    """Attention probabilities of ``q[rows]`` over the causal keys, as fp32.

    ``q`` is ``[n_new, H, d]``, ``k`` is ``[n_ctx, Hk, d]`` (GQA: each key head
    serves ``H // Hk`` query heads); ``rows`` ascending.  Cost: ``S * n_ctx * H * d``
    multiply-adds and a softmax, in place in a reused buffer
    (``workspace.scratch``): ``probs`` is valid until the next call in this thread.

    With bf16 or fp16 keys the product runs in their dtype (``logits.py``: one
    rounding per logit, 4x faster on a CPU); the mask and the softmax run in
    fp32.  The lines chosen from it keep the same mass (tests/test_sparse_prefill.py).
    """
    n_new, n_heads, d = q.shape
    n_ctx, n_kv, _ = k.shape
    group = n_heads // n_kv
    n_rows = rows.numel()
    scale = d**-0.5 if scale is None else scale
    positions = rows + (n_ctx - n_new)
    qs = (q[rows].float() * scale).permute(1, 0, 2).reshape(n_kv, group * n_rows, d)  # [Hk, g*S, d]
    # The causal mask as a bias (0, or -inf on the keys after a row's position) added in the pass
    # that writes the fp32 logits: no pass of its own.
    bias = _causal_bias(positions, n_ctx)
    keys = scratch("estimate.keys", (n_kv, n_ctx, d), k.dtype, q.device)
    keys.copy_(k.transpose(0, 1))  # per head contiguous: the product reads it transposed in place
    logits = scratch("estimate.probs", (n_kv, group * n_rows, n_ctx), torch.float32, q.device)
    scoring_logits(qs, keys.transpose(1, 2), out=logits, bias=bias)
    probs = logits.view(n_heads, n_rows, n_ctx)
    if probs.device.type == "cpu":
        # In place: the CPU kernel works row by row, reading a row before writing it.
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
    else:
        probs = torch.softmax(probs, dim=-1)
    return AttentionSample(rows=rows, positions=positions, probs=probs)
