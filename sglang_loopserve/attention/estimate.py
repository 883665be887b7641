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

from dataclasses import dataclass

import torch

from .logits import scoring_logits
from .workspace import scratch

#: Sampled rows masked together on a CPU (the masked area follows the causal edge).
_MASK_CHUNK = 16


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
    logits = scratch("estimate.probs", (n_kv, group * n_rows, n_ctx), torch.float32, q.device)
    scoring_logits(qs, k.permute(1, 2, 0), out=logits)
    probs = logits.view(n_heads, n_rows, n_ctx)
    if probs.device.type == "cpu":
        # Keys after a sampled query's position, masked per chunk of rows from
        # the chunk's earliest position on: the masked area follows the causal
        # edge (a strided row early in the turn sees few of the new keys).
        for at in range(0, n_rows, _MASK_CHUNK):
            chunk = positions[at:at + _MASK_CHUNK]
            first = int(chunk[0]) + 1
            if first < n_ctx:
                future = torch.arange(first, n_ctx)[None, :] > chunk[:, None]
                probs[:, at:at + _MASK_CHUNK, first:].masked_fill_(future, float("-inf"))
        # In place: the CPU kernel works row by row, reading a row before writing it.
        torch.ops.aten._softmax.out(probs, -1, False, out=probs)
    else:  # every column masked, without a host sync
        future = torch.arange(n_ctx, device=q.device)[None, :] > positions[:, None]
        probs = torch.softmax(probs.masked_fill_(future, float("-inf")), dim=-1)
    return AttentionSample(rows=rows, positions=positions, probs=probs)
