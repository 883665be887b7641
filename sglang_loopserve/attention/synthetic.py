"""Synthetic q/k/v with planted vertical and slash structure (tests and benchmarks).

Keys and queries carry random unit "position codes" ``e(p)``: a query at
position ``p`` holds ``e(p)``, a key at ``j`` holds ``e(j + delta)`` for each
planted diagonal ``delta``, so their dot product is large exactly on those
diagonals.  A hot direction ``u`` shared by all queries and a few keys plants
vertical lines.  Optionally the first ``question_rows`` new queries look
elsewhere: only at their own set of ``question_keys`` (a question at the start
of a turn whose answer lives in other parts of the history).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PlantedInput:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    columns: torch.Tensor  # [Hk, n_columns] planted hot key positions
    diagonals: tuple[int, ...]
    question_keys: torch.Tensor  # [n] keys the question rows attend to


def planted_qkv(n_new: int, n_ctx: int, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 128,
                *, n_columns: int = 8, diagonals: tuple[int, ...] = (0, 1, 300),
                strength: float = 12.0, question_rows: int = 0, n_question_keys: int = 6,
                value_spread: float = 1.0, seed: int = 0, dtype=torch.float32) -> PlantedInput:
    """``strength`` is the planted logit (after the 1/sqrt(d) scaling)."""
    g = torch.Generator().manual_seed(seed)
    d, hk = head_dim, num_kv_heads
    group = num_heads // hk
    span = n_ctx + max(diagonals) + 1

    def unit(*shape):
        x = torch.randn(*shape, d, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    amp = strength * d**0.5  # dot products are scaled by 1/sqrt(d)
    hot = unit(hk)  # hot direction per KV head
    ask = unit(1)[0]  # the question's direction
    # Position codes orthogonal to the hot and question directions, so the
    # only noise is the codes' cross-talk among themselves (~1/sqrt(d)).
    codes = torch.randn(hk, span, d, generator=g)
    for h in range(hk):
        basis, _ = torch.linalg.qr(torch.stack([hot[h], ask], dim=1))
        codes[h] -= (codes[h] @ basis) @ basis.T
    codes /= codes.norm(dim=-1, keepdim=True)
    pos = torch.arange(n_ctx)
    k = torch.zeros(n_ctx, hk, d)
    for delta in diagonals:
        k += codes[:, pos + delta].transpose(0, 1)
    columns = torch.stack([torch.randperm(max(n_ctx - n_new, 1), generator=g)[:n_columns] for _ in range(hk)])
    for h in range(hk):
        k[columns[h], h] += hot[h]
    question_keys = torch.randperm(max(n_ctx - n_new, 1), generator=g)[:n_question_keys]
    k[question_keys] += ask

    qpos = n_ctx - n_new + torch.arange(n_new)
    q = torch.zeros(n_new, num_heads, d)
    for h in range(num_heads):
        kvh = h // group
        q[:, h] = amp * codes[kvh, qpos] + 0.8 * amp * hot[kvh]
    if question_rows:
        q[:question_rows] = amp * ask
    # Values share a mean direction per head, as real values do (the output
    # of attention is far from zero); ``value_spread`` scales the rest.
    v = unit(hk)[None] * d**0.5 + value_spread * torch.randn(n_ctx, hk, d, generator=g)
    return PlantedInput(q.to(dtype), k.to(dtype), v.to(dtype), columns, tuple(diagonals), question_keys)


def hot_keys_over_floor_qkv(n_new: int = 512, n_ctx: int = 4096, num_heads: int = 4, num_kv_heads: int = 2,
                            head_dim: int = 64, *, n_hot: int = 8, hot_mass: float = 0.96,
                            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few hot keys over a diffuse floor: every query leans on one direction ``u`` that ``n_hot``
    keys of the history hold, scaled so that they take about ``hot_mass`` of a row's softmax; the
    other keys are near zero, so the rest of the mass spreads evenly over the whole sequence.
    Covering ``hot_mass`` of the mass takes a few columns; covering more takes nearly every cell."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(head_dim, generator=g)
    u /= u.norm()
    q = torch.randn(n_new, num_heads, head_dim, generator=g)
    q = 0.3 * q / q.norm(dim=-1, keepdim=True) + u
    k = 0.01 * torch.randn(n_ctx, num_kv_heads, head_dim, generator=g)
    v = torch.randn(n_ctx, num_kv_heads, head_dim, generator=g)
    hot = torch.randperm(n_ctx - n_new, generator=g)[:n_hot]
    # the logit at which n_hot keys hold hot_mass of a softmax over ~n_ctx floor keys at logit ~0
    logit = torch.log(torch.tensor(hot_mass / (1 - hot_mass) * n_ctx / n_hot))
    k[hot] = (u * logit * head_dim**0.5 / (q @ u).mean())[None, :]
    return q, k, v
