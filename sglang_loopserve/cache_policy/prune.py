"""What to free when the KV pool is full: per-token importance, and which tokens of a cached
branch to prune.

Engine-agnostic (torch in, torch out); ``srt/radix.py`` applies it to SGLang's radix tree.

* ``TokenImportance``: per request, one score per position, the **maximum over layers and
  KV heads** of the share of a head's attention mass the position received, from the prefill
  (the estimate's key scores, or the last prompt queries' attention after an exact prefill)
  and from every decode re-selection (the window's mass on the kept tokens).  Max, not mean:
  pruning removes a token for every head of every layer, so a token one retrieval head
  depends on must rank as high as that head ranks it; a mean would dilute it among the heads
  that ignore it.
* ``prune_plan``: the lowest-importance live tokens of a node, outside the protected spans
  (the first ``sink`` positions of the sequence and the last ``recent`` of the branch), down
  to ``keep_ratio`` of the node's length.
* ``leaf_priority``: the order in which whole leaves go (smallest first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _shares(mass: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative mass ``[Hk, n]`` scaled to sum 1 (an empty row stays 0)."""
    mass = mass.float().clamp(min=0).nan_to_num(posinf=0.0)
    total = mass.sum(-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp(min=1e-30), torch.zeros_like(mass))


@dataclass
class TokenImportance:
    """One request's per-position importance (float32, on the CPU, grown as the sequence grows)."""

    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def _reach(self, length: int) -> None:
        if length > self.scores.numel():
            grown = torch.zeros(max(length, 2 * self.scores.numel()))
            grown[: self.scores.numel()] = self.scores
            self.scores = grown

    def observe_columns(self, mass: torch.Tensor) -> None:
        """Per-KV-head mass over positions ``0 .. L-1``: ``[Hk, L]``."""
        if mass.dim() != 2:
            raise ValueError(f"mass must be [kv_heads, length], got shape {tuple(mass.shape)}")
        top = _shares(mass).amax(0).cpu()
        self._reach(top.numel())
        torch.maximum(self.scores[: top.numel()], top, out=self.scores[: top.numel()])

    def observe_selection(self, positions: torch.Tensor, mass: torch.Tensor) -> None:
        """A selection's positions ``[Hk, n]`` and their mass ``[Hk, n]`` (negative positions:
        padding of a ragged selection)."""
        if positions.shape != mass.shape or positions.dim() != 2:
            raise ValueError(f"positions and mass must both be [kv_heads, n], got {tuple(positions.shape)} "
                             f"and {tuple(mass.shape)}")
        valid = positions >= 0
        share = _shares(mass.masked_fill(~valid, 0))[valid].cpu()
        pos = positions[valid].long().cpu()
        if pos.numel():
            self._reach(int(pos.max()) + 1)
            self.scores.scatter_reduce_(0, pos, share, reduce="amax")

    def upto(self, length: int) -> torch.Tensor:
        """Scores of positions ``0 .. length-1`` (0 for positions never observed)."""
        self._reach(length)
        return self.scores[:length].clone()


def prune_plan(importance: torch.Tensor, live: torch.Tensor, *, start: int, branch_end: int, sink: int,
               recent: int, keep_ratio: float, max_tokens: int | None = None) -> torch.Tensor:
    """Local indices (ascending) of the tokens of one node to prune.

    ``importance``, ``live``: ``[n]`` for the node's tokens, which sit at absolute positions
    ``start .. start+n-1`` of a branch ending at ``branch_end`` (exclusive).  Never prunes a
    dead token, a position below ``sink``, or one of the branch's last ``recent``; leaves at
    least ``ceil(keep_ratio * n)`` live tokens (a share of the node's length, so repeated
    pressure stops pruning there and whole leaves go instead); at most ``max_tokens``
    (``None``: no cap)."""
    n = importance.numel()
    if live.shape != importance.shape:
        raise ValueError(f"live must match importance's shape {tuple(importance.shape)}, got {tuple(live.shape)}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    if sink < 0 or recent < 0:
        raise ValueError(f"sink and recent must be >= 0, got {sink}, {recent}")
    pos = torch.arange(start, start + n)
    allowed = live & (pos >= sink) & (pos < branch_end - recent)
    n_live = int(live.sum())
    quota = n_live - math.ceil(keep_ratio * n)
    if max_tokens is not None:
        quota = min(quota, max_tokens)
    quota = min(quota, int(allowed.sum()))
    if quota <= 0:
        return torch.zeros(0, dtype=torch.long)
    ranked = importance.float().masked_fill(~allowed, math.inf)
    return ranked.topk(quota, largest=False, sorted=False).indices.sort().values


def leaf_priority(*, shared: int, importance: float, last_access: float, recompute_tokens: int) -> tuple:
    """Eviction order of whole leaves, smallest first: leaves no other branch or request shared
    go before shared ones (``shared``: hits beyond the first insert); among those the least
    recently used; ties by importance per token and by length (the cheapest to compute again).

    Recency before importance: whether a conversation comes back is predicted by when it was
    last used, not by how its own tokens were attended; importance decides *which tokens* of a
    branch are pruned (``prune_plan``), which is where it pays."""
    return (shared, last_access, round(importance, 6), recompute_tokens)
