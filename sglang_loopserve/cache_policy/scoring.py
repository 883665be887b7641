"""Scoring the cache by attention mass, and keeping the top positions: the steps every decode
selection shares (``decode``'s single request, ``batched``'s server batch, ``methods``' baselines).
"""

from __future__ import annotations

import torch

from ..attention.logits import scoring_logits


def check_gqa(n_heads: int, n_kv: int) -> int:
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
    ``lengths [B]`` -> ``[B, Hk, Lmax]`` (zero past each length).  The product runs in the keys'
    dtype (``scoring_logits``), the softmax in fp32."""
    n_req, w, n_heads, d = recent_q.shape
    _, l_max, n_kv, dk = k.shape
    if d != dk:
        raise ValueError(f"head dims of recent_q ({d}) and k ({dk}) differ")
    group = check_gqa(n_heads, n_kv)
    qs = (recent_q.float() * d**-0.5).permute(0, 2, 1, 3).reshape(n_req * n_kv, group * w, d)
    ks = k.permute(0, 2, 3, 1).reshape(n_req * n_kv, d, l_max)
    logits = scoring_logits(qs, ks).view(n_req, n_kv, group * w, l_max)
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
    kept = ranked.topk(min(budget, l_max), dim=-1, sorted=False).indices.sort(dim=-1).values
    valid = torch.arange(kept.shape[1], device=scores.device)[None, :] < length.clamp(max=budget)
    # Padding positions (>= length) sort last, so the real ones are a prefix.
    return kept, valid


def keep_top(scores: torch.Tensor, budget: int, sink: int, recent: int) -> torch.Tensor:
    """``[Hk, min(budget, L)]`` sorted positions: first ``sink``, last ``recent``, then top scores."""
    lengths = torch.full((scores.shape[0],), scores.shape[1], device=scores.device)
    return keep_top_padded(scores, lengths, budget, sink, recent)[0]
