"""The planner without ``[H, n_qblocks, n_ctx]`` tensors against a dense one.

``planner_oracle.py`` is the dense planner, the oracle.  The served one
(per-segment line lists, spans of segments, CSR) must choose the
same lines and build the same ``BlockMask``, with both implementations of the
greedy and of the index (numba loops on the CPU, batched tensor ops
elsewhere).  Inputs: random (diffuse attention: thousands of lines) and
planted (vertical and slash structure, a question at the start).
"""

from __future__ import annotations

import pytest
import torch

from planner_oracle import oracle_block_mask, oracle_select
from sglang_loopserve.attention import (BlockMask, build_block_mask, sample_attention, sample_query_rows,
                                        select_vertical_slash)
from sglang_loopserve.attention.estimate import AttentionSample
from sglang_loopserve.attention.exact import exact_prefill_attention
from sglang_loopserve.attention.kernels.reference import causal_attention
from sglang_loopserve.attention.synthetic import planted_qkv

CASES = [  # n_new, n_ctx, H, Hk, block, alpha, q_window
    (100, 300, 4, 2, 32, 0.6, 16),  # nothing a multiple of the block
    (64, 64, 2, 1, 16, 0.9, 16),  # a first prefill, exact blocks
    (130, 130, 3, 3, 64, 0.5, 16),
    (257, 1000, 9, 3, 64, 0.6, 16),  # SmolLM2's head layout
    (300, 1000, 4, 2, 32, 0.9, 16),
    (700, 1500, 4, 2, 64, 0.95, 64),  # more segments than query blocks per span
    (37, 500, 2, 1, 16, 0.99, 16),
]
METHODS = ["loops", "tensor"]
CSR = ("block_indptr", "block_indices", "col_indptr", "col_indices")


def random_sample(n_new, n_ctx, heads, kv_heads, q_window, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_new, heads, 32, generator=g)
    k = torch.randn(n_ctx, kv_heads, 32, generator=g)
    return sample_attention(q, k, sample_query_rows(n_new, q_window))


def assert_same_plan(sample, n_new, *, alpha, block_size, method, sink=4, local=None):
    local = block_size if local is None else local
    old = oracle_select(sample, n_new, alpha=alpha, block_size=block_size, sink=sink, local=local)
    old_mask = oracle_block_mask(old)
    new = select_vertical_slash(sample, n_new, alpha=alpha, block_size=block_size, sink=sink, local=local,
                                method=method)
    columns, diagonals = new.per_query_block()
    assert torch.equal(columns, old.columns) and torch.equal(diagonals, old.diagonals)
    mask = BlockMask.from_lines(new, method=method)
    for name in CSR:
        assert torch.equal(getattr(mask, name).long(), getattr(old_mask, name).long()), name
    return new, mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_new, n_ctx, H, Hk, bs, alpha, q_window", CASES)
