"""Selection: the fewest vertical and slash lines that cover ``alpha`` of the mass.

A *vertical line* is a key column ``j``; a *slash line* is a diagonal
``delta = query position - key position``.  The paper's greedy takes lines in
decreasing mass until the covered mass reaches ``alpha``.  Covered mass is the
mass of the **union** of covered cells: a cell on a chosen column *and* a
chosen diagonal counts once.  We compute it exactly on the sampled rows.

Coverage must hold for *each part of the turn*, not only on average: a short
question at the start of a long turn may look at other keys than the rest.
So rows are selected in *segments* of ``rows_per_segment`` consecutive sampled
rows; each segment gets its own lines, and each query block later takes the
union of the lines of the segments whose rows it spans (``block_mask.py``).

Per segment (one *problem* of the batched work, ``H x G`` of them):

1. the standalone mass of every line (``2 * n_ctx`` of them: columns, then
   diagonals);
2. the lines in decreasing mass, forced lines (sink columns, local
   diagonals) first;
3. the union coverage of the first ``k`` lines, for growing ``k``, until it
   reaches ``alpha`` of the segment's sampled mass: that ``k`` is the answer.

Two implementations of the same greedy, chosen by device (tests check they
agree with each other and with a dense planner, ``tests/planner_oracle.py``):

* CPU: ``cpu_loops`` (numba), one loop nest per problem: masses in one pass,
  lines from a bucketed order, each line adding only its cells that the other
  kind has not covered yet.
* other devices: batched tensor ops (``_tensor_lines``): ``topk`` ranks a
  prefix of the lines (grown for the problems that need more, not for all),
  and the union coverage of every prefix comes from the standalone masses
  cumulated minus the cells counted twice, found by walking the prefix's
  columns (see ``_union_count``).

The answer is kept as line lists per segment (``VerticalSlashLines``), never
as ``[H, n_qblocks, n_ctx]`` tensors: the work is the estimate's size
(``H x S x n_ctx``) plus the lines chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import cpu_loops
from .estimate import AttentionSample
from .workspace import scratch

#: Relative tolerance of the coverage test (float sums in another order must
#: not flip a line in or out).
_TOL = 1e-6


@dataclass
class VerticalSlashLines:
    """Per head and segment of the turn, the lines the greedy chose, in the order it took them
    (by decreasing mass; the CPU loops take a mass bucket the greedy cannot stop in as a whole,
    in line order: ``cpu_loops``).  A set, as far as every consumer is concerned.

    ``lines[h, g, :counts[h, g]]`` are segment ``g``'s lines: a column ``j``
    is ``j``, a diagonal ``d`` is ``n_ctx + d``; the rest is padding
    (``2 * n_ctx``).  Segment ``g`` owns the new-query rows
    ``segment_starts[g] .. segment_starts[g + 1] - 1``.
    """

    lines: torch.Tensor  # [H, G, L] int, in the order taken, padded with 2 * n_ctx
    counts: torch.Tensor  # [H, G]
    segment_starts: torch.Tensor  # [G] first new-query row of each segment
    block_size: int
    n_new: int
    n_ctx: int
    #: ``[H, n_ctx]``: the sampled attention mass of each key (column masses summed over the
    #: segments; what the decode selection is seeded from).
    key_mass: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.lines.shape[0]

    @property
    def n_qblocks(self) -> int:
        return -(-self.n_new // self.block_size)

    @property
    def segment_counts(self) -> torch.Tensor:
        """``[H, G, 2]``: columns and diagonals chosen per segment."""
        valid = self.lines < 2 * self.n_ctx
        n_cols = (valid & (self.lines < self.n_ctx)).sum(-1)
        return torch.stack([n_cols, valid.sum(-1) - n_cols], dim=-1)

    def bitmaps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[H, G, n_ctx]`` bool each: the chosen columns and diagonals per segment."""
        n = self.n_ctx
        bits = torch.zeros(*self.lines.shape[:2], 2 * n + 1, dtype=torch.bool, device=self.lines.device)
        bits.scatter_(-1, self.lines.long().clamp(max=2 * n), True)
        return bits[..., :n], bits[..., n:2 * n]

    def columns(self) -> torch.Tensor:
        """``[H, G, L]`` chosen columns per segment, ascending, padded with ``n_ctx``."""
        return ascending_lists(self.bitmaps()[0])

    def diagonals(self) -> torch.Tensor:
        """``[H, G, L]`` chosen diagonals per segment, ascending, padded with ``n_ctx``."""
        return ascending_lists(self.bitmaps()[1])

    def block_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last segment each query block's rows fall in: two ``[n_qblocks]`` tensors."""
        first_row = torch.arange(self.n_qblocks, device=self.lines.device) * self.block_size
        last_row = (first_row + self.block_size).clamp(max=self.n_new) - 1
        starts = self.segment_starts
        return (torch.searchsorted(starts, first_row, right=True) - 1,
                torch.searchsorted(starts, last_row, right=True) - 1)

    def per_query_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[H, n_qblocks, n_ctx]`` bool each: the lines each query block takes (the union over
        its segments).  Dense: for tests and small inputs only."""
        cols, diags = self.bitmaps()
        g_lo, g_hi = self.block_segments()
        seg = torch.arange(cols.shape[1], device=cols.device)
        spans = (seg[None, :] >= g_lo[:, None]) & (seg[None, :] <= g_hi[:, None])  # [nqb, G]
        pick = spans.to(torch.float32)
        return (torch.einsum("bg,hgn->hbn", pick, cols.float()) > 0,
                torch.einsum("bg,hgn->hbn", pick, diags.float()) > 0)


def ascending_lists(bits: torch.Tensor) -> torch.Tensor:
    """``[..., L]``: the set positions of ``bits [..., n]`` ascending, padded with ``n``
    (``L``: the largest count, at least 1).  A cumulative count places each
    position: no sort."""
    n = bits.shape[-1]
    width = max(int(bits.sum(-1).max()) if bits.numel() else 0, 1)
    slot = torch.where(bits, bits.cumsum(-1) - 1, width)
    out = torch.full((*bits.shape[:-1], width + 1), n, dtype=torch.long, device=bits.device)
    out.scatter_(-1, slot, torch.arange(n, device=bits.device).expand(bits.shape).contiguous())
    return out[..., :width]


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
    method: str = "auto",
) -> VerticalSlashLines:
    """Choose, per head and segment of the turn, the lines covering ``alpha`` of the mass.

    ``method``: ``"auto"`` (``"loops"`` on a CPU where numba is available, else
    ``"tensor"``), ``"loops"`` or ``"tensor"``: the same lines either way.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if method == "auto":
        method = "loops" if sample.device.type == "cpu" and cpu_loops.available() else "tensor"
    if method not in ("loops", "tensor"):
        raise ValueError(f"method must be 'auto', 'loops' or 'tensor', got {method!r}")
    lines, counts, key_mass = segment_lines(sample, alpha=alpha, sink=sink, local=local,
                                            rows_per_segment=rows_per_segment, method=method)
    starts = segment_bounds(sample.rows, rows_per_segment, n_new)
    return VerticalSlashLines(lines, counts, starts, block_size, n_new, sample.shape[-1], key_mass)


