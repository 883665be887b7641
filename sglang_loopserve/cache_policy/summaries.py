"""Key-block summaries: the cheap first stage of a decode re-selection, and each step's ranking.

Scoring a window of decode queries against every cached key every 16 tokens
costs about one dense decode step per generated token: at 32K tokens, 88% of
the compressed decode's attention time.  So the re-selection works in two
stages:

1. **Candidates by block scores.**  Each KV head's keys are cut into blocks of
   ``block`` positions; a block is summarised by the elementwise max and min
   of its keys (Quest's bounds, Tang et al. 2024) and by their mean.  For a
   query ``q`` the largest logit any key of the block can reach is at most
   ``q+ . max + q- . min`` (``q+``, ``q-``: the positive and negative parts
   of ``q``); the mean key's logit ``q . mean`` is what a typical key of the
   block gets.  A block's logit is a blend of the two (``BOUND_WEIGHT``; ours:
   Quest ranks by the bound alone), one matrix product per window.  Blocks are
   ranked by that logit's softmax over blocks per query, summed over the window
   and the query heads of a group (as a key's mass is), and the best blocks
   holding ``factor x budget`` positions become the candidates.
2. **Exact scores among the candidates**: the window's softmax over the
   candidate keys, summed, and the top ``budget`` kept (with the sink and the
   most recent tokens, as always).

The same scores rank the blocks for each decode step's own query
(``DecodeCompressor.query_blocks``): no key read.

Summaries grow with the cache: each re-selection summarises only the keys
added since the last one (the last, partial block is redone).  The keys are
read from the KV pool through their slots, so a re-selection never gathers the
whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Weight of a block's bound in its logit, against its mean key's logit (``block_parts``; ours).
#: Measured by teacher-forced KL to full attention (``benchmarks/decode_kl_offline.py``, SmolLM2,
#: 3.7K-token prompts, 144 query blocks on the depth slope, read 0.48; seeds 0 and 1, 18 answers,
#: the same answers for every rule): the steps' blocks ranked by the bound, the largest over a
#: group's query heads (Quest's way), 0.0015; by the bound's softmax over blocks per query head,
#: summed over the group, 0.0016; by the blend's softmax at 0.25 0.0014, at 0.5 0.0009.  (An
#: exploration on seed 0 where the bound left 0.0018: ranked by each block's exact attention mass,
#: what no summary can beat, 0.0006.)
BOUND_WEIGHT = 0.5


@dataclass
class KeySummaries:
    """Per KV head and block of ``block`` positions: the elementwise max, min and mean of the
    keys, side by side (``rows[..., :d]`` max, ``[d:2d]`` min, ``[2d:]`` mean: one matrix
    product with ``block_parts`` scores all three).  Stored with spare capacity, so the cache's
    growth writes in place."""

    #: 8: the blocks also serve each step's query blocks (``DecodeCompressor.query_blocks``), where
    #: blocks of 8 left a third less KL than as many positions in blocks of 16 (0.0055 vs 0.0085,
    #: ``benchmarks/decode_kl_offline.py``)
    block: int = 8
    storage: torch.Tensor | None = field(default=None, repr=False)  # [Hk, capacity, 3d] float32
    n_blocks: int = 0
    length: int = 0  # positions summarised

    @property
    def rows(self) -> torch.Tensor:
        return self.storage[:, : self.n_blocks]

    @property
    def kmax(self) -> torch.Tensor:
        return self.rows[..., : self.storage.shape[-1] // 3]

    @property
    def kmin(self) -> torch.Tensor:
        d = self.storage.shape[-1] // 3
        return self.rows[..., d: 2 * d]

    @property
    def kmean(self) -> torch.Tensor:
        return self.rows[..., 2 * (self.storage.shape[-1] // 3):]

    def update(self, k_buffer: torch.Tensor, slots: torch.Tensor) -> None:
        """Summarise positions ``[self.length, len(slots))``; ``k_buffer [T, Hk, d]`` holds
        position ``i``'s key at row ``slots[i]``."""
        length = slots.shape[0]
        if length <= self.length:
            return
        bs = self.block
        first_block = self.length // bs  # the last block may be partial: redo it
        n_blocks = -(-length // bs)
        keys = k_buffer[slots[first_block * bs:length].long()].float()  # [m, Hk, d]
        m, n_kv, d = keys.shape
        pad = (n_blocks - first_block) * bs - m
        if pad:  # repeat the last key: max and min are unchanged by it
            keys = torch.cat([keys, keys[-1:].expand(pad, -1, -1)])
        keys = keys.view(-1, bs, n_kv, d)
        self.reserve(n_kv, n_blocks, d, keys.device)
        torch.amax(keys, 1, out=self.storage[:, first_block:n_blocks, :d].transpose(0, 1))
        torch.amin(keys, 1, out=self.storage[:, first_block:n_blocks, d:2 * d].transpose(0, 1))
        sums = keys.sum(1)  # [nb, Hk, d]
        if pad:  # the last block's mean is over its real keys only
            sums[-1] -= pad * keys[-1, -1]
        counts = torch.full((sums.shape[0], 1, 1), float(bs), device=keys.device)
        counts[-1] = bs - pad
        self.storage[:, first_block:n_blocks, 2 * d:] = (sums / counts).transpose(0, 1)
        self.n_blocks, self.length = n_blocks, length

    def reserve(self, n_kv: int, n_blocks: int, d: int, device) -> None:
        """Room for ``n_blocks`` blocks (doubling: the cache grows by a token a step)."""
        if self.storage is None or self.storage.shape[1] < n_blocks:
            grown = torch.empty(n_kv, max(2 * n_blocks, 64), 3 * d, device=device)
            if self.storage is not None:
                grown[:, : self.n_blocks] = self.rows
            self.storage = grown

    def block_logits(self, queries: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """``[Hk, nb, R]``: the logit of each of ``queries [Hk, R, d]`` for each of the first
        ``n_blocks`` blocks (default all): ``BOUND_WEIGHT x (q+ . max + q- . min) + (1 -
        BOUND_WEIGHT) x q . mean``."""
        # Blocks as rows: the stored summaries are read in place (their rows are contiguous).
        return torch.bmm(self.rows[:, :n_blocks], block_parts(queries).transpose(1, 2))

    def block_mass(self, recent_q: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """``[Hk, nb]``: per block (the first ``n_blocks``, default all), the softmax over blocks
        of each query's block logit, summed over the queries ``recent_q [w, H, d]`` and the query
        heads of the group."""
        logits = self.block_logits(queries_by_kv_head(recent_q, self.storage.shape[0]), n_blocks)  # [Hk, nb, w*g]
        return torch.softmax(logits, dim=1).sum(2)


def block_parts(queries: torch.Tensor) -> torch.Tensor:
    """``[..., 3d]``: the positive and the negative part of ``queries [..., d]`` times
    ``BOUND_WEIGHT`` (read at each call: the offline tools vary it), then the queries times
    ``1 - BOUND_WEIGHT``: the layout of the stored ``[max, min, mean]``, so one product with a
    block's summary is its logit."""
    return torch.cat([queries.clamp(min=0) * BOUND_WEIGHT, queries.clamp(max=0) * BOUND_WEIGHT,
                      queries * (1.0 - BOUND_WEIGHT)], dim=-1)


def queries_by_kv_head(recent_q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[Hk, w*g, d]`` float32, scaled by ``d**-0.5``: the window's queries ``[w, H, d]`` grouped by
    the KV head they read, rows in ``(w, g)`` order (window position, then query head)."""
    w, n_heads, d = recent_q.shape
    group = n_heads // n_kv
    return (recent_q.float() * d**-0.5).view(w, n_kv, group, d).permute(1, 0, 2, 3).reshape(n_kv, w * group, d)


def candidate_positions(summaries: KeySummaries, recent_q: torch.Tensor, length: int, budget: int,
                        factor: float, sink: int, recent: int) -> torch.Tensor:
    """``[Hk, C]`` ascending positions, ``C`` the same for every head: the blocks with the
    largest block mass, holding about ``factor x budget`` positions, and always the blocks of the
    sink and of the last ``recent`` positions.  Positions past the last block's end are
    ``length`` (not a position)."""
    bs = summaries.block
    n_blocks = -(-length // bs)
    mass = summaries.block_mass(recent_q)[:, :n_blocks]
    blocks = torch.arange(n_blocks, device=mass.device)
    forced = (blocks < -(-sink // bs)) | (blocks >= (length - recent) // bs)
    mass = mass.masked_fill(forced, float("inf"))
    take = candidate_blocks(length, bs, budget, factor, sink, recent)
    chosen = mass.topk(take, dim=-1, sorted=False).indices.sort(dim=-1).values  # [Hk, take]
    positions = (chosen[..., None] * bs + torch.arange(bs, device=mass.device)).flatten(1)
    return positions.clamp(max=length)  # the last block may be partial


def candidate_blocks(length: int, block: int, budget: int, factor: float, sink: int, recent: int) -> int:
    """How many blocks ``candidate_positions`` takes: enough for ``factor x budget`` positions,
    and at least the forced ones (the sink's blocks and those of the last ``recent``)."""
    n_blocks = -(-length // block)
    first_recent = max((length - recent) // block, 0)
    n_sink = min(-(-sink // block), n_blocks)
    n_forced = n_sink + (n_blocks - first_recent) - max(n_sink - first_recent, 0)
    return min(n_blocks, max(n_forced, -(-int(factor * budget) // block)))