def test_same_lines_and_mask_as_the_dense_planner_random(method, n_new, n_ctx, H, Hk, bs, alpha, q_window):
    sample = random_sample(n_new, n_ctx, H, Hk, q_window, seed=n_ctx + n_new)
    assert_same_plan(sample, n_new, alpha=alpha, block_size=bs, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("question_rows", [0, 64])
def test_same_lines_and_mask_as_the_dense_planner_planted(method, question_rows):
    p = planted_qkv(512, 2048, question_rows=question_rows)
    sample = sample_attention(p.q, p.k, sample_query_rows(512, 64))
    lines, mask = assert_same_plan(sample, 512, alpha=0.95, block_size=64, method=method)
    assert 0 < mask.density() < 0.5
    # The question's keys are the first segment's (its rows look only at them).
    if question_rows:
        first_segment_columns = set(lines.columns()[0, 0].tolist())
        assert set(p.question_keys.tolist()) <= first_segment_columns


def test_loops_and_tensor_agree_on_a_real_shape():
    """SmolLM2-like heads over 6K tokens, planted: the two implementations pick the same lines."""
    p = planted_qkv(2000, 6000, 9, 3, 64, diagonals=(0, 1, 2, 500, 1500), n_columns=16, strength=12.0)
    sample = sample_attention(p.q, p.k, sample_query_rows(2000, 64))
    plans = [select_vertical_slash(sample, 2000, alpha=0.95, block_size=64, method=m) for m in METHODS]
    assert torch.equal(plans[0].bitmaps()[0], plans[1].bitmaps()[0])
    assert torch.equal(plans[0].bitmaps()[1], plans[1].bitmaps()[1])
    masks = [BlockMask.from_lines(plan, method=m) for plan, m in zip(plans, METHODS)]
    for name in CSR:
        assert torch.equal(getattr(masks[0], name).long(), getattr(masks[1], name).long())


@pytest.mark.parametrize("method", METHODS)
def test_equal_masses_take_the_lower_line_first(method):
    """One sampled row: column ``j`` and diagonal ``pos - j`` cover the same cell, so their masses
    tie everywhere; the documented order takes the column (the lower line id)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 1, 77, generator=g) * 3, dim=-1)
    sample = AttentionSample(rows=torch.tensor([0]), positions=torch.tensor([76]), probs=probs)
    lines = select_vertical_slash(sample, 1, alpha=0.9, block_size=16, sink=0, local=0, method=method)
    n_cols, n_diags = lines.segment_counts[0, 0].tolist()
    assert n_diags == 0 and n_cols > 0  # every tie resolved to the column
    order = lines.lines[0, 0, :n_cols]
    assert torch.all(probs[0, 0, order][:-1] >= probs[0, 0, order][1:])  # decreasing mass


@pytest.mark.parametrize("method", METHODS)
def test_near_equal_masses_in_order(method):
    """Near-uniform rows put hundreds of lines in one mass bucket: still the lines of largest
    mass, ties lower line first (the tensor ops take them in that order; the loops take a bucket
    the greedy cannot stop in as a whole, so there the set is compared)."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(1, 1, 1500, generator=g) * 0.05, dim=-1)
    sample = AttentionSample(rows=torch.tensor([0]), positions=torch.tensor([1499]), probs=probs)
    lines = select_vertical_slash(sample, 1, alpha=0.7, block_size=16, sink=0, local=0, method=method)
    count = int(lines.counts[0, 0])
    assert count >= 1000
    # One row: column j ties with diagonal 1499 - j (the same cell); the column comes first.
    by_mass = probs[0, 0].sort(descending=True, stable=True).indices
    expected = torch.stack([by_mass, 1500 + 1499 - by_mass], dim=1).flatten()[:count]
    taken = lines.lines[0, 0, :count].long()
    if method == "tensor":
        assert torch.equal(taken, expected)
    assert torch.equal(taken.sort().values, expected.sort().values)
    flat = torch.full((1, 1, 400), 1 / 400)  # exact ties everywhere: the lowest columns, ascending
    sample = AttentionSample(rows=torch.tensor([0]), positions=torch.tensor([399]), probs=flat)
    lines = select_vertical_slash(sample, 1, alpha=0.5, block_size=16, sink=0, local=0, method=method)
    assert lines.lines[0, 0, :int(lines.counts[0, 0])].tolist() == list(range(200))


@pytest.mark.parametrize("method", METHODS)
def test_union_coverage_counts_shared_cells_once(method):
    """One row; a column and a diagonal through the same heavy cell: one line suffices."""
    probs = torch.zeros(1, 1, 64)
    probs[0, 0, 10] = 0.96  # cell (query at 63, key 10): column 10 and diagonal 53
    probs[0, 0, 20] = 0.04
    sample = AttentionSample(rows=torch.tensor([63]), positions=torch.tensor([63]), probs=probs)
    lines = select_vertical_slash(sample, 64, alpha=0.95, block_size=16, sink=0, local=0, method=method)
    assert int(lines.counts.sum()) == 1
    # At 0.99, key 20 is needed too.  A greedy that counted the shared cell
    # twice would stop after column 10 + diagonal 53 ("1.92") and miss key 20.
    lines = select_vertical_slash(sample, 64, alpha=0.99, block_size=16, sink=0, local=0, method=method)
    cols, diags = lines.bitmaps()
    chosen = set(cols[0, 0].nonzero().flatten().tolist()) | {63 - d for d in diags[0, 0].nonzero().flatten().tolist()}
    assert chosen == {10, 20}


def test_key_lists_and_computed_pairs_from_the_csr():
    for n_new, n_ctx, bs, alpha in [(100, 300, 32, 0.6), (1, 77, 16, 0.9), (300, 1000, 32, 0.9)]:
        p = planted_qkv(n_new, n_ctx, head_dim=32, seed=n_new)
        mask, _ = build_block_mask(p.q, p.k, alpha=alpha, q_window=16, block_size=bs)
        keys = mask.pair_keys_dense()  # the dense view, for the comparison only
        indptr, flat = mask.key_lists()
        assert torch.equal(indptr[1:] - indptr[:-1], keys.sum(-1))
        assert torch.equal(flat, keys.nonzero()[:, 1])
        assert torch.equal(mask.computed_pairs(), mask.to_dense().sum((1, 2)))


@pytest.mark.parametrize("n_new", [1, 31, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_rectangle_equals_the_reference(n_new, dtype):
    """New rows over a cached prefix: only the rectangle, exactly (forwards shorter than a block too)."""
    g = torch.Generator().manual_seed(n_new)
    n_ctx = 900 + n_new
    q = torch.randn(n_new, 9, 64, generator=g)
    k = torch.randn(n_ctx, 3, 64, generator=g)
    v = torch.randn(n_ctx, 3, 64, generator=g)
    ref = causal_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    out = exact_prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() < tol


def test_exact_rectangle_without_a_prefix_is_causal_attention():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(200, 4, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    ref = causal_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    assert (exact_prefill_attention(q, k, v).double() - ref).abs().max() < 2e-4
