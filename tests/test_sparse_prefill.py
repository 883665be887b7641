"""Online prefill sparsification: accuracy, sparsity and input validation."""

from __future__ import annotations

import pytest
import torch

from sglang_loopserve.attention import (BlockMask, build_block_mask, sample_attention,
                                        sample_query_rows, select_vertical_slash,
                                        sparse_prefill_attention)
from sglang_loopserve.attention.kernels import KERNELS
from sglang_loopserve.attention.kernels.reference import (block_sparse_attention_reference,
                                                          causal_attention)
from sglang_loopserve.attention.synthetic import planted_qkv


def rel_err(out, ref, rows=slice(None)):
    out, ref = out[rows].double(), ref[rows].double()
    return float((out - ref).norm() / ref.norm())


def random_qkv(n_new, n_ctx, heads, kv_heads, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_new, heads, d, generator=g), torch.randn(n_ctx, kv_heads, d, generator=g),
            torch.randn(n_ctx, kv_heads, d, generator=g))


SHAPES = [  # n_new, n_ctx, H, Hk, block
    (100, 300, 4, 2, 32),  # GQA, n_new < n_ctx, nothing a multiple of the block
    (64, 64, 2, 1, 16),  # n_new == n_ctx, exact blocks
    (130, 130, 3, 3, 64),  # MHA, n_new == n_ctx, ragged
    (1, 77, 9, 3, 16),  # a single new token
    (257, 1000, 9, 3, 64),  # SmolLM2's head layout
]


@pytest.mark.parametrize("n_new, n_ctx, H, Hk, bs", SHAPES)
def test_alpha_one_is_dense(n_new, n_ctx, H, Hk, bs):
    q, k, v = random_qkv(n_new, n_ctx, H, Hk)
    ref = causal_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    out, stats = sparse_prefill_attention(q, k, v, alpha=1.0, block_size=bs, return_stats=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - ref).abs().max() < 2e-4
    assert stats.density == pytest.approx(1.0)


