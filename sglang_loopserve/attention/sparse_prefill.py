"""``sparse_prefill_attention``: LoopServe's online sparse prefill for one sequence.

estimate (``estimate.py``) -> select lines (``select.py``) -> ``BlockMask``
(``block_mask.py``) -> a block-sparse kernel (``kernels/``).

When the plan keeps so many cells that the sparse kernel would cost more
than the exact rectangle (``exact.py``), the exact rectangle runs instead:
the sparse kernel computes a cell at a fraction of the dense kernel's speed
(gathers, partial batches), measured per device in ``SPARSE_BELOW``.  The
estimate still seeds the decode selection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .block_mask import BlockMask
from .estimate import sample_attention, sample_query_rows
from .exact import exact_prefill_attention
from .kernels import KERNELS, default_kernel
from .patterns import PATTERNS, static_lines
from .select import select_vertical_slash

#: Per device type, where no measurement says otherwise (the server's is measured on its machine:
#: ``calibrate``): the sparse kernel runs when the plan's density is below
#: this, else the exact rectangle (which is then both faster and exact): where
#: the two kernels' costs per computed cell break even.  CPU: 2-core x86, bf16,
#: SmolLM2 layers at 4K-8K (``benchmarks/prefill_attention.py``): the gather
#: kernel breaks even with the exact rectangle at a density of about 0.6.  CUDA:
#: in an H100 sweep (``benchmarks/gpu_kernels.py --sweep``) the Triton kernel beat
#: dense FlashAttention up to a density of 0.5.
SPARSE_BELOW = {"cpu": 0.6, "cuda": 0.5}

#: A layer whose plan at ``alpha`` computes less than this share of the causal pairs is *sharp*
#: (ours): its heads attend to few keys, and which keys differs from query to query, so lines
#: chosen on the sampled rows cover the other rows' attention less than ``alpha`` says.  It is
#: planned again from the same sample at ``sharpened_alpha(alpha)``.  Measured by the answer's
#: exact KL to full attention (``benchmarks/prefill_kl_offline.py``, SmolLM2, 3.6K-token turns over
#: a cached first turn): the error of the whole prefill sat in layers 12-19, the sparsest (0.14-0.38
#: of the pairs at alpha 0.94; on the hardest document, exact there: KL 0.0032 -> 0.0002), while
#: the diffuse layers could lose more.  This rule at alpha 0.90: 0.0014 at 0.55 of the pairs over
#: 9 answers, against 0.0017 at 0.58 for 0.94 everywhere (the hardest document: 0.0015 against
#: 0.0027; docs/fidelity.md).
SHARP_BELOW = 0.3
#: Share of ``1 - alpha`` a sharp layer may miss (0.2: alpha 0.90 -> 0.98).
SHARP_MISS = 0.2
#: ``SparsePrefillStats.alpha_reason``: the plan covers the asked alpha (not sharp, or not sharpened);
#: a sharp layer's sharpened alpha; the asked alpha because the sharpened plan was too dense to pay.
ALPHA_ASKED, ALPHA_SHARPENED, ALPHA_SHARP_TOO_DENSE = "asked", "sharpened", "sharpened plan too dense"


def sharpened_alpha(alpha: float) -> float:
    """The mass a sharp layer's lines cover (``SHARP_BELOW``)."""
    return 1.0 - (1.0 - alpha) * SHARP_MISS


def dense_is_cheaper(mask: BlockMask, max_density: float | None = None) -> bool:
    """True when the exact rectangle is faster than the sparse kernel on ``mask``: its density is at
    least ``max_density`` (the server's is measured on its machine: ``calibrate``), by default the
    device type's ``SPARSE_BELOW``."""
    if max_density is None:
        max_density = SPARSE_BELOW.get(mask.block_indptr.device.type, 0.5)
    return mask.density() >= max_density


@dataclass
class SparsePrefillStats:
    density: float  # fraction of causal (query, key) pairs computed, in (0, 1]
    head_density: torch.Tensor  # [H]
    vertical_counts: torch.Tensor  # [H] mean chosen columns per segment
    slash_counts: torch.Tensor  # [H] mean chosen diagonals per segment
    kernel: str  # the sparse kernel, or "exact" (alpha 1, or the plan was too dense to pay)
    timings: dict = field(default_factory=dict)  # seconds: estimate, select, index, attention
    #: ``[Hk, n_ctx]`` estimated attention mass per key (summed over the sampled
    #: rows and the query heads of each group); ``None`` when alpha = 1 (no estimate).
    #: Seeds the decode selection (``DecodeCompressor.seed``).
    key_scores: torch.Tensor | None = None
    planned_density: float = 1.0  # the plan's density, also when the exact rectangle ran
    plan_alpha: float | None = None  # the mass its lines cover: alpha, or sharpened (SHARP_BELOW)
    alpha_reason: str | None = None  # why plan_alpha: ALPHA_ASKED, ALPHA_SHARPENED, ALPHA_SHARP_TOO_DENSE
    nonfinite: bool = False  # the queries or keys held NaN/Inf: no plan, the exact rectangle ran


