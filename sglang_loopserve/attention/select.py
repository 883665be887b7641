"""Selection: the fewest vertical and slash lines that cover ``alpha`` of the mass.

A *vertical line* is a key column ``j``; a *slash line* is a diagonal
``delta = query position - key position``.  The paper's greedy takes lines in
decreasing mass until the covered mass reaches ``alpha``.  Covered mass is the
mass of the **union** of covered cells: a cell on a chosen column *and* a
chosen diagonal counts once.  We compute it exactly on the sampled rows:

1. rank the ``2 * n_ctx`` lines of a group of rows by standalone mass (columns
   and diagonals in one list; sink columns and local diagonals first);
2. walk the cells on the first ``w`` lines of that list, counting each cell
   only through the earlier of its two lines (its column, its diagonal):
   a histogram over the list position, cumulated, is the exact union mass
   covered by the first ``k`` lines for every ``k <= w`` at once;
3. the smallest ``k`` reaching ``alpha`` of the total is the answer.  ``w``
   is twice the count the standalone masses alone would need (a lower bound,
   since the union never exceeds the standalone sum), and the list is only
   ranked that far (``topk``), growing it if a segment falls short.  The work
   is ``rows x w`` cells, not ``rows x n_ctx``.

All of it is batched over heads and segments: no loop per head.

Coverage must hold for *each part of the turn*, not only on average: a short
question at the start of a long turn may look at other keys than the rest.
So rows are selected in *segments* of ``rows_per_segment`` consecutive sampled
rows, each segment getting its own lines, and each query block takes the
union of the lines of the segments whose rows it spans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimate import AttentionSample


@dataclass
class VerticalSlashLines:
    """Per head and query block, the chosen key columns and diagonals."""

    columns: torch.Tensor  # [H, n_qblocks, n_ctx] bool: key column j chosen
    diagonals: torch.Tensor  # [H, n_qblocks, n_ctx] bool: diagonal delta chosen
    block_size: int
    n_new: int
    n_ctx: int
    segment_counts: torch.Tensor  # [H, G, 2] lines chosen per segment (columns, diagonals)

    @property
    def num_heads(self) -> int:
        return self.columns.shape[0]


def segment_bounds(rows: torch.Tensor, rows_per_segment: int, n_new: int) -> torch.Tensor:
    """First query row of each segment; segments tile ``[0, n_new)``.

    Segment ``g`` owns sampled rows ``g*rps .. (g+1)*rps - 1``; the unsampled
    rows between two segments are split at the midpoint.
    """
    first = rows[::rows_per_segment]
    last = rows[rows_per_segment - 1 :: rows_per_segment]
    starts = (last[: len(first) - 1] + first[1:] + 1) // 2
    return torch.cat([starts.new_zeros(1), starts])


def select_vertical_slash(
    sample: AttentionSample,
    n_new: int,
    *,
    alpha: float,
    block_size: int,
    sink: int = 4,
    local: int = 64,
    rows_per_segment: int = 8,
) -> VerticalSlashLines:
    """Choose, per head and query block, the lines covering ``alpha`` of the mass."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    chosen_col, chosen_diag = segment_lines(sample, alpha=alpha, sink=sink, local=local,
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
    return VerticalSlashLines(columns, diagonals, block_size, n_new, n_ctx, counts)


def segment_lines(sample: AttentionSample, *, alpha: float, sink: int, local: int,
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
