"""The baselines' static prefill patterns, as lines for LoopServe's block mask and kernels.

Each pattern gives every query about ``budget`` keys (the server passes its
decode budget: prefill and decode compared at one budget) and is expressed as
``VerticalSlashLines`` (columns = keys every query reads, diagonals = key
offsets), so ``BlockMask.from_lines`` and the same kernels run it:

* ``a_shape``: the first ``sink_keys`` columns and the ``budget`` nearest
  diagonals (StreamingLLM's pattern applied to prefill; MInference's A-shape);
* ``tri_shape``: ``a_shape`` plus every key for the last query block, so the
  turn's final rows (where a question at the end sits) see everything
  (SCBench's Tri-shape);
* ``minference``: per head, the ``budget / 2`` columns and ``budget / 2``
  diagonals holding the most attention of the turn's last 64 queries
  (MInference's vertical-slash pattern with fixed sizes, no alpha), plus the
  sink columns and the nearest ``local`` diagonals.
"""

from __future__ import annotations

import torch

from .select import VerticalSlashLines, ascending_lists

PATTERNS = ("a_shape", "tri_shape", "minference")
#: MInference estimates its lines from the turn's last 64 queries.
LAST_QUERIES = 64


def _lines(cols: torch.Tensor, diags: torch.Tensor, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[H, G, n_ctx]`` column and diagonal bitmaps -> ``(lines [H, G, L], counts [H, G])`` in
    ``VerticalSlashLines``' encoding: columns ``j`` then diagonals ``n_ctx + d``, padded with
    ``2 n_ctx`` after each row's lines."""
    both = torch.cat([cols, diags], dim=-1)
    return ascending_lists(both), both.sum(-1)


def _band(n_heads: int, n_ctx: int, first: int, device) -> torch.Tensor:
    """``[H, 1, n_ctx]`` bitmap of positions ``0 .. first - 1``."""
    bits = torch.zeros(n_heads, 1, n_ctx, dtype=torch.bool, device=device)
    bits[..., : max(0, min(first, n_ctx))] = True
    return bits


def _minference_bitmaps(q, k, budget, sink_keys, local):
    """Columns and diagonals with the most attention of the last queries, per head."""
    n_new, n_heads, d = q.shape
    n_ctx, n_kv = k.shape[:2]
    last = min(LAST_QUERIES, n_new)
    rows = torch.arange(n_ctx - last, n_ctx, device=q.device)  # absolute positions of the last queries
    qs = q[-last:].float().transpose(0, 1)  # [H, r, d]
    ks = k.float().repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)  # [H, n_ctx, d]
    logits = qs @ ks.transpose(1, 2) * d**-0.5  # [H, r, n_ctx]
    keys = torch.arange(n_ctx, device=q.device)
    offsets = rows[:, None] - keys[None, :]  # diagonal of each cell
    logits.masked_fill_(offsets[None] < 0, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    vertical = probs.sum(1)  # [H, n_ctx]
    slash = torch.zeros(n_heads, n_ctx, device=q.device).scatter_add_(
        1, offsets.clamp(min=0).reshape(1, -1).expand(n_heads, -1), probs.reshape(n_heads, -1))
    cols = _band(n_heads, n_ctx, sink_keys, q.device)
    diags = _band(n_heads, n_ctx, local, q.device)
    for bits, scores in ((cols, vertical), (diags, slash)):
        top = scores.topk(min(max(budget // 2, 1), n_ctx), dim=-1).indices
        bits[:, 0].scatter_(1, top, True)
    return cols, diags


def static_lines(pattern: str, q: torch.Tensor, k: torch.Tensor, *, budget: int, block_size: int,
                 sink_keys: int | None = None, local: int | None = None) -> VerticalSlashLines:
    """The lines of ``pattern`` for a turn: ``q [n_new, H, d]`` (post-RoPE) over ``k [n_ctx, Hk, d]``
    (cached history first).  ``sink_keys``: leading columns (default ``block_size``); ``local``:
    nearest diagonals of MInference (default ``block_size``)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    n_new, n_heads = q.shape[:2]
    n_ctx = k.shape[0]
    sink_keys = block_size if sink_keys is None else sink_keys
    local = block_size if local is None else local
    starts = torch.zeros(1, dtype=torch.long, device=q.device)
    if pattern == "minference":
        cols, diags = _minference_bitmaps(q, k, budget, sink_keys, local)
    else:
        cols = _band(n_heads, n_ctx, sink_keys, q.device)
        diags = _band(n_heads, n_ctx, budget, q.device)
        last_block = (-(-n_new // block_size) - 1) * block_size
        if pattern == "tri_shape" and last_block > 0:
            # A second segment: the last query block's rows read every key.
            cols = torch.cat([cols, torch.ones_like(cols)], dim=1)
            diags = torch.cat([diags, diags], dim=1)
            starts = torch.tensor([0, last_block], device=q.device)
        elif pattern == "tri_shape":  # one block: all of it reads everything
            cols = torch.ones_like(cols)
    lines, counts = _lines(cols, diags, n_ctx)
    return VerticalSlashLines(lines, counts, starts, block_size, n_new, n_ctx)
