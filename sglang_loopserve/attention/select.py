"""Selection: the fewest vertical and slash lines that cover ``alpha`` of the mass.

A *vertical line* is a key column ``j``; a *slash line* is a diagonal
``delta = query position - key position``.  The paper's greedy takes lines in
decreasing mass until the covered mass reaches ``alpha``.  Covered mass is the
mass of the **union** of covered cells: a cell on a chosen column *and* a
chosen diagonal counts once.  We compute it exactly on the sampled rows:

1. rank all ``2 * n_ctx`` lines of a group of rows by their standalone mass
   (columns and diagonals in one list; sink columns and local diagonals first);
2. a cell ``(s, j)`` becomes covered at step ``min(rank(col j), rank(diag pos_s - j))``;
3. a histogram of cell mass over that step, cumulated, gives the covered mass
   after ``k`` lines for every ``k`` at once; the smallest ``k`` reaching
   ``alpha`` of the total is the answer.

Everything is one pass of tensor ops over ``[heads, rows, n_ctx]``: no loop
per head, no iterative greedy.

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
    probs, pos = sample.probs, sample.positions
    n_heads, n_rows, n_ctx = probs.shape
    dev = probs.device
    seg = torch.arange(n_rows, device=dev) // rows_per_segment  # [S]
    n_seg = int(seg[-1]) + 1

    # Diagonal index of every cell; cells right of the causal limit get index
    # n_ctx (a dump slot) and carry zero probability anyway.
    j = torch.arange(n_ctx, device=dev)
    delta = pos[:, None] - j[None, :]  # [S, n_ctx]
    delta = torch.where(delta >= 0, delta, torch.full_like(delta, n_ctx))

    # Standalone mass of each line per segment: [H, G, n_ctx] each.
    col_mass = probs.new_zeros(n_heads, n_seg, n_ctx).index_add_(1, seg, probs)
    diag_mass = probs.new_zeros(n_heads, n_seg * (n_ctx + 1))
    flat_delta = (seg[:, None] * (n_ctx + 1) + delta).reshape(1, -1).expand(n_heads, -1)
    diag_mass.scatter_add_(1, flat_delta, probs.reshape(n_heads, -1))
    diag_mass = diag_mass.view(n_heads, n_seg, n_ctx + 1)[..., :n_ctx]

    # Forced lines rank first: sink columns and local diagonals.
    forced_col = j < sink
    forced_diag = j < local
    col_mass = col_mass.masked_fill(forced_col, float("inf"))
    diag_mass = diag_mass.masked_fill(forced_diag, float("inf"))
    n_forced = int(forced_col.sum() + forced_diag.sum())

    # Rank of each line in the merged list (0 = heaviest).
    order = torch.cat([col_mass, diag_mass], dim=-1).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order, dtype=torch.int32)
    rank.scatter_(-1, order, torch.arange(2 * n_ctx, device=dev, dtype=torch.int32).expand_as(order))
    rank_col, rank_diag = rank[..., :n_ctx], rank[..., n_ctx:]

    # Step at which each sampled cell becomes covered.
    rc = rank_col[:, seg]  # [H, S, n_ctx]
    rd = torch.cat([rank_diag, rank_diag.new_full((n_heads, n_seg, 1), 2 * n_ctx)], -1)
    rd = rd[:, seg].gather(2, delta.expand(n_heads, -1, -1))
    step = torch.minimum(rc, rd).long()  # [H, S, n_ctx]

    # Covered mass after k lines, for every k: cumulated histogram over steps.
    hist = probs.new_zeros(n_heads, n_seg * 2 * n_ctx)
    flat_step = (seg[None, :, None] * (2 * n_ctx) + step).reshape(n_heads, -1)
    hist.scatter_add_(1, flat_step, probs.reshape(n_heads, -1))
    covered = hist.view(n_heads, n_seg, 2 * n_ctx).cumsum(-1)
    total = covered[..., -1:]
    n_lines = (covered < alpha * total).sum(-1) + 1  # [H, G]
    n_lines = n_lines.clamp(min=n_forced, max=2 * n_ctx)

    chosen_col = rank_col < n_lines[..., None]  # [H, G, n_ctx]
    chosen_diag = rank_diag < n_lines[..., None]
    counts = torch.stack([chosen_col.sum(-1), chosen_diag.sum(-1)], dim=-1)

    # Each query block takes the union of the segments its rows span.
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
