"""Estimation: attention of a sample of the new queries, softmax in fp32.

LoopServe picks its lines per turn from the attention of a few query rows
(the paper's phase 1, step 1).  We sample the last ``q_window`` queries of the
new input (the end of a turn is where an instruction usually sits) *and* a
strided sample of the same size over the rest of it, so that a question at the
start or in the middle of a turn is seen too.

Positions: the new tokens are the last ``n_new`` of a sequence of ``n_ctx``,
so new query ``i`` sits at position ``n_ctx - n_new + i`` and sees keys
``0..n_ctx - n_new + i``.
"""

from __future__ import annotations

import threading

import torch

from . import cpu_loops
from .logits import product_dtype, scoring_product
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


class AttentionSample:
    """Softmax rows of the sampled queries over every key they may see.

    ``probs[h, s, j]`` is query row ``rows[s]``'s attention to key ``j`` in head
    ``h`` (zero beyond the causal limit); each row sums to one, in float32.

    A sample is given by its probabilities, or by its ``logits`` (``[H, S,
    n_ctx]``, the scaled products in the keys' precision, unmasked: what lies
    after a row's position is not part of it).  From logits, ``probs`` is
    computed on first use: the CPU planner (``cpu_loops``) takes the softmax of
    each row where it reads it instead, and never writes ``probs`` at all.
    """

    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, probs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None):
        if (probs is None) == (logits is None):
            raise ValueError("AttentionSample takes probs or logits, one of them")
        self.rows = rows  # [S] indices into the new queries
        self.positions = positions  # [S] absolute positions of those queries
        self.logits = logits
        self._probs = probs

    @property
    def shape(self) -> torch.Size:
        """``[H, S, n_ctx]``."""
        return (self.logits if self._probs is None else self._probs).shape

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def probs(self) -> torch.Tensor:
        """``[H, S, n_ctx]`` float32 (from logits: computed once, in a reused buffer)."""
        if self._probs is None:
            n_heads, n_rows, n_ctx = self.logits.shape
            probs = scratch("estimate.probs", (n_heads, n_rows, n_ctx), torch.float32, self.device)
            probs.copy_(self.logits)
            # The causal mask as a bias (0, or -inf after a row's position), then the softmax in place.
            probs.add_(_causal_bias(self.positions, n_ctx))
            if probs.device.type == "cpu":
                # In place: the CPU kernel works row by row, reading a row before writing it.
                torch.ops.aten._softmax.out(probs, -1, False, out=probs)
            else:
                probs = torch.softmax(probs, dim=-1)
            self._probs = probs
        return self._probs


def sample_attention(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float | None = None
) -> AttentionSample:
    """Attention of ``q[rows]`` over the causal keys: a sample given by its logits.

    ``q`` is ``[n_new, H, d]``, ``k`` is ``[n_ctx, Hk, d]`` (GQA: each key head
    serves ``H // Hk`` query heads); ``rows`` ascending.  Cost: ``S * n_ctx * H * d``
    multiply-adds, in a reused buffer (``workspace.scratch``: the sample is valid
    until the next call in this thread), then on a GPU (or a CPU without numba)
    the softmax (``AttentionSample.probs``).  On a CPU with numba the planner
    takes each row's softmax where it reads the row.

    With bf16 or fp16 keys the product runs in their dtype (``logits.py``: one
    rounding per logit, 4x faster on a CPU); the softmax runs in fp32.  The
    lines chosen from it keep the same mass (tests/test_sparse_prefill.py).
    """
    n_new, n_heads, d = q.shape
    n_ctx, n_kv, _ = k.shape
    group = n_heads // n_kv
    n_rows = rows.numel()
    scale = d**-0.5 if scale is None else scale
    positions = rows + (n_ctx - n_new)
    qs = (q[rows].float() * scale).permute(1, 0, 2).reshape(n_kv, group * n_rows, d)  # [Hk, g*S, d]
    keys = scratch("estimate.keys", (n_kv, n_ctx, d), k.dtype, q.device)
    keys.copy_(k.transpose(0, 1))  # per head contiguous: the product reads it transposed in place
    product = scratch("estimate.logits", (n_kv, group * n_rows, n_ctx), product_dtype(k.dtype), q.device)
    scoring_product(qs, keys.transpose(1, 2), out=product)  # [Hk, g*S, n_ctx]
    sample = AttentionSample(rows=rows, positions=positions, logits=product.view(n_heads, n_rows, n_ctx))
    if not (q.device.type == "cpu" and cpu_loops.available()):
        sample.probs  # noqa: B018 - the softmax belongs to the estimate's time
    return sample
