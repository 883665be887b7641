"""Progressive decode KV compression: which cached tokens each decode step reads.

LoopServe (the paper's phase 2): every ``interval`` generated tokens, re-select
per KV head the ``budget`` cached positions that the latest output queries
attend to; decode attention reads only those, plus every token generated since
the last re-selection.  The full KV is never modified: a position dropped at
one re-selection can come back at the next.

Per KV head one index set serves the whole query-head group (scores are summed
over the group), so a decode step reads each selected KV row once per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.logits import scoring_logits
from ..config import DECODE_POOLINGS
from . import cpu_loops
from .scoring import attention_mass, check_gqa, keep_top, validate_budget
from .summaries import KeySummaries, candidate_blocks, candidate_positions, queries_by_kv_head

#: Candidate positions per re-selection, as a multiple of the budget.  Measured on a
#: real SmolLM2 answer (150 steps, 9 layers, budget 512): the mass each step keeps is
#: 0.005 below scoring every key at 4x (16-key blocks), 0.042 below at 2x.
CANDIDATE_FACTOR = 4.0
#: Candidates are pruned only from caches this many times larger than the candidate set;
#: smaller ones are scored whole.  (The fidelity figures above pruned from 1x.)
PRUNE_FROM = 1
#: A re-selection whose window mass lies at least this much on positions the previous
#: selection held too doubles the interval to the next one (up to ``max_interval``); a
#: lower share resets it.  Measured on the same answer: at 0.7 the kept mass is unchanged
#: (-0.0001) with a third fewer re-selections in 150 steps; the median share is 0.76.
AGREEMENT = 0.7
#: How a re-selection's window of queries scores the cache (``DecodeCompressor.pool_window``):
#: ``bounds`` (default): their mean per head ranks the key blocks, each of them scores the
#: candidates; ``all``: their mean does both; ``none``: each does both (the paper's way).
#: Measured by teacher-forced KL to full attention (SmolLM2, 3.7K-token prompts, budget 1024, 9
#: answers): scoring with the mean instead of each query raises the KL by a third; ranking the
#: blocks with it costs the candidates' choice little (the exact stage re-ranks them) and keeps
#: the block stage as cheap as one query.
WINDOW_POOLING = DECODE_POOLINGS  # the server's flag takes the same choices
#: Key blocks (of ``KeySummaries.block`` positions) each decode step reads besides the selection:
#: the positions of those its own query ranks highest by their block mass (``KeySummaries.block_mass``,
#: ``DecodeCompressor.query_blocks``; ours).  A selection chosen by the window's queries is stale for
#: the query of the moment: by teacher-forced KL to full attention (``benchmarks/decode_kl_offline.py``,
#: SmolLM2, 3.7K-token prompts, 9 answers), the window's choice of 1024 leaves 0.0172, each step's own
#: exact top 1024 0.0014.  At budget 512, in one run (blocks ranked by their bound, every layer
#: alike): 128 blocks 0.0021 reading 0.45 of the cache, 144 0.0017 reading 0.48, 160 0.0012 reading
#: 0.51; 144 is the most under half of that cache.
QUERY_BLOCKS = 144
#: Cached tokens the window's re-selection keeps per KV head (the paper: 1024, the whole read).
#: At equal reads (0.45 of a 3.7K-token cache; one run of the same tool and answers, blocks ranked
#: by their bound) the query's own blocks are worth more than the window's choice: budget 1024 + 64
#: blocks 0.0026, 768 + 96 0.0024, 512 + 128 0.0019, 384 + 144 0.0021, 256 + 160 0.0023.
BUDGET = 512
#: Tokens from a turn's seed to its first re-selection: with query blocks each step reads what its
#: own query needs, so the window's first choice can come early (a long turn reads every cached
#: token only until then).
FIRST_INTERVAL = 4
#: Tokens between re-selections (the paper: 16).  With query blocks each step reads what its own
#: query ranks highest, so the window's choice may age longer: teacher-forced KL to full attention
#: (``benchmarks/decode_kl_offline.py``, 9 answers, budget 1024) 0.0024 at 32 against 0.0025 at 16,
#: for half the re-selections (each costs about four compressed steps: ``benchmarks/decode_attention.py``).
INTERVAL = 32
#: Latest generated queries that score a re-selection (the paper: the interval's).  The same KL
#: with 8 as with 16 (0.0025 both, interval 32, same tool), for half the scoring rows.
WINDOW = 8
#: Slope of the query blocks over depth (``layer_query_blocks``; 0: every layer alike; ours).  The
#: decode KL to full attention sits in the lower layers (``decode_kl_offline.py``, 9 answers, 144
#: blocks, only a group of layers compressed: layers 0-5 0.0005, 6-11 0.0006, 12-17 0.0003, 18-23
#: 0.0002, 24-29 0.0001).  Over 18 answers (seeds 0 and 1), every layer compressed, the same mean
#: read: flat 0.00195 (after the first 32 steps 0.00175), slope 0.8 0.00175 (0.00145).
PYRAMID = 0.8


def decode_pays(cached: int, budget: int, query_blocks: int, max_read: float, block: int = 8,
                min_len: int = 0) -> bool:
    """Whether a turn over ``cached`` tokens compresses its decode: the cache holds at least
    ``min_len`` tokens (the machine's measured break-even: ``calibrate``), and each step would read
    its selection (``budget``) plus ``query_blocks`` blocks of ``block`` positions, at most
    ``max_read`` of the cache.  Otherwise the compressed step reads most of what the exact one
    does, or saves less than its own work costs (AVX2, fp32: a turn reading 0.85 of a 1.9K cache
    decoded at 0.7x stock), so the turn decodes exactly."""
    if not 0.0 <= max_read <= 1.0:
        raise ValueError(f"decode_max_read must be in [0, 1], got {max_read!r}")
    return cached >= min_len and budget + query_blocks * block <= max_read * cached


def layer_query_blocks(query_blocks: int, layer: int, n_layers: int, slope: float = PYRAMID) -> int:
    """Query blocks of layer ``layer`` of ``n_layers``: ``query_blocks`` scaled linearly over depth
    from ``1 + slope`` at the first layer to ``1 - slope`` at the last (mean ``query_blocks``).
    After PyramidKV (Cai et al., 2024): lower layers attend more diffusely, so a fixed number of
    positions misses more of their mass."""
    if not 0.0 <= slope < 1.0:
        raise ValueError(f"decode_pyramid (slope) must be in [0, 1), got {slope!r}")
    if n_layers < 1 or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, n_layers={n_layers}), got {layer!r}")
    depth = 0.5 if n_layers == 1 else layer / (n_layers - 1)
    return int(round(query_blocks * (1.0 + slope * (1.0 - 2.0 * depth))))


def select_decode_kv(recent_q: torch.Tensor, k: torch.Tensor, *, budget: int, sink: int = 4,
                     recent: int = 32) -> torch.Tensor:
    """Per KV head, the ``min(budget, L)`` positions to keep, ascending, no duplicates.

    Always the first ``sink`` and the last ``recent`` positions; the rest by the
    attention mass of ``recent_q`` (the post-RoPE queries of the latest generated
    tokens) summed over the window and over the query heads of the group.
    """
    validate_budget(budget, sink, recent)
    scores = attention_mass(recent_q, k)
    return keep_top(scores, budget, sink, recent)


def select_decode_kv_pruned(recent_q: torch.Tensor, k_buffer: torch.Tensor, slots: torch.Tensor,
                            summaries: KeySummaries, *, budget: int, sink: int = 4, recent: int = 32,
                            factor: float = CANDIDATE_FACTOR, return_mass: bool = False):
    """``select_decode_kv`` in two stages (``summaries.py``): candidate blocks by their key
    summaries, then the window's exact attention mass over the candidates only.

    ``k_buffer [T, Hk, d]`` holds position ``i``'s key at row ``slots[i]``
    (SGLang's KV pool and ``req_to_token`` row); ``summaries`` are brought up
    to date here.  Returns ``[Hk, min(budget, L)]`` ascending positions, and
    with ``return_mass`` also each one's window mass (same shape).  On a CPU
    the pruning runs as one compiled call (``cpu_loops``), elsewhere as
    tensor ops: the same selection.
    """
    kept, mass, _ = reselect_pruned(recent_q, k_buffer, slots, summaries, budget=budget, sink=sink,
                                    recent=recent, factor=factor)
    return (kept, mass) if return_mass else kept


def reselect_pruned(recent_q, k_buffer, slots, summaries, *, budget, sink=4, recent=32, factor=CANDIDATE_FACTOR,
                    previous=None, method="auto", bound_q=None):
    """``select_decode_kv_pruned``, returning ``(kept, mass, held)``: ``held`` the share of the
    window mass of ``kept`` on positions ``previous`` holds too (``_held_mass``; ``None``
    without ``previous``).  ``method``: ``"auto"``, ``"loops"`` (CPU, numba) or ``"tensor"``.
    ``bound_q [w', H, d]`` (default ``recent_q``): the queries that rank the key blocks;
    ``recent_q`` scores the candidates."""
    validate_budget(budget, sink, recent)
    if method not in ("auto", "loops", "tensor"):
        raise ValueError(f"method must be 'auto', 'loops' or 'tensor', got {method!r}")
    if method == "loops" and not cpu_loops.supports(k_buffer):
        raise ValueError(f"method 'loops' needs numba and a CPU float32/bfloat16 KV pool, got a "
                         f"{k_buffer.dtype} pool on {k_buffer.device}")
    length = slots.shape[0]
    n_kv = k_buffer.shape[1]
    if length <= budget:
        kept = torch.arange(length, device=k_buffer.device).expand(n_kv, -1)
        mass = torch.ones(kept.shape, device=kept.device)
        return kept, mass, _held(previous, kept, mass)
    if factor <= 0 or PRUNE_FROM * factor * budget > length:  # pruning would not pay: every key
        cand = torch.arange(length, device=k_buffer.device).expand(n_kv, -1)
        scores = attention_mass(recent_q, k_buffer[slots.long()])
    else:
        take = candidate_blocks(length, summaries.block, budget, factor, sink, recent)
        if method == "auto":
            # The compiled call wins with one scoring query (the window's mean); with a window of
            # them the tensor ops are about as fast (bf16, 8 queries, blocks ranked by their mean:
            # 1.58 vs 1.54 ms at 8K, 1.90 vs 2.23 ms at 32K; benchmarks/decode_attention.py).
            method = ("loops" if cpu_loops.supports(k_buffer) and take * summaries.block >= budget
                      and recent_q.shape[0] == 1 else "tensor")
        if method == "loops":
            if previous is not None and (previous.shape[0] != n_kv or not previous.numel()):
                previous = previous.new_zeros(n_kv, 0)  # nothing held
            return cpu_loops.reselect(queries_by_kv_head(recent_q, n_kv), _window_positions(recent_q, n_kv, length),
                                      k_buffer, slots, summaries, budget=budget, take=take, sink=sink,
                                      recent=recent, previous=previous,
                                      bound_queries=None if bound_q is None else queries_by_kv_head(bound_q, n_kv))
        summaries.update(k_buffer, slots)
        cand = candidate_positions(summaries, recent_q if bound_q is None else bound_q, length, budget, factor,
                                   sink, recent)  # [Hk, C]
        scores = _candidate_mass(recent_q, k_buffer, slots, cand, length)
    forced = ((cand < sink) | (cand >= length - recent)) & (cand < length)  # cand == length: padding
    ranked = scores.masked_fill(forced, float("inf"))
    at = ranked.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values  # candidates ascend: positions do too
    kept, mass = cand.gather(1, at), scores.gather(1, at)
    return kept, mass, _held(previous, kept, mass)


def _window_positions(recent_q, n_kv, length):
    """``[w*g]``: the position of each row of ``queries_by_kv_head`` (window query ``i`` sits at
    ``length - w + i``)."""
    w, n_heads, _ = recent_q.shape
    group = check_gqa(n_heads, n_kv)
    return length - w + torch.arange(w, device=recent_q.device).repeat_interleave(group)


def _held(previous, kept, mass):
    return None if previous is None else _held_mass(previous, kept, mass)


def _candidate_mass(recent_q, k_buffer, slots, cand, length):
    """``[Hk, C]``: the window's softmax over the candidate keys, summed over the window and the
    query heads of each group (``-inf`` for candidates past the cache).  The product runs in the
    pool's dtype (``scoring_logits``), the softmax in fp32."""
    n_kv, d = k_buffer.shape[1], k_buffer.shape[2]
    valid = cand < length
    heads = torch.arange(n_kv, device=cand.device)[:, None]
    rows = slots[cand.clamp(max=length - 1)].long() * n_kv + heads  # rows of the pool seen as [T * Hk, d]
    keys = k_buffer.reshape(-1, d).index_select(0, rows.view(-1)).view(n_kv, -1, d)  # [Hk, C, d]
    logits = scoring_logits(queries_by_kv_head(recent_q, n_kv), keys.transpose(1, 2))  # [Hk, w*g, C]
    # A window query cannot see the keys after it: they are among the last w - 1 positions,
    # at the end of every head's ascending candidates (with the padding past the cache).
    tail = min(cand.shape[1], recent_q.shape[0] + int((~valid).sum(1).max()))
    qpos = _window_positions(recent_q, n_kv, length)
    end = cand[:, None, -tail:]
    logits[..., -tail:].masked_fill_((end > qpos[None, :, None]) | (end >= length), float("-inf"))
    scores = torch.softmax(logits, dim=-1).sum(1)
    return scores.masked_fill(~valid, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None,
                     compute_dtype=torch.float32) -> torch.Tensor:
    """``[H, d]``: attention of one decode query ``q [H, d]`` over ``k, v [L, Hk, d]``
    restricted to ``idx [Hk, n]`` (``None``: every position).  The torch reference."""
    n_heads, d = q.shape
    length, n_kv, _ = k.shape
    group = check_gqa(n_heads, n_kv)
    if idx is None:
        idx = torch.arange(length, device=k.device).expand(n_kv, -1)
    if idx.dim() != 2 or idx.shape[0] != n_kv:
        raise ValueError(f"idx must be [Hk={n_kv}, n], got {tuple(idx.shape)}")
    heads = torch.arange(n_kv, device=k.device)[:, None]
    ks = k[idx, heads].to(compute_dtype)  # [Hk, n, d]
    vs = v[idx, heads].to(compute_dtype)
    qg = q.to(compute_dtype).view(n_kv, group, d)
    p = torch.softmax(torch.bmm(qg, ks.transpose(1, 2)) * d**-0.5, dim=-1)
    return torch.bmm(p, vs).reshape(n_heads, d).to(q.dtype)


@dataclass
class DecodeCompressor:
    """The progressive policy for one request (and one layer).

    Feed it each decode step's query with ``attend(q, k, v)``; it keeps the
    last ``window`` queries, re-selects every ``interval`` generated tokens,
    and attends to the selection plus every token generated since.  Before the
    first re-selection it uses ``seed(...)``: the prefill's vertical scores of
    this turn when given, else full attention (``seeded_from`` records which).

    Re-selection is two-stage (``select_decode_kv_pruned``: candidates from
    key-block summaries, exact scores among them; ``pool_window``: the window's
    mean query ranks the blocks, each of its queries scores the candidates)
    and its interval adapts (ours,
    beyond the paper's fixed 16): a re-selection whose window mass lies for
    ``AGREEMENT`` on positions the previous one held doubles the interval to
    the next, up to ``max_interval``; one that does not resets it to
    ``interval``.  A stable
    answer is re-scored rarely, a topic shift within ``interval`` tokens of
    being noticed again.

    Each step also reads, besides the selection, the key blocks its own query
    ranks highest by their summaries (``query_blocks``, ``QUERY_BLOCKS``; ours): the
    window chose for the queries before it, a step's query may need other tokens.
    So the first re-selection comes ``first_interval`` (4) tokens into a turn.
    """

    budget: int = BUDGET
    interval: int = INTERVAL
    window: int = WINDOW
    sink: int = 4
    recent: int = 32
    max_interval: int = 128
    #: tokens from a turn's seed to its first re-selection (0: ``interval``); a short one with
    #: ``seed(None)`` reads everything only until the answer's own queries can choose
    first_interval: int = FIRST_INTERVAL
    #: candidates per re-selection, a multiple of the budget (0: score every key)
    candidate_factor: float = CANDIDATE_FACTOR
    #: how the window's queries score the cache (``WINDOW_POOLING``)
    pool_window: str = "bounds"
    #: key blocks each step's own query adds to the selection (``QUERY_BLOCKS``; 0: none)
    query_blocks: int = QUERY_BLOCKS
    selection: torch.Tensor | None = field(default=None, repr=False)  # [Hk, n] positions
    #: the window's attention mass on ``selection`` at the last re-selection (``[Hk, n]``)
    selection_mass: torch.Tensor | None = field(default=None, repr=False)
    selected_at: int = 0  # cache length when ``selection`` was made
    seeded_from: str = "full"
    #: a baseline's one selection, never re-selected (``fix``)
    fixed: bool = False
    #: per-head counts of a ragged selection (AdaKV), else None
    counts: list | None = field(default=None, repr=False)
    steps: int = 0
    reselections: int = 0
    next_interval: int = 0  # tokens from the last re-selection to the next (0: ``interval``)
    summaries: KeySummaries = field(default_factory=KeySummaries, repr=False)
    _queries: list = field(default_factory=list, repr=False)
    _since: int = 0  # tokens generated since the last re-selection
    #: ``_held_blocks`` of ``_held_for`` (the selection it was built from): the positions it holds,
    #: the blocks it holds whole, the fewest free positions of a head
    _held: tuple | None = field(default=None, repr=False)
    _held_for: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        validate_budget(self.budget, self.sink, self.recent)
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.first_interval, int) or self.first_interval < 0:
            raise ValueError(f"first_interval must be an integer >= 0 (0: interval), got {self.first_interval!r}")
        if self.pool_window not in WINDOW_POOLING:
            raise ValueError(f"pool_window must be one of {', '.join(WINDOW_POOLING)}, got {self.pool_window!r}")
        if isinstance(self.query_blocks, bool) or not isinstance(self.query_blocks, int) or self.query_blocks < 0:
            raise ValueError(f"query_blocks must be an integer >= 0, got {self.query_blocks!r}")
        if not isinstance(self.max_interval, int) or self.max_interval < self.interval:
            raise ValueError(f"max_interval must be an integer >= interval={self.interval}, "
                             f"got {self.max_interval!r}")
        self.next_interval = self.next_interval or self.interval

    def seed(self, vertical_scores: torch.Tensor | None, length: int, source: str = "prefill") -> None:
        """First selection: top ``budget`` of per-KV-head key scores ``[Hk, L]`` (the prefill
        estimate's column mass, or ``source="prompt"``: the attention of the prompt's last
        queries); ``None``: full attention until the first re-selection."""
        if vertical_scores is None:
            self.selection, self.seeded_from = None, "full"
        else:
            self.selection = keep_top(vertical_scores[:, :length], self.budget, self.sink, self.recent)
            self.seeded_from = source
        self.selected_at = length
        self.next_interval, self._since = self.first_interval or self.interval, 0
        self.fixed, self.counts = False, None

    def fix(self, selection: torch.Tensor, length: int, source: str) -> None:
        """A baseline's selection ``[Hk, W]`` (ascending; rows of different lengths padded with -1
        after their positions), kept for the whole answer: no re-selection."""
        valid = selection >= 0
        self.counts = None if bool(valid.all()) else valid.sum(-1).tolist()
        self.selection, self.selected_at, self.seeded_from, self.fixed = selection, length, source, True

    def attended(self, length: int, q: torch.Tensor | None = None, k_buffer: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]] | None:
        """What decode reads at cache length ``length``: the selection plus every token since it,
        as flat positions per KV head and each head's count; ``None``: everything.

        With this step's query ``q [H, d]`` also the positions of the key blocks it ranks highest
        that the selection does not hold (``query_block_positions``; ours), after each head's
        selection: every head reads as many.  ``k_buffer``/``slots`` (position ``i``'s key at ``k_buffer[slots[i]]``)
        bring the key summaries up to the selection when it was seeded, not re-selected."""
        if self.selection is None:
            return None
        fresh = torch.arange(self.selected_at, length, device=self.selection.device)
        n_kv = self.selection.shape[0]
        if (q is not None and self.query_blocks and self.counts is None and not self.fixed
                and self.selected_at >= self.summaries.block):
            n_blocks = self._summarised(k_buffer, slots)
            held, whole, free = self._held_blocks(n_blocks)
            extra = min(self.query_blocks * self.summaries.block, free)
            if cpu_loops.available() and q.device.type == "cpu":
                rows = cpu_loops.query_block_rows(q, self.summaries, n_blocks, held, whole, self.selection,
                                                  self.selected_at, length, extra)
            else:
                rows = torch.cat([self.selection, self.query_block_positions(q, k_buffer, slots),
                                  fresh.expand(n_kv, -1)], dim=1)
            return rows.view(-1), [rows.shape[1]] * n_kv
        if self.counts is None:
            rows = torch.cat([self.selection, fresh.expand(n_kv, -1)], dim=1)
            return rows.reshape(-1), [rows.shape[1]] * n_kv
        parts = []
        for h, n in enumerate(self.counts):
            parts += [self.selection[h, :n], fresh]
        return torch.cat(parts), [n + fresh.numel() for n in self.counts]

    def query_block_positions(self, q: torch.Tensor, k_buffer: torch.Tensor | None = None,
                              slots: torch.Tensor | None = None) -> torch.Tensor:
        """``[Hk, E]``: the positions a step with query ``q [H, d]`` reads besides the selection
        (ours): walking the key blocks before the selection's cache length by descending mass
        (``KeySummaries.block_mass``: per query head the softmax over blocks of their logits, summed
        over the group; ties: the lower block first), the first ``E`` positions the selection does
        not hold, ``E = query_blocks x block`` (fewer if a head has fewer such positions: every
        head reads as many).  The reference; on a CPU ``attended`` runs the same walk compiled (``cpu_loops``)."""
        bs = self.summaries.block
        n_blocks = self._summarised(k_buffer, slots)
        held, _, free = self._held_blocks(n_blocks)
        n_kv = held.shape[0]
        mass = self.summaries.block_mass(q[None], n_blocks)  # [Hk, nb]
        order = mass.argsort(dim=-1, descending=True, stable=True)
        positions = (order[..., None] * bs + torch.arange(bs, device=order.device)).flatten(1)
        new = ~held.gather(1, positions)
        extra = min(self.query_blocks * bs, free)
        return positions[new & (new.cumsum(1) <= extra)].view(n_kv, extra)

    def _summarised(self, k_buffer, slots) -> int:
        """Blocks of the key summaries wholly before the selection's cache length, brought up to it
        (a seeded selection was not made from them) from ``k_buffer`` through ``slots``."""
        n_blocks = self.selected_at // self.summaries.block
        if self.summaries.length < n_blocks * self.summaries.block:
            if k_buffer is None:
                raise ValueError("the key summaries do not reach the selection: pass k_buffer and slots")
            self.summaries.update(k_buffer, slots[: self.selected_at])
        return n_blocks

    def _held_blocks(self, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For the current selection: ``[Hk, n_blocks * block]`` whether it holds each position,
        ``[Hk, n_blocks]`` whether it holds each block whole, and the fewest positions a head's
        selection leaves free there (built once per selection)."""
        if self._held_for is not self.selection or self._held is None:
            bs = self.summaries.block
            n_kv = self.selection.shape[0]
            held = torch.zeros(n_kv, n_blocks * bs + 1, dtype=torch.bool, device=self.selection.device)
            held.scatter_(1, self.selection.clamp(max=n_blocks * bs), True)  # the spare column: past the blocks
            held = held[:, :-1].contiguous()
            free = int((n_blocks * bs - held.sum(1)).min())
            self._held, self._held_for = (held, held.view(n_kv, n_blocks, bs).all(-1), free), self.selection
        return self._held

    def indices(self, length: int) -> torch.Tensor | None:
        """Positions attended at cache length ``length``: selection + tokens since it, ``[Hk, n]``
        (``attended`` also serves ragged selections)."""
        if self.selection is None:
            return None
        if self.counts is not None:
            raise ValueError("a ragged selection (different counts per head): use attended()")
        flat, counts = self.attended(length)
        return flat.view(len(counts), -1)

    def record(self, q: torch.Tensor) -> bool:
        """Record this step's query ``[H, d]``; True when a re-selection is due
        (``next_interval`` tokens generated since the last one)."""
        self.steps += 1
        if self.fixed:  # a baseline's one selection: nothing to score later
            return False
        self._queries.append(q.detach())
        del self._queries[: -self.window]
        self._since += 1
        return self._since >= self.next_interval

    def reselect(self, k: torch.Tensor) -> None:
        """Re-select from the recorded queries over the whole cache ``k [L, Hk, d]``."""
        self.reselect_from(k, torch.arange(k.shape[0], device=k.device))

    def reselect_from(self, k_buffer: torch.Tensor, slots: torch.Tensor) -> None:
        """Re-select over a cache stored elsewhere: position ``i``'s key is ``k_buffer[slots[i]]``
        (SGLang's KV pool and ``req_to_token`` row); only new keys and candidates are read."""
        recent_q = torch.stack(self._queries)  # [w, H, d]
        pooled = recent_q.float().mean(0, keepdim=True)
        score_q = pooled if self.pool_window == "all" else recent_q
        self.selection, self.selection_mass, held = reselect_pruned(
            score_q, k_buffer, slots, self.summaries, budget=self.budget, sink=self.sink, recent=self.recent,
            factor=self.candidate_factor, previous=self.selection,
            bound_q=recent_q if self.pool_window == "none" else pooled)
        self.selected_at = slots.shape[0]
        self.reselections += 1
        self._since = 0
        held = 0.0 if held is None else held
        self.next_interval = (min(2 * self.next_interval, self.max_interval) if held >= AGREEMENT
                              else self.interval)

    def observe(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """``record`` then, when due, ``reselect`` (cache ``k`` includes this step's token)."""
        if self.record(q):
            self.reselect(k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode step: attention of ``q`` over what it reads (``attended``), then bookkeeping."""
        length = k.shape[0]
        slots = torch.arange(length, device=k.device)
        rows = self.attended(length, q, k, slots)
        if rows is None:
            out = decode_attention(q, k, v, None)
        else:
            from .batched import batched_decode_attention

            flat, counts = rows
            indptr = torch.tensor([0] + counts, device=k.device).cumsum(0)
            out = batched_decode_attention(q[None], k, v, slots[None], indptr, flat, method="tensor")[0]
        self.observe(q, k)
        return out


def _held_mass(previous: torch.Tensor, selection: torch.Tensor, mass: torch.Tensor) -> float:
    """Share of the new ``selection``'s window mass (``mass``, same shape) on positions the
    ``previous`` selection held too (both ``[Hk, n]`` ascending).  Mass-weighted: the
    low-scoring tail of a selection changes from window to window without mattering."""
    if previous.shape[0] != selection.shape[0] or not previous.numel():
        return 0.0
    at = torch.searchsorted(previous.contiguous(), selection.contiguous()).clamp(max=previous.shape[1] - 1)
    held = previous.gather(1, at) == selection
    mass = mass.float().nan_to_num(posinf=0.0, neginf=0.0)
    total = float(mass.sum())
    return float((mass * held).sum()) / total if total > 0 else 1.0