def test_planted_structure_is_sparse_and_accurate():
    p = planted_qkv(512, 2048)
    ref = causal_attention(p.q, p.k, p.v)
    out, stats = sparse_prefill_attention(p.q, p.k, p.v, alpha=0.95, return_stats=True)
    assert stats.density < 0.5
    assert rel_err(out, ref) < 0.1
    assert 0 < stats.density <= 1
    assert stats.head_density.shape == (4,) and stats.vertical_counts.shape == (4,)
    # Every planted hot column is chosen (as a column or inside a visited block).
    allowed = BlockMask.from_lines(select_vertical_slash(
        sample_attention(p.q, p.k, sample_query_rows(512, 64)), 512, alpha=0.95,
        block_size=64)).to_dense()
    last_row = allowed[:, -1]  # [H, n_ctx]
    for h in range(4):
        assert last_row[h, p.columns[h // 2]].all()


def test_density_falls_as_alpha_falls():
    p = planted_qkv(512, 2048)
    dens = [sparse_prefill_attention(p.q, p.k, p.v, alpha=a, return_stats=True, sharpen=False)[1].density
            for a in (0.5, 0.9, 0.99, 1.0)]
    assert dens == sorted(dens) and dens[0] < dens[-1] == pytest.approx(1.0)


def test_sharp_layer_is_planned_again_at_a_higher_alpha():
    """A plan sparser than ``SHARP_BELOW`` is made again from the same sample at
    ``sharpened_alpha``; a denser one keeps ``alpha``; ``sharpen=False`` never re-plans."""
    from sglang_loopserve.attention.sparse_prefill import SHARP_BELOW, sharpened_alpha

    p = planted_qkv(512, 2048)
    plain = build_block_mask(p.q, p.k, alpha=0.7, q_window=64, block_size=64)[0].density()
    assert plain < SHARP_BELOW  # planted: a few hot columns and diagonals
    sharp = build_block_mask(p.q, p.k, alpha=sharpened_alpha(0.7), q_window=64, block_size=64)[0].density()
    assert sharpened_alpha(0.7) == pytest.approx(0.94) and sharp > plain
    _, st = sparse_prefill_attention(p.q, p.k, p.v, alpha=0.7, return_stats=True)
    assert st.plan_alpha == pytest.approx(0.94) and st.planned_density == pytest.approx(sharp)
    assert st.alpha_reason == "sharpened"
    _, st = sparse_prefill_attention(p.q, p.k, p.v, alpha=0.7, return_stats=True, sharpen=False)
    assert st.plan_alpha == pytest.approx(0.7) and st.planned_density == pytest.approx(plain)
    q, k, v = random_qkv(256, 1024, 4, 2)  # diffuse: far denser than SHARP_BELOW
    _, st = sparse_prefill_attention(q, k, v, alpha=0.9, return_stats=True)
    assert st.planned_density >= SHARP_BELOW and st.plan_alpha == pytest.approx(0.9)


def test_a_sharp_plan_too_dense_to_pay_keeps_the_first_plan():
    """A few hot keys over a diffuse floor (512 new over 4,096 keys): alpha 0.95 covers the hot
    columns in a few percent of the pairs, 0.99 needs nearly every cell.  The sharp-layer rule must
    not trade that plan for the exact rectangle's full cost."""
    from sglang_loopserve.attention.sparse_prefill import (ALPHA_ASKED, ALPHA_SHARP_TOO_DENSE, SHARP_BELOW,
                                                           dense_is_cheaper, sharpened_alpha)
    from sglang_loopserve.attention.synthetic import hot_keys_over_floor_qkv

    q, k, v = hot_keys_over_floor_qkv()
    ref = causal_attention(q, k, v)
    first = build_block_mask(q, k, alpha=0.95, q_window=64, block_size=64)[0]
    assert first.density() < SHARP_BELOW  # sharp: the rule looks at it again
    assert dense_is_cheaper(build_block_mask(q, k, alpha=sharpened_alpha(0.95), q_window=64, block_size=64)[0])
    out, st = sparse_prefill_attention(q, k, v, alpha=0.95, return_stats=True)  # sharpen on (the server's)
    assert st.kernel != "exact" and st.density <= 0.5 and st.planned_density == pytest.approx(first.density())
    assert rel_err(out, ref) < 0.1
    assert st.plan_alpha == pytest.approx(0.95) and st.alpha_reason == ALPHA_SHARP_TOO_DENSE
    _, st = sparse_prefill_attention(q, k, v, alpha=0.95, return_stats=True, sharpen=False)
    assert st.alpha_reason == ALPHA_ASKED


def test_question_at_start_keeps_its_own_lines():
    """64 question rows at the start of a 512-token turn look at other keys than the rest."""
    p = planted_qkv(512, 2048, question_rows=64)
    ref = causal_attention(p.q, p.k, p.v)
    out, stats = sparse_prefill_attention(p.q, p.k, p.v, alpha=0.95, return_stats=True)
    assert rel_err(out, ref, slice(0, 64)) < 0.1
    assert rel_err(out, ref) < 0.1
    assert stats.density < 0.6

    # Control: lines estimated from the last queries alone (MInference's rule)
    # miss the question's keys, so the test above can fail.
    last_only = sample_attention(p.q, p.k, torch.arange(448, 512))
    lines = select_vertical_slash(last_only, 512, alpha=0.95, block_size=64, rows_per_segment=64)
    mask = BlockMask.from_lines(lines)
    control = block_sparse_attention_reference(p.q, p.k, p.v, mask)
    assert rel_err(control, ref, slice(0, 64)) > 0.3


def test_sampled_rows_cover_start_middle_end():
    rows = sample_query_rows(512, 64)
    assert rows.unique().numel() == rows.numel() == 128
    assert (rows[-64:] == torch.arange(448, 512)).all()
    assert rows[0] < 8 and rows[63] > 430  # strided over the rest
    assert (sample_query_rows(40, 64) == torch.arange(40)).all()


@pytest.mark.parametrize("name", ["gather", "flex", "reference"])
@pytest.mark.parametrize("n_new, n_ctx, H, Hk, bs", SHAPES)
def test_kernel_equals_reference_on_same_mask(name, n_new, n_ctx, H, Hk, bs):
    q, k, v = random_qkv(n_new, n_ctx, H, Hk, seed=1)
    mask, _ = build_block_mask(q, k, alpha=0.6, q_window=16, block_size=bs)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask,
                                           compute_dtype=torch.float64)
    out = KERNELS[name](q, k, v, mask)
    assert (out.double() - ref).abs().max() < 2e-4


def test_kernels_on_planted_sparse_mask():
    p = planted_qkv(200, 900, head_dim=64)
    mask, _ = build_block_mask(p.q, p.k, alpha=0.9, q_window=32, block_size=32)
    assert mask.density() < 0.8 and mask.col_indices.numel() > 0  # blocks and single columns
    ref = block_sparse_attention_reference(p.q.double(), p.k.double(), p.v.double(), mask,
                                           compute_dtype=torch.float64)
    for name in ("gather", "flex"):
        out = KERNELS[name](p.q, p.k, p.v, mask)
        assert (out.double() - ref).abs().max() < 2e-4, name


def test_block_mask_density_matches_dense_mask():
    p = planted_qkv(300, 1000, head_dim=64)
    mask, _ = build_block_mask(p.q, p.k, alpha=0.9, q_window=32, block_size=32)
    dense = mask.to_dense()
    assert torch.equal(mask.computed_pairs(), dense.sum((1, 2)))
    assert mask.density() == pytest.approx(float(dense.sum()) / (4 * mask.causal_pairs()))


def test_bf16_inputs():
    p = planted_qkv(256, 1024, dtype=torch.bfloat16)
    ref = causal_attention(p.q.float(), p.k.float(), p.v.float())
    out = sparse_prefill_attention(p.q, p.k, p.v, alpha=1.0)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 1e-2


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
    (dict(q_window=0), "q_window"), (dict(block_size=48), "block_size"),
    (dict(block_size=8), "block_size"), (dict(kernel="nope"), "kernel"),
])
def test_bad_parameters(kwargs, match):
    q, k, v = random_qkv(8, 16, 2, 1)
    with pytest.raises(ValueError, match=match):
        sparse_prefill_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shapes, match", [
    (((8, 3, 32), (16, 2, 32), (16, 2, 32)), "H % Hk"),
    (((8, 2, 16), (16, 1, 32), (16, 1, 32)), "head dims"),
    (((20, 2, 32), (16, 1, 32), (16, 1, 32)), "n_new"),
    (((8, 2, 32), (16, 1, 32), (15, 1, 32)), "k and v"),
    (((8, 2, 32), (16, 1, 32), (16, 1, 16)), "k and v"),
    (((8, 64), (16, 1, 32), (16, 1, 32)), "q must be"),
])
def test_bad_shapes(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        sparse_prefill_attention(q, k, v)


def test_plans_too_dense_to_pay_run_the_exact_rectangle():
    """Random attention is diffuse: its plan keeps most cells, and the exact rectangle runs."""
    from sglang_loopserve.attention.sparse_prefill import SPARSE_BELOW

    q, k, v = random_qkv(300, 900, 4, 2)
    out, stats = sparse_prefill_attention(q, k, v, alpha=0.95, return_stats=True)
    assert stats.planned_density >= SPARSE_BELOW["cpu"]
    assert stats.kernel == "exact" and stats.density == 1.0
    ref = causal_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    assert (out.double() - ref).abs().max() < 2e-4
    assert stats.key_scores is not None  # the estimate still seeds the decode selection
    p = planted_qkv(512, 2048)
    _, stats = sparse_prefill_attention(p.q, p.k, p.v, alpha=0.95, return_stats=True)
    assert stats.kernel == "gather" and stats.density == stats.planned_density < SPARSE_BELOW["cpu"]


def test_sampled_attention_is_the_causal_softmax_of_its_rows():
    """The estimate masks future keys per chunk of sampled rows: each row must still be exactly
    its query's causal softmax (strided rows early in the turn see few of the new keys)."""
    g = torch.Generator().manual_seed(7)
    n_new, n_ctx, H, Hk, d = 700, 1500, 6, 2, 32
    q, k = torch.randn(n_new, H, d, generator=g), torch.randn(n_ctx, Hk, d, generator=g)
    rows = sample_query_rows(n_new, 40)  # 80 rows: 5 chunks
    sample = sample_attention(q, k, rows)
    pos = rows + n_ctx - n_new
    logits = torch.einsum("shd,jhd->hsj", q[rows].double(), k.double().repeat_interleave(H // Hk, 1)) * d**-0.5
    logits.masked_fill_(torch.arange(n_ctx)[None, None, :] > pos[None, :, None], float("-inf"))
    torch.testing.assert_close(sample.probs.double(), torch.softmax(logits, -1), rtol=1e-5, atol=1e-7)
    assert torch.equal(sample.positions, pos)


def test_half_precision_estimate_keeps_the_same_mass():
    """bf16 keys: the estimate's product runs in bf16 (one rounding per logit), and the lines
    chosen from it keep as much of the fp32 estimate's attention as the fp32 lines do."""
    p = planted_qkv(512, 2048)
    q, k = p.q.bfloat16(), p.k.bfloat16()
    rows = sample_query_rows(512, 64)
    exact = sample_attention(q.float(), k.float(), rows).probs.clone()
    half = sample_attention(q, k, rows)
    assert half.probs.dtype == torch.float32
    torch.testing.assert_close(half.probs.sum(-1), torch.ones_like(exact[..., 0]))
    assert (half.probs - exact).abs().max() < 0.02  # a logit's bf16 rounding, not a different row
    assert (half.probs - exact).abs().max() > 0  # the half-precision product did run

    def kept(sample):
        lines = select_vertical_slash(sample, 512, alpha=0.95, block_size=64)
        allowed = BlockMask.from_lines(lines).to_dense()[:, rows]  # [H, S, n_ctx]
        return float((exact * allowed).sum(-1).mean())

    half_kept = kept(half)
    assert half_kept >= 0.95 and half_kept == pytest.approx(kept(sample_attention(q.float(), k.float(), rows)), abs=0.01)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loops_take_the_softmax_of_the_logits_as_they_read_them(dtype):
    """The CPU loops read the estimate's logits and take each row's softmax themselves (the
    probabilities are never written out): the same lines as from the probabilities, the same
    masses, on bf16 (the served cache) and fp32 logits."""
    from sglang_loopserve.attention import cpu_loops
    p = planted_qkv(1024, 3000, 9, 3, 64, question_rows=64)
    rows = sample_query_rows(1024, 64)
    sample = sample_attention(p.q.to(dtype), p.k.to(dtype), rows)
    assert sample.logits.dtype == dtype  # the product in the keys' precision, not widened
    from_logits = cpu_loops.segment_lines(sample.logits, sample.positions, 8, 4, 64, 0.95, softmax=True)
    from_probs = cpu_loops.segment_lines(sample.probs, sample.positions, 8, 4, 64, 0.95)
    for a, b, n_a, n_b in zip(from_logits[0], from_probs[0], from_logits[1], from_probs[1]):
        assert set(a[:n_a].tolist()) == set(b[:n_b].tolist())
    torch.testing.assert_close(from_logits[2], from_probs[2], rtol=1e-5, atol=1e-6)  # key masses
    torch.testing.assert_close(from_logits[2].sum(-1), torch.full((9,), float(len(rows))))
    with pytest.raises(TypeError, match="rows"):
        cpu_loops.segment_lines(sample.logits.half(), sample.positions, 8, 4, 64, 0.95, softmax=True)


def test_attention_sample_takes_probs_or_logits():
    from sglang_loopserve.attention.estimate import AttentionSample
    rows = torch.arange(2)
    with pytest.raises(ValueError, match="probs or logits"):
        AttentionSample(rows=rows, positions=rows)
    with pytest.raises(ValueError, match="probs or logits"):
        AttentionSample(rows=rows, positions=rows, probs=torch.ones(1, 2, 2), logits=torch.ones(1, 2, 2))
    logits = torch.tensor([[[0.0, 5.0], [1.0, 3.0]]])  # row 0 sees key 0 only
    sample = AttentionSample(rows=rows, positions=rows, logits=logits)
    torch.testing.assert_close(sample.probs, torch.tensor([[[1.0, 0.0], [0.1192029, 0.8807971]]]))

# ---------------------------------------------------------------- baselines' static patterns
@pytest.mark.parametrize("method", ["loops", "tensor"])
def test_static_patterns_cover_their_cells(method):
    from sglang_loopserve.attention.patterns import static_lines

    n_new, n_ctx, bs, budget = 300, 1000, 64, 128
    q, k, _ = random_qkv(n_new, n_ctx, 4, 2, seed=3)
    qpos = (n_ctx - n_new + torch.arange(n_new))[:, None]
    key = torch.arange(n_ctx)[None, :]
    causal = key <= qpos
    a_shape = ((key < bs) | (qpos - key < budget)) & causal
    last_block = torch.arange(n_new)[:, None] >= (n_new - 1) // bs * bs
    for pattern, want in (("a_shape", a_shape), ("tri_shape", a_shape | (last_block & causal))):
        mask = BlockMask.from_lines(static_lines(pattern, q, k, budget=budget, block_size=bs), method=method)
        dense = mask.to_dense()
        assert (dense >= want[None]).all(), pattern
        # block rounding adds at most a block's width around each line
        wider = ((key < 2 * bs) | (qpos - key < budget + 2 * bs)) & causal
        if pattern == "tri_shape":
            wider |= last_block & causal
        assert not (dense & ~wider[None]).any(), pattern


def test_minference_takes_the_columns_and_diagonals_the_last_queries_attend():
    from sglang_loopserve.attention.patterns import static_lines

    n_new, n_ctx, d = 200, 800, 32
    q, k, v = random_qkv(n_new, n_ctx, 2, 1, d=d, seed=4)
    q, k = q * 0.05, k * 0.05
    spike = torch.randn(d)
    k[500, 0] = spike  # every last query looks at key 500 ...
    q[-64:, :] += spike * 3
    lines = static_lines("minference", q, k, budget=32, block_size=32)
    chosen = lines.lines[:, 0, : int(lines.counts.max())]
    assert all(500 in chosen[h].tolist() for h in range(2))
    assert set(range(32)) <= set(chosen[0].tolist())  # sink columns
    assert {n_ctx + x for x in range(32)} <= set(chosen[0].tolist())  # local diagonals
    out, st = sparse_prefill_attention(q, k, v, pattern="minference", budget=32, block_size=32,
                                       return_stats=True)
    mask = BlockMask.from_lines(lines)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask, compute_dtype=torch.float64)
    assert (out.double() - ref).abs().max() < 2e-4 and st.density == pytest.approx(mask.density())
    assert st.kernel != "exact"  # a baseline computes its own cells, never the exact rectangle


def test_static_pattern_bad_input_is_named():
    q, k, v = random_qkv(64, 128, 2, 1)
    with pytest.raises(ValueError, match="pattern"):
        sparse_prefill_attention(q, k, v, pattern="bigbird")
    from sglang_loopserve.attention.patterns import static_lines

    with pytest.raises(ValueError, match="budget"):
        static_lines("a_shape", q, k, budget=0, block_size=32)
