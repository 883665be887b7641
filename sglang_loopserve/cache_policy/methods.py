"""Which cached tokens to keep: LoopServe and the baselines behind one interface.

One small dataclass per method with a ``score(ctx) -> [Hk, L]`` (higher is
kept first); ``select`` keeps the first ``sink`` and last ``recent`` positions
and fills the rest of an equal ``budget`` by score, so methods compare like
with like.  ``progressive`` says whether the method re-selects while decoding
(LoopServe) or selects once after the prompt (SnapKV, StreamingLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .scoring import attention_mass, keep_top, validate_budget


@dataclass
class ScoreContext:
    k: torch.Tensor  # [L, Hk, d] every cached key (prompt + generated so far)
    prompt_len: int  # keys [0, prompt_len) came from the prompt
    recent_q: torch.Tensor | None = None  # [w, H, d] latest generated queries (post-RoPE)
    prompt_q: torch.Tensor | None = None  # [P, H, d] queries of the prompt's last tokens


@dataclass
class KVScorer:
    name: ClassVar[str] = ""
    progressive: ClassVar[bool] = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def select(self, ctx: ScoreContext, budget: int, sink: int = 4, recent: int = 32) -> torch.Tensor:
        """``[Hk, min(budget, L)]`` positions to attend, ascending."""
        validate_budget(budget, sink, recent)
        return keep_top(self.score(ctx), budget, sink, recent)


@dataclass
class LoopServe(KVScorer):
    """Attention mass of the latest *output* queries; re-selected every few tokens."""

    name: ClassVar[str] = "loopserve"
    progressive: ClassVar[bool] = True

    def score(self, ctx):
        if ctx.recent_q is None:
            raise ValueError("LoopServe needs recent_q, the latest generated queries")
        return attention_mass(ctx.recent_q, ctx.k)


@dataclass
class SnapKV(KVScorer):
    """Observation window at the end of the prompt, 1-D average pooling, selected once.

    window: prompt queries observed (SnapKV's default 32); kernel: pooling width.
    Generated tokens score +inf (they came after the selection and are kept).
    """

    window: int = 32
    kernel: int = 5
    name: ClassVar[str] = "snapkv"

    def score(self, ctx):
        if ctx.prompt_q is None:
            raise ValueError("SnapKV needs prompt_q, the queries of the prompt's last tokens")
        obs = ctx.prompt_q[-self.window:]
        mass = attention_mass(obs, ctx.k[: ctx.prompt_len])  # [Hk, P]
        pooled = F.avg_pool1d(mass[:, None], self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False)[:, 0, : ctx.prompt_len]
        pooled[:, ctx.prompt_len - obs.shape[0]:] = float("inf")  # the window itself stays
        extra = pooled.new_full((pooled.shape[0], ctx.k.shape[0] - ctx.prompt_len), float("inf"))
        return torch.cat([pooled, extra], dim=1)


@dataclass
class AdaKV(SnapKV):
    """SnapKV's scores with the budget shared across the KV heads of a layer (Feng et al.,
    2024): the ``budget * Hk`` best (head, position) pairs, so a head with concentrated
    attention keeps few tokens and a diffuse one many; each head keeps at least its ``sink``
    and ``recent`` tokens.  ``select`` returns ``[Hk, W]`` rows padded with -1 after each
    head's ascending positions."""

    name: ClassVar[str] = "adakv"

    def select(self, ctx, budget, sink=4, recent=32):
        validate_budget(budget, sink, recent)
        scores = self.score(ctx).float()  # [Hk, L]
        n_kv, length = scores.shape
        if length <= budget:
            return torch.arange(length, device=scores.device).expand(n_kv, -1).clone()
        pos = torch.arange(length, device=scores.device)
        forced = (pos < sink) | (pos >= length - recent)
        # Heads compare directly: each head's window queries spread the same total attention.
        ranked = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        top = ranked.flatten().topk(budget * n_kv).indices
        keep = torch.zeros(n_kv * length, dtype=torch.bool, device=scores.device)
        keep[top] = True
        keep = keep.view(n_kv, length)
        # Kept positions first, ascending; the others sort to the end as ``length``, then -1.
        out = torch.where(keep, pos, length).sort(dim=-1).values[:, : int(keep.sum(-1).max())]
        return out.masked_fill_(out == length, -1)


@dataclass
class StreamingLLM(KVScorer):
    """Attention sinks + the most recent tokens (positional, no attention needed)."""

    name: ClassVar[str] = "streaming_llm"

    def score(self, ctx):
        pos = torch.arange(ctx.k.shape[0], device=ctx.k.device, dtype=torch.float32)
        return pos.expand(ctx.k.shape[1], -1)


@dataclass
class FullAttention(KVScorer):
    """Everything (the reference; ignores the budget)."""

    name: ClassVar[str] = "full"

    def score(self, ctx):
        return torch.ones(ctx.k.shape[1], ctx.k.shape[0], device=ctx.k.device)

    def select(self, ctx, budget, sink=4, recent=32):
        return torch.arange(ctx.k.shape[0], device=ctx.k.device).expand(ctx.k.shape[1], -1).clone()


METHODS: dict[str, type[KVScorer]] = {m.name: m for m in (LoopServe, SnapKV, AdaKV, StreamingLLM, FullAttention)}