def segment_lines(sample: AttentionSample, *, alpha: float, sink: int, local: int,
                  rows_per_segment: int, method: str = "tensor"):
    """Per head and segment of sampled rows, the chosen lines in the order taken.

    Returns ``lines [H, G, L]`` (columns ``j``, diagonals ``n_ctx + d``, padded
    with ``2 n_ctx``), ``counts [H, G]`` (``G = ceil(S / rows_per_segment)``)
    and the sampled mass of each key ``[H, n_ctx]``; each segment's lines
    cover at least ``alpha`` of its sampled mass (union).
    """
    pos = sample.positions
    n_heads, n_rows, n_ctx = sample.shape
    rps = rows_per_segment
    n_seg = -(-n_rows // rps)
    if method == "loops":
        # From the logits where the sample has them: each row's softmax where the loops read it.
        softmax = sample.logits is not None
        rows = sample.logits if softmax else sample.probs
        if rows.dtype not in cpu_loops.READS:
            rows = rows.float()
        lines, counts, key_mass = cpu_loops.segment_lines(rows, pos, rps, sink, local, alpha * (1 - _TOL),
                                                          softmax=softmax)
        return lines.view(n_heads, n_seg, -1), counts.view(n_heads, n_seg), key_mass
    probs = sample.probs
    pad = n_seg * rps - n_rows
    if pad:  # zero rows complete the last segment; they carry no mass
        probs = torch.cat([probs, probs.new_zeros(n_heads, pad, n_ctx)], dim=1)
        pos = torch.cat([pos, pos[-1:].expand(pad)])
    mass = _tensor_masses(probs, pos, rps).view(n_heads * n_seg, 2 * n_ctx)
    target = alpha * mass[:, :n_ctx].sum(-1, dtype=torch.float64) * (1 - _TOL)  # every cell: one column
    lines, counts = _tensor_lines(mass, probs, pos, rps, sink, local, target)
    width = max(int(counts.max()), 1)
    taken = torch.arange(width, device=lines.device)[None, :] < counts[:, None]
    lines = torch.where(taken, lines[:, :width].long(), 2 * n_ctx)
    key_mass = mass.view(n_heads, n_seg, 2 * n_ctx)[..., :n_ctx].sum(1)
    return lines.view(n_heads, n_seg, width), counts.view(n_heads, n_seg), key_mass


def _tensor_masses(probs, pos, rps):
    """Standalone masses per segment, ``[H, G, 2 n_ctx]``: columns, then diagonals.

    The diagonal frame: ``shifted[h, s, t] = probs[h, s, pos_s - t]`` (zero
    past the causal limit, which index ``pos_s + 1`` holds).
    """
    n_heads, n_rows, n_ctx = probs.shape
    dev = probs.device
    t = torch.arange(n_ctx, device=dev)
    key_of_diag = torch.where(t[None, :] <= pos[:, None], pos[:, None] - t[None, :], pos[:, None] + 1)
    key_of_diag = key_of_diag.clamp_(max=n_ctx - 1)
    shifted = scratch("select.shifted", (n_heads, n_rows, n_ctx), probs.dtype, dev)
    torch.gather(probs, 2, key_of_diag.expand(n_heads, -1, -1), out=shifted)
    n_seg = n_rows // rps
    return torch.cat([probs.view(n_heads, n_seg, rps, n_ctx).sum(2),
                      shifted.view(n_heads, n_seg, rps, n_ctx).sum(2)], dim=-1)


def _tensor_lines(mass, probs, pos, rps, sink, local, target):
    """The greedy as batched tensor ops: ``(lines [P, L] in the order taken, counts [P])``."""
    n_problems, n_lines_all = mass.shape
    n_ctx = n_lines_all // 2
    n_heads = probs.shape[0]
    n_seg = n_problems // n_heads
    dev = mass.device
    t = torch.arange(n_ctx, device=dev)
    forced = torch.cat([t < sink, t < local])
    n_forced = int(forced.sum())
    # Masses are >= 0, so their float bits order like integers; forced lines
    # get +inf, the largest; equal masses rank the lower line first (columns
    # before diagonals), as ``cpu_loops`` does.
    bits = mass.masked_fill(forced, float("inf")).view(torch.int32).long()
    ranked = (bits << 32) | (n_lines_all - 1 - torch.arange(n_lines_all, device=dev))
    cells = _Cells(probs.reshape(-1), pos.view(n_seg, rps), n_seg, n_ctx)

    lines = torch.full((n_problems, 0), n_lines_all, dtype=torch.long, device=dev)
    counts = torch.zeros(n_problems, dtype=torch.long, device=dev)
    active = torch.arange(n_problems, device=dev)
    prefix = min(n_lines_all, max(1024, 2 * n_forced))
    while active.numel():
        everyone = active.numel() == n_problems
        rows = ranked if everyone else ranked[active]
        order = (rows.topk(prefix, dim=-1).indices if prefix < n_lines_all
                 else rows.argsort(dim=-1, descending=True))
        cum = (mass if everyone else mass[active]).gather(1, order).cumsum(1, dtype=torch.float64)
        count = _union_count(cum, order, target[active], cells, active)
        if prefix == n_lines_all:  # every line: the whole mass, whatever the rounding
            count = torch.where(count < 0, n_lines_all, count)
        fin = count >= 0
        done, count = active[fin], count[fin].clamp(min=n_forced, max=n_lines_all)
        if done.numel():
            width = int(count.max())
            if width > lines.shape[1]:
                lines = torch.cat([lines, lines.new_full((n_problems, width - lines.shape[1]), n_lines_all)], 1)
            lines[done, :width] = order[fin, :width]
            counts[done] = count
        active = active[~fin]
        prefix = min(n_lines_all, 4 * prefix)
    return lines, counts


@dataclass
class _Cells:
    """The sampled probabilities as the coverage count reads them."""

    probs: torch.Tensor  # [H * n_rows * n_ctx] flat
    positions: torch.Tensor  # [G, rows per segment]
    n_seg: int
    n_ctx: int


#: Rows of a coverage batch have prefix widths within this factor (padding is work).
_WIDTH_STEP = 2.0


def _union_count(cum: torch.Tensor, order: torch.Tensor, target: torch.Tensor, cells: _Cells,
                 problems: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest ``k`` whose first ``k`` lines of ``order`` cover ``target`` (union of
    cells); ``-1`` where the whole prefix does not.

    ``cum``: the standalone masses of ``order`` cumulated (float64).  It counts
    twice every cell on a column *and* a diagonal of the prefix.  Such a cell
    lies on a column, so walking the cells of the prefix's columns finds every
    one; each is subtracted at the later of its two lines' positions.

    How far to walk: columns are disjoint, and so are diagonals, so the union
    of the first ``k`` lines covers at least the columns' masses among them,
    and at least the diagonals'.  The first ``k`` at which either reaches the
    target bounds the answer from above (measured on SmolLM2: within 1.2-1.3x
    of it, where the standalone sum's lower bound is 5-10x below it), so one
    walk up to that bound finds the answer.
    """
    dev = order.device
    n_act, n_pos = order.shape
    n_ctx = cells.n_ctx
    is_col = order < n_ctx
    mass = torch.diff(cum, dim=1, prepend=cum.new_zeros(n_act, 1))
    col_only = torch.where(is_col, mass, 0.0).cumsum(1)
    diag_only = torch.where(is_col, 0.0, mass).cumsum(1)
    reach = ((col_only >= target[:, None]) | (diag_only >= target[:, None])).int()
    upper = torch.where(reach.any(1), reach.argmax(1) + 1, n_pos)  # walk this far
    count = torch.full((n_act,), -1, dtype=torch.long, device=dev)
    # Batches of rows with similar walks (the padding of a batch is wasted work).
    by_width = torch.argsort(upper)
    widths = upper[by_width].double()
    batch = torch.floor(torch.log(widths / widths[0]) / math.log(_WIDTH_STEP)).long()
    _, sizes = torch.unique_consecutive(batch, return_counts=True)
    for rows in torch.split(by_width, sizes.tolist()):
        count[rows] = _walk_columns(cum[rows], order[rows], is_col[rows], upper[rows], target[rows],
                                    cells, problems[rows])
    return count


def _walk_columns(cum, order, is_col, upper, target, cells: _Cells, problems):
    """``_union_count`` for rows walked up to ``upper`` (see there)."""
    dev = order.device
    n_act = order.shape[0]
    n_ctx, n_seg = cells.n_ctx, cells.n_seg
    rps = cells.positions.shape[1]
    width = int(upper.max())
    at = torch.arange(width, device=dev)
    walked = at[None, :] < upper[:, None]
    lines = order[:, :width]
    # Each diagonal's position in its row's list (``width``: not walked).
    diag_rank = torch.full((n_act, n_ctx + 1), width, dtype=torch.int32, device=dev)
    diag_slot = torch.where(walked & ~is_col[:, :width], lines - n_ctx, n_ctx)
    diag_rank.scatter_(1, diag_slot, at.int().expand(n_act, -1).contiguous())
    diag_rank[:, n_ctx] = width
    # The walked columns' list positions, in order: [A, c].
    walked_col = walked & is_col[:, :width]
    col_rank = ascending_lists(walked_col)
    col_ok = col_rank < width
    col_rank = col_rank.clamp(max=width - 1)
    col = torch.where(col_ok, lines.gather(1, col_rank), 0)

    # The cells of those columns on the segment's rows: [A, rps, c].
    head, seg = problems // n_seg, problems % n_seg
    pos = cells.positions[seg][:, :, None]
    delta = pos - col[:, None, :]
    ok = col_ok[:, None, :] & (delta >= 0)
    rd = diag_rank.gather(1, delta.clamp(0, n_ctx).view(n_act, -1)).view_as(delta)
    twice = ok & (rd < width)
    first_row = head * (n_seg * rps) + seg * rps
    cell = ((first_row[:, None] + torch.arange(rps, device=dev)[None, :]) * n_ctx)[:, :, None] + col[:, None, :]
    p = cells.probs[cell.view(-1)].view_as(delta) * twice
    later = torch.where(twice, torch.maximum(col_rank[:, None, :], rd.long()), width)
    overlap = torch.zeros(n_act, width + 1, dtype=torch.float64, device=dev)
    overlap.scatter_add_(1, later.view(n_act, -1), p.view(n_act, -1).double())
    covered = cum[:, :width] - overlap[:, :width].cumsum(1)
    reached = ((covered >= target[:, None]) & walked).int()
    return torch.where(reached.any(1), reached.argmax(1) + 1, -1)
