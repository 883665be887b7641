"""Progressive decode KV compression: which cached tokens each decode step reads.

LoopServe (method.md, phase 2): every ``interval`` generated tokens, re-select
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


def _check_gqa(n_heads: int, n_kv: int) -> int:
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"query heads H={n_heads} must be a multiple of key heads Hk={n_kv} (H % Hk != 0)")
    return n_heads // n_kv


def validate_budget(budget: int, sink: int, recent: int) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if sink < 0 or recent < 0:
        raise ValueError(f"sink and recent must be >= 0, got sink={sink}, recent={recent}")
    if budget < sink + recent:
        raise ValueError(f"budget={budget} must be >= sink + recent = {sink + recent}")


def attention_mass(recent_q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[Hk, L]``: causal softmax attention of ``recent_q [w, H, d]`` over ``k [L, Hk, d]``,
    summed over the ``w`` queries and the query heads of each group (fp32).
    Query ``i`` sits at position ``L - w + i`` and sees keys up to it."""
    if recent_q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"recent_q must be [w, H, d] and k [L, Hk, d], got {tuple(recent_q.shape)} "
                         f"and {tuple(k.shape)}")
    lengths = torch.tensor([k.shape[0]], device=k.device)
    return attention_mass_padded(recent_q[None], k[None], lengths)[0]


def attention_mass_padded(recent_q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Batched ``attention_mass``: ``recent_q [B, w, H, d]``, ``k [B, Lmax, Hk, d]`` padded,
    ``lengths [B]`` -> ``[B, Hk, Lmax]`` (zero past each length)."""
    n_req, w, n_heads, d = recent_q.shape
    _, l_max, n_kv, dk = k.shape
    if d != dk:
        raise ValueError(f"head dims of recent_q ({d}) and k ({dk}) differ")
    group = _check_gqa(n_heads, n_kv)
    qs = recent_q.float().permute(0, 2, 1, 3).reshape(n_req * n_kv, group * w, d)
    ks = k.float().permute(0, 2, 3, 1).reshape(n_req * n_kv, d, l_max)
    logits = torch.bmm(qs, ks).view(n_req, n_kv, group * w, l_max) * d**-0.5
    qpos = lengths[:, None] - w + torch.arange(w, device=k.device).repeat(group)[None, :]  # [B, g*w]
    future = torch.arange(l_max, device=k.device)[None, None, :] > qpos[:, :, None]  # [B, g*w, Lmax]
    logits.masked_fill_(future[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(2)


def keep_top_padded(scores: torch.Tensor, lengths: torch.Tensor, budget: int, sink: int,
                    recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``scores [R, Lmax]`` with ``lengths [R]``: the kept positions ``[R, min(budget, Lmax)]``,
    ascending, and which of them are real (``min(budget, length)`` per row)."""
    n_rows, l_max = scores.shape
    pos = torch.arange(l_max, device=scores.device)[None, :]
    length = lengths[:, None]
    forced = (pos < sink) | (pos >= length - recent)
    ranked = scores.float().masked_fill(forced, float("inf")).masked_fill(pos >= length, float("-inf"))
    kept = ranked.topk(min(budget, l_max), dim=-1).indices.sort(dim=-1).values
    valid = torch.arange(kept.shape[1], device=scores.device)[None, :] < length.clamp(max=budget)
    # Padding positions (>= length) sort last, so the real ones are a prefix.
    return kept, valid


def keep_top(scores: torch.Tensor, budget: int, sink: int, recent: int) -> torch.Tensor:
    """``[Hk, min(budget, L)]`` sorted positions: first ``sink``, last ``recent``, then top scores."""
    lengths = torch.full((scores.shape[0],), scores.shape[1], device=scores.device)
    return keep_top_padded(scores, lengths, budget, sink, recent)[0]


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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None,
                     compute_dtype=torch.float32) -> torch.Tensor:
    """``[H, d]``: attention of one decode query ``q [H, d]`` over ``k, v [L, Hk, d]``
    restricted to ``idx [Hk, n]`` (``None``: every position).  The torch reference."""
    n_heads, d = q.shape
    length, n_kv, _ = k.shape
    group = _check_gqa(n_heads, n_kv)
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
    """

    budget: int = 1024
    interval: int = 16
    window: int = 16
    sink: int = 4
    recent: int = 32
    selection: torch.Tensor | None = field(default=None, repr=False)  # [Hk, n] positions
    selected_at: int = 0  # cache length when ``selection`` was made
    seeded_from: str = "full"
    steps: int = 0
    reselections: int = 0
    _queries: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        validate_budget(self.budget, self.sink, self.recent)
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")

    def seed(self, vertical_scores: torch.Tensor | None, length: int) -> None:
        """First selection: top ``budget`` of the prefill's per-KV-head column scores ``[Hk, L]``."""
        if vertical_scores is None:
            self.selection, self.seeded_from = None, "full"
        else:
            self.selection = keep_top(vertical_scores[:, :length], self.budget, self.sink, self.recent)
            self.seeded_from = "prefill"
        self.selected_at = length

    def indices(self, length: int) -> torch.Tensor | None:
        """Positions attended at cache length ``length``: selection + tokens since it."""
        if self.selection is None:
            return None
        fresh = torch.arange(self.selected_at, length, device=self.selection.device)
        return torch.cat([self.selection, fresh.expand(self.selection.shape[0], -1)], dim=1)

    def record(self, q: torch.Tensor) -> bool:
        """Record this step's query ``[H, d]``; True when a re-selection is due
        (``interval`` tokens generated since the last one)."""
        self._queries.append(q.detach())
        del self._queries[: -self.window]
        self.steps += 1
        return self.steps % self.interval == 0

    def reselect(self, k: torch.Tensor) -> None:
        """Re-select from the recorded queries over the whole cache ``k [L, Hk, d]``."""
        recent_q = torch.stack(self._queries)  # [w, H, d]
        self.selection = select_decode_kv(recent_q, k, budget=self.budget, sink=self.sink,
                                          recent=self.recent)
        self.selected_at = k.shape[0]
        self.reselections += 1

    def observe(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """``record`` then, when due, ``reselect`` (cache ``k`` includes this step's token)."""
        if self.record(q):
            self.reselect(k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode step: attention of ``q`` over the current selection, then bookkeeping."""
        out = decode_attention(q, k, v, self.indices(k.shape[0]))
        self.observe(q, k)
        return out