class NonFiniteInput(ValueError):
    """The queries or keys hold NaN or Inf: an estimate of them ranks nothing."""


def validate_prefill_inputs(q, k, v, alpha, q_window, block_size) -> None:
    """Raise ``ValueError`` naming the first bad parameter."""
    if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not isinstance(q_window, int) or q_window < 1:
        raise ValueError(f"q_window must be an integer >= 1, got {q_window!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims of q, k, v differ: q {q.shape[-1]}, k/v {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads H={q.shape[1]} must be a multiple of key heads "
                         f"Hk={k.shape[1]} (H % Hk != 0)")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"n_new={q.shape[0]} new queries exceed n_ctx={k.shape[0]} keys")
    if q.shape[0] < 1:
        raise ValueError("q must hold at least one new token (n_new >= 1)")


def _now(device) -> float:
    """Wall time after the device's queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _plan(q, k, *, alpha, q_window, block_size, sink, local, rows_per_segment, timings, sharpen=False,
          max_density=None):
    """Estimate, select and index: ``(BlockMask, VerticalSlashLines, the alpha covered, why that alpha)``;
    with ``sharpen`` a plan sparser than ``SHARP_BELOW`` is made again at ``sharpened_alpha(alpha)``
    (same sample), and kept unless the density gate would run the exact rectangle on it."""
    n_new = q.shape[0]
    t0 = time.perf_counter()
    rows = sample_query_rows(n_new, q_window, device=q.device)
    sample = sample_attention(q, k, rows)
    # Every key meets the sampled rows, so one sum sees a NaN/Inf key or query (a pass over
    # the sample, 1/d of the estimate's multiply-adds).
    if not bool(torch.isfinite(sample.logits.sum() + q.sum())):
        raise NonFiniteInput("queries or keys hold NaN/Inf")
    t1 = _now(q.device)

    spent = dict(estimate=t1 - t0, select=0.0, index=0.0)

    def select_and_index(a):
        t = _now(q.device)
        lines = select_vertical_slash(sample, n_new, alpha=a, block_size=block_size, sink=sink,
                                      local=block_size if local is None else local,
                                      rows_per_segment=rows_per_segment)
        t_selected = _now(q.device)
        mask = BlockMask.from_lines(lines)
        spent["select"] += t_selected - t
        spent["index"] += _now(q.device) - t_selected
        return mask, lines

    mask, lines = select_and_index(alpha)
    reason = ALPHA_ASKED
    if sharpen and mask.density() < SHARP_BELOW:
        sharp_mask, sharp_lines = select_and_index(sharpened_alpha(alpha))
        # A sharp plan dense enough for the exact rectangle would cost every cell to buy the last
        # few points of mass: a diffuse floor under a few hot keys (0.07 of the pairs at alpha 0.95,
        # all of them at 0.99).  The first plan stays.
        if dense_is_cheaper(sharp_mask, max_density):
            reason = ALPHA_SHARP_TOO_DENSE
        else:
            alpha, mask, lines, reason = sharpened_alpha(alpha), sharp_mask, sharp_lines, ALPHA_SHARPENED
    if timings is not None:
        timings.update(spent)
    return mask, lines, alpha, reason


def build_block_mask(q, k, *, alpha, q_window, block_size, sink=4, local=None,
                     rows_per_segment=8, timings=None, sharpen=False, max_density=None
                     ) -> tuple[BlockMask, torch.Tensor]:
    """Estimate, select and index: the ``BlockMask`` and the lines per segment ``[H, G, 2]``
    (columns, diagonals).  ``alpha`` 1 is every causal block; ``sharpen``: as the server plans
    (``SHARP_BELOW``)."""
    if alpha >= 1.0:
        mask = BlockMask.dense(q.shape[1], q.shape[0], k.shape[0], block_size, device=q.device)
        return mask, torch.full((q.shape[1], 1, 2), k.shape[0], device=q.device)
    mask, lines, _, _ = _plan(q, k, alpha=alpha, q_window=q_window, block_size=block_size, sink=sink,
                           local=local, rows_per_segment=rows_per_segment, timings=timings, sharpen=sharpen,
                           max_density=max_density)
    return mask, lines.segment_counts


def _exact_rectangle(q, k, v, return_stats: bool, nonfinite: bool = False):
    t = time.perf_counter()
    out = exact_prefill_attention(q, k, v)
    timings = dict(estimate=0.0, select=0.0, index=0.0, attention=_now(q.device) - t)
    if not return_stats:
        return out
    ones = torch.ones(q.shape[1], dtype=torch.float64)
    return out, SparsePrefillStats(density=1.0, head_density=ones, vertical_counts=ones * k.shape[0],
                                   slash_counts=ones * k.shape[0], kernel="exact", timings=timings,
                                   nonfinite=nonfinite)


def sparse_prefill_attention(q, k, v, *, alpha: float = 0.9, q_window: int = 64,
                             block_size: int = 64, return_stats: bool = False,
                             kernel: str = "auto", sink: int = 4, local: int | None = None,
                             pattern: str = "loopserve", budget: int = 1024, sharpen: bool = True,
                             max_density: float | None = None):
    """Attention of a turn's new tokens over the whole sequence, on the cells that matter.

    Args:
        q: ``[n_new, H, d]`` queries of the new tokens (post-RoPE).
        k, v: ``[n_ctx, Hk, d]`` keys and values of the whole sequence, cached
            history first, the new tokens last; ``H % Hk == 0`` (GQA).
        alpha: fraction of the estimated attention mass to cover, in (0, 1];
            1.0 computes exact causal attention (``exact_prefill_attention``).
            With ``sharpen`` a layer whose plan is sparser than ``SHARP_BELOW``
            covers ``sharpened_alpha(alpha)`` instead, unless that plan is dense
            enough for the exact rectangle (``dense_is_cheaper``): then the plan
            at ``alpha`` stays.  ``stats.plan_alpha`` is the alpha covered,
            ``stats.alpha_reason`` why.
        q_window: sampled query rows: the last ``q_window`` plus as many spread
            over the rest of the new tokens.
        block_size: query and key block size (power of two >= 16).
        return_stats: also return a ``SparsePrefillStats``.
        kernel: ``"auto"`` (fastest available for the device) or one of
            ``sglang_loopserve.attention.kernels.KERNELS``; with ``"auto"`` a
            plan at least ``max_density`` dense (default: the device type's
            ``SPARSE_BELOW``) runs the exact rectangle instead.
        sink: leading key columns always kept.
        local: diagonals ``0..local-1`` always kept (default ``block_size``).
        pattern: ``"loopserve"`` (estimate and select, above) or a baseline's static
            pattern (``patterns.PATTERNS``: ``alpha`` and ``q_window`` unused; about
            ``budget`` keys per query; its cells are computed even where the exact
            rectangle would be cheaper, so it answers as the baseline does).

    Queries or keys holding NaN/Inf run the exact rectangle (as stock attention would) with
    ``stats.nonfinite`` set.

    Returns ``out [n_new, H, d]`` in ``q.dtype``, or ``(out, stats)``.
    """
    validate_prefill_inputs(q, k, v, alpha, q_window, block_size)
    name = default_kernel(q.device) if kernel == "auto" else kernel
    if name not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {sorted(KERNELS)}, got {kernel!r}")
    if pattern != "loopserve" and pattern not in PATTERNS:
        raise ValueError(f"pattern must be 'loopserve' or one of {', '.join(PATTERNS)}, got {pattern!r}")
    timings: dict = {}
    n_heads = q.shape[1]
    if pattern != "loopserve":
        t0 = time.perf_counter()
        plan_alpha, alpha_reason = None, None
        lines = static_lines(pattern, q, k, budget=budget, block_size=block_size)
        t1 = _now(q.device)
        mask = BlockMask.from_lines(lines)
        timings.update(estimate=0.0, select=t1 - t0, index=_now(q.device) - t1)
    elif alpha >= 1.0:
        return _exact_rectangle(q, k, v, return_stats)
    else:
        try:
            mask, lines, plan_alpha, alpha_reason = _plan(
                q, k, alpha=float(alpha), q_window=q_window, block_size=block_size, sink=sink, local=local,
                rows_per_segment=8, timings=timings, sharpen=sharpen, max_density=max_density)
        except NonFiniteInput:
            return _exact_rectangle(q, k, v, return_stats, nonfinite=True)
    t = time.perf_counter()
    exact = pattern == "loopserve" and kernel == "auto" and dense_is_cheaper(mask, max_density)
    out = exact_prefill_attention(q, k, v) if exact else KERNELS[name](q, k, v, mask)
    timings["attention"] = _now(q.device) - t
    if not return_stats:
        return out
    head_density = torch.ones(n_heads, dtype=torch.float64) if exact else mask.head_density()
    counts = lines.segment_counts
    stats = SparsePrefillStats(
        density=float(head_density.mean()), head_density=head_density,
        vertical_counts=counts[..., 0].float().mean(-1), slash_counts=counts[..., 1].float().mean(-1),
        kernel="exact" if exact else name, timings=timings,
        key_scores=None if lines.key_mass is None else lines.key_mass.view(k.shape[1], -1, k.shape[0]).sum(1),
        planned_density=mask.density(), plan_alpha=plan_alpha, alpha_reason=alpha_reason)
    return out, stats
