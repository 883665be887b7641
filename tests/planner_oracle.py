"""A dense planner: the oracle of ``test_planner.py``.

It materialises ``[H, n_qblocks, n_ctx]`` tensors, too slow for serving but
simple, so that the served planner (``sglang_loopserve.attention.select`` /
``block_mask``) can be checked to select the same lines and build the same
``BlockMask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_loopserve.attention.block_mask import BlockMask, per_key_block, query_block_span
from sglang_loopserve.attention.estimate import AttentionSample
from sglang_loopserve.attention.select import segment_bounds


@dataclass
class DenseLines:
    """Per head and query block, the chosen key columns and diagonals."""

    columns: torch.Tensor  # [H, n_qblocks, n_ctx] bool
    diagonals: torch.Tensor  # [H, n_qblocks, n_ctx] bool
    block_size: int
    n_new: int
    n_ctx: int
    segment_counts: torch.Tensor  # [H, G, 2]


def oracle_select(
    sample: AttentionSample,
    n_new: int,
    *,
    alpha: float,
    block_size: int,
    sink: int = 4,
    local: int = 64,
    rows_per_segment: int = 8,
) -> DenseLines:
    """Per head and query block, the lines covering ``alpha`` (dense ``[H, n_qblocks, n_ctx]``)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    chosen_col, chosen_diag = oracle_segment_lines(sample, alpha=alpha, sink=sink, local=local,
                                            rows_per_segment=rows_per_segment)
    counts = torch.stack([chosen_col.sum(-1), chosen_diag.sum(-1)], dim=-1)
    dev = chosen_col.device

    # Each query block takes the union of the segments its rows span.
    n_ctx = chosen_col.shape[-1]
    starts = segment_bounds(sample.rows, rows_per_segment, n_new)
    n_qb = -(-n_new // block_size)
    first_row = torch.arange(n_qb, device=dev) * block_size
    last_row = (first_row + block_size).clamp(max=n_new) - 1
    g_lo = torch.searchsorted(starts, first_row, right=True) - 1
    g_hi = torch.searchsorted(starts, last_row, right=True) - 1
    columns = chosen_col[:, g_lo]
    diagonals = chosen_diag[:, g_lo]
    for extra in range(1, int((g_hi - g_lo).max()) + 1):
        g = torch.minimum(g_lo + extra, g_hi)
        columns |= chosen_col[:, g]
        diagonals |= chosen_diag[:, g]
    return DenseLines(columns, diagonals, block_size, n_new, n_ctx, counts)



def oracle_segment_lines(sample: AttentionSample, *, alpha: float, sink: int, local: int,
                  rows_per_segment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head and segment of sampled rows, the chosen columns and diagonals.

    Returns two ``[H, G, n_ctx]`` bool tensors; their union covers at least
    ``alpha`` of each segment's sampled mass (``G = ceil(S / rows_per_segment)``).
    """
    probs, pos = sample.probs, sample.positions
    n_heads, n_rows, n_ctx = probs.shape
    dev = probs.device
    seg = torch.arange(n_rows, device=dev) // rows_per_segment  # [S]
    n_seg = int(seg[-1]) + 1

    # Diagonal of every cell; cells right of the causal limit go to a dump
    # slot (index n_ctx) and carry zero probability anyway.
    j = torch.arange(n_ctx, device=dev)
    delta = pos[:, None] - j[None, :]  # [S, n_ctx]
    delta = torch.where(delta >= 0, delta, torch.full_like(delta, n_ctx))

    # Standalone mass of each line per segment: [H, G, n_ctx] each.
    col_mass = probs.new_zeros(n_heads, n_seg, n_ctx).index_add_(1, seg, probs)
    diag_mass = probs.new_zeros(n_heads, n_seg * (n_ctx + 1))
    flat_delta = (seg[:, None] * (n_ctx + 1) + delta).view(1, -1).expand(n_heads, -1)
    diag_mass.scatter_add_(1, flat_delta, probs.view(n_heads, -1))
    diag_mass = diag_mass.view(n_heads, n_seg, n_ctx + 1)[..., :n_ctx]
    mass = torch.cat([col_mass, diag_mass], dim=-1)  # [H, G, 2n]

    # Ranking: forced lines (sink columns, local diagonals) first, then by mass.
    # Only the head of the list matters; ``topk`` of a short prefix is much
    # cheaper than a full sort, which is the fallback for diffuse heads.
    forced = torch.cat([j < sink, j < local])
    n_forced = int(forced.sum())
    ranked = mass.masked_fill(forced, float("inf"))
    target = alpha * col_mass.sum(-1, keepdim=True)  # [H, G, 1]; every cell is in one column
    prefix = min(2 * n_ctx, max(1024, 2 * n_forced))
    width = None
    while True:  # at most twice: a short prefix, then (diffuse heads) everything
        order = ranked.topk(prefix, dim=-1).indices if prefix < 2 * n_ctx else ranked.argsort(
            dim=-1, descending=True)
        if width is None:
            # The union needs at least as many lines as the standalone sums say.
            cum = mass.gather(-1, order).cumsum(-1)
            lower = torch.searchsorted(cum, target.clamp(max=cum[..., -1:])) + 1
            width = 2 * int(lower.max()) + 64
        # Lines past the prefix rank after every line in it.
        rank = torch.full_like(mass, prefix, dtype=torch.long)
        rank.scatter_(-1, order, torch.arange(prefix, device=dev).expand_as(order))
        hist, done = [], 0  # the coverage histogram, grown in chunks of list positions
        while True:
            width = min(width, prefix)
            hist.append(_union_hist(probs, order, rank, done, width, seg, pos, n_seg))
            done = width
            covered = torch.cat(hist, -1).cumsum(-1)  # [H, G, width]
            reached = bool((covered[..., -1] >= target.squeeze(-1) * (1 - 1e-6)).all())
            if reached or width == prefix:
                break
            width *= 2
        if reached or prefix == 2 * n_ctx:
            break
        prefix = 2 * n_ctx
    n_lines = (covered < target * (1 - 1e-6)).sum(-1) + 1
    n_lines = n_lines.clamp(min=n_forced, max=2 * n_ctx)

    chosen = rank < n_lines[..., None]
    return chosen[..., :n_ctx], chosen[..., n_ctx:]


def _union_hist(probs, order, rank, start, stop, seg, pos, n_seg):
    """``[H, G, stop - start]``: sampled mass first covered by the line at each list position.

    Every cell of a row on one of the lines at positions ``start..stop-1`` of
    its segment's list is visited through that line and counted only through
    the earlier of its two lines (its column and its diagonal), so shared cells
    count once; the cumulated histogram is the exact union coverage.
    """
    n_heads, _, n_ctx = probs.shape
    lines = order[..., start:stop][:, seg]  # [H, S, w]
    is_col = lines < n_ctx
    p = pos[None, :, None]
    key = torch.where(is_col, lines, p - (lines - n_ctx))  # the cell's key on this row
    valid = (key >= 0) & (key <= p)
    key = key.clamp(0, n_ctx - 1)
    other = torch.where(is_col, n_ctx + (p - key).clamp(min=0), key)  # the cell's other line
    first = valid & (torch.arange(start, stop, device=probs.device) < _rank_at(rank, seg, other))
    mass = probs.gather(-1, key) * first
    return probs.new_zeros(n_heads, n_seg, stop - start).index_add_(1, seg, mass)


def _rank_at(rank, seg, line):
    """``rank[h, seg[s], line[h, s, i]]`` for every ``(h, s, i)``."""
    n_heads, n_seg, n_lines = rank.shape
    flat = seg[None, :, None] * n_lines + line
    return rank.view(n_heads, -1).gather(1, flat.view(n_heads, -1)).view_as(line)


def oracle_block_mask(lines: DenseLines, promote_columns: int | None = None) -> BlockMask:
    """The dense builder: scatters over ``[H, n_qblocks, n_ctx]``."""
    n_heads, n_qb, n_ctx = lines.columns.shape
    bs, n_new = lines.block_size, lines.n_new
    dev = lines.columns.device
    n_kb = -(-n_ctx // bs)
    promote = bs // 2 if promote_columns is None else promote_columns
    q_first, q_last = query_block_span(n_new, n_ctx, bs, dev)
    delta = torch.arange(n_ctx, device=dev)
    # Key block of the first and last key a diagonal touches; a diagonal
    # that lies wholly before key 0 goes to the dump slot n_kb.
    k_hi = q_last[:, None] - delta[None, :]
    k_lo = (q_first[:, None] - delta[None, :]).clamp(min=0)
    dump = torch.full_like(k_hi, n_kb)
    kb_hi = torch.where(k_hi >= 0, k_hi // bs, dump)
    kb_lo = torch.where(k_hi >= 0, k_lo // bs, dump)

    hits = torch.zeros(n_heads, n_qb, n_kb + 1, device=dev)
    diag = lines.diagonals.float()
    hits.scatter_add_(2, kb_lo.expand(n_heads, -1, -1), diag)
    hits.scatter_add_(2, kb_hi.expand(n_heads, -1, -1), diag)
    blocks = hits[..., :n_kb] > 0
    # The query block's own diagonal blocks, always.
    own = torch.arange(n_kb, device=dev)
    blocks |= (own[None, :] >= (q_first // bs)[:, None]) & (own[None, :] <= (q_last // bs)[:, None])

    # Columns strictly before the query block; later ones are in its own
    # (visited) diagonal blocks or in its future.
    cols = lines.columns & (delta[None, None, :] < q_first[None, :, None])
    blocks |= per_key_block(cols, bs).sum(-1) >= promote
    cols &= ~blocks.repeat_interleave(bs, dim=-1)[..., :n_ctx]

    return BlockMask._from_dense(blocks, cols, n_new, n_ctx, bs)
