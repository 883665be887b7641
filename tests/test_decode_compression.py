"""Progressive decode KV compression and the baselines, engine-agnostic."""

from __future__ import annotations

import itertools

import pytest
import torch

from sglang_loopserve.config import METHODS as SERVED_METHODS
from sglang_loopserve.config import PREFILL_PATTERNS
from sglang_loopserve.cache_policy import (METHODS, AdaKV, DecodeCompressor, FullAttention, KeySummaries, LoopServe,
                                           ScoreContext, SnapKV, StreamingLLM, attention_mass,
                                           batched_decode_attention, decode_attention,
                                           select_decode_kv, select_decode_kv_batched, select_decode_kv_pruned)

D = 64


def unit(g, *shape):
    x = torch.randn(*shape, D, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def planted(length=2000, heads=6, kv_heads=2, n_hot=40, seed=0):
    """Keys with a hot set per KV head; queries that attend to it (logit ~ 12 above the rest)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(length, kv_heads, D, generator=g) * 0.3
    v = torch.randn(length, kv_heads, D, generator=g)
    hot = torch.stack([torch.randperm(length - 200, generator=g)[:n_hot] + 100 for _ in range(kv_heads)])
    u = unit(g, kv_heads)
    for h in range(kv_heads):
        k[hot[h], h] += u[h] * 4
    return k, v, hot, u


def queries(u, n, heads, strength=24.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    kv = u.shape[0]
    q = torch.randn(n, heads, D, generator=g) * 0.3
    q += strength * u.repeat_interleave(heads // kv, 0)[None]
    return q


def full_ref(q, k, v):
    return decode_attention(q.double(), k.double(), v.double(), None, compute_dtype=torch.float64)


def test_budget_at_least_length_is_exact():
    k, v, _, u = planted(300)
    q = queries(u, 16, 6)
    idx = select_decode_kv(q, k, budget=300)
    assert torch.equal(idx, torch.arange(300).expand(2, -1))
    assert torch.equal(select_decode_kv(q, k, budget=5000), idx)
    out = decode_attention(q[-1], k, v, idx)
    assert (out.double() - full_ref(q[-1], k, v)).abs().max() < 2e-4
    comp = DecodeCompressor(budget=400, interval=4, window=4)
    comp.seed(None, 290)
    for step in range(10):
        length = 290 + step + 1
        out = comp.attend(q[step], k[:length], v[:length])
        assert (out.double() - full_ref(q[step], k[:length], v[:length])).abs().max() < 2e-4
    assert comp.reselections == 2


def test_planted_keys_recalled_sink_and_recent_kept():
    k, v, hot, u = planted(4000)
    q = queries(u, 16, 6)
    idx = select_decode_kv(q, k, budget=256, sink=4, recent=32)
    assert idx.shape == (2, 256)
    for h in range(2):
        kept = set(idx[h].tolist())
        assert sum(int(x) in kept for x in hot[h]) >= 0.9 * hot.shape[1]
        assert set(range(4)) <= kept and set(range(4000 - 32, 4000)) <= kept
        assert idx[h].tolist() == sorted(kept)  # ascending, no duplicates
    # The attention output over the selection is close to full attention.
    out = decode_attention(q[-1], k, v, idx)
    ref = full_ref(q[-1], k, v)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.05


def test_topic_shift_followed_by_reselection_not_by_snapkv():
    g = torch.Generator().manual_seed(3)
    k, v, hot_a, u_a = planted(3000, seed=3)
    hot_b = torch.stack([torch.randperm(2700, generator=g)[:40] + 150 for _ in range(2)])
    u_b = unit(g, 2)
    for h in range(2):
        k[hot_b[h], h] += u_b[h] * 4
    prompt_len = 2936
    prompt_q = queries(u_a, 32, 6, seed=4)  # the prompt's question looks at A
    gen = torch.cat([queries(u_a, 32, 6, seed=5), queries(u_b, 32, 6, seed=6)])  # then B
    comp = DecodeCompressor(budget=400, interval=16, window=16, sink=4, recent=32)
    comp.seed(None, prompt_len)
    for t in range(64):
        comp.attend(gen[t], k[: prompt_len + t + 1], v[: prompt_len + t + 1])
    loop = comp.indices(prompt_len + 64)
    snap = SnapKV(window=32).select(ScoreContext(k=k[: prompt_len + 64], prompt_len=prompt_len,
                                                 prompt_q=prompt_q), budget=400)

    def recall(idx, hot):
        return min(sum(int(x) in set(idx[h].tolist()) for x in hot[h]) / hot.shape[1] for h in range(2))

    # Re-selections at 16 and 32 agree (A), so the next one waits 32 tokens: at 64, on B.
    assert comp.reselections == 3
    assert recall(loop, hot_b) >= 0.9  # followed the shift
    assert comp.next_interval == 16  # the shift reset the interval
    assert recall(snap, hot_a) >= 0.9 and recall(snap, hot_b) < 0.3  # selected once, on A


def test_tokens_since_last_selection_are_attended_and_dropped_tokens_can_return():
    k, v, hot, u = planted(1000)
    comp = DecodeCompressor(budget=64, interval=8, window=8, sink=4, recent=8, first_interval=8)
    comp.seed(None, 900)
    q = queries(u, 40, 6)
    for t in range(8):
        comp.attend(q[t], k[: 901 + t], v[: 901 + t])
    first = comp.selection.clone()
    idx = comp.indices(912)
    assert set(range(908, 912)) <= set(idx[0].tolist())  # generated since the selection at 908
    # A selection is an index subset: the keys themselves are untouched, and a
    # position left out can be chosen again when the queries change.
    other = queries(unit(torch.Generator().manual_seed(9), 2), 8, 6, seed=9)
    for t in range(8, 16):
        comp.attend(other[t - 8], k[: 901 + t], v[: 901 + t])
    for t in range(16, 24):
        comp.attend(q[t], k[: 901 + t], v[: 901 + t])
    assert comp.reselections == 3
    assert set(first[0, 4:20].tolist()) <= set(comp.selection[0].tolist())


def test_seed_from_prefill_scores():
    scores = torch.zeros(2, 500)
    scores[:, 200:210] = 1.0
    comp = DecodeCompressor(budget=50, interval=16, window=16, sink=4, recent=32)
    comp.seed(scores, 500)
    assert comp.seeded_from == "prefill"
    assert set(range(200, 210)) <= set(comp.indices(500)[0].tolist())
    comp.seed(None, 500)
    assert comp.seeded_from == "full" and comp.indices(500) is None


def test_batched_equals_per_request():
    g = torch.Generator().manual_seed(7)
    lengths = [700, 64, 1500, 333]
    pool_k = torch.randn(4000, 2, D, generator=g)
    pool_v = torch.randn(4000, 2, D, generator=g)
    perm = torch.randperm(4000, generator=g)
    slots = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    start = 0
    for b, n in enumerate(lengths):
        slots[b, :n] = perm[start: start + n]
        start += n
    recent_q = torch.randn(len(lengths), 8, 6, D, generator=g)
    q = torch.randn(len(lengths), 6, D, generator=g)
    lens = torch.tensor(lengths)
    indptr, pos = select_decode_kv_batched(recent_q, pool_k, slots, lens, budget=100, sink=4, recent=16)
    out = batched_decode_attention(q, pool_k, pool_v, slots, indptr, pos)
    padded = batched_decode_attention(q, pool_k, pool_v, slots, indptr, pos, method="tensor")
    for b, n in enumerate(lengths):
        k, v = pool_k[slots[b, :n]], pool_v[slots[b, :n]]
        idx = select_decode_kv(recent_q[b], k, budget=100, sink=4, recent=16)
        rows = [pos[indptr[b * 2 + h]: indptr[b * 2 + h + 1]] for h in range(2)]
        assert all(torch.equal(rows[h], idx[h]) for h in range(2))
        assert (out[b] - decode_attention(q[b], k, v, idx)).abs().max() < 1e-5
        assert (padded[b] - decode_attention(q[b], k, v, idx)).abs().max() < 1e-5


@pytest.mark.parametrize("counts", [[1500, 1, 700, 1040, 1040, 1040], [1040] * 6])
@pytest.mark.parametrize("method", ["loops", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_over_selection_equals_tensor_path(dtype, method, counts):
    """The CPU kernels (numba: chunked, merged by softmax maxima; torch's fused kernel: padding
    masked) against the padded-tensor reference computed in float64: ragged rows (1 position, a
    chunked row of 1,500, an empty request aside) and rows of one width (no padding), two requests
    with their own slots, GQA groups of 3."""
    g = torch.Generator().manual_seed(3)
    n_kv, group = 3, 3
    pool_k = torch.randn(6000, n_kv, D, generator=g).to(dtype)
    pool_v = torch.randn(6000, n_kv, D, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(6000, generator=g)[:2000] for _ in range(2)]).int()
    indptr = torch.tensor([0] + list(itertools.accumulate(counts)))
    pos = torch.cat([torch.randperm(2000, generator=g)[:c].sort().values for c in counts])
    q = (torch.randn(2, n_kv * group, D, generator=g) * 3).to(dtype)
    ref = batched_decode_attention(q.double(), pool_k.double(), pool_v.double(), slots, indptr, pos, method="tensor")
    out = batched_decode_attention(q, pool_k, pool_v, slots, indptr, pos, method=method)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    assert (out.double() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype, path", [(torch.float32, "loops"), (torch.bfloat16, "fused")])
def test_attention_over_selection_auto_path_follows_the_dtype(dtype, path, monkeypatch):
    """``auto`` on a CPU: float32 K/V through the compiled loop, bf16 through torch's fused kernel
    (measured faster where a CPU serves bf16); either way the reference's numbers."""
    from sglang_loopserve.cache_policy import batched, cpu_loops

    g = torch.Generator().manual_seed(4)
    pool_k, pool_v = (torch.randn(300, 2, D, generator=g).to(dtype) for _ in range(2))
    slots = torch.arange(300)[None]
    indptr, pos = torch.tensor([0, 40, 80]), torch.arange(40).repeat(2)
    q = torch.randn(1, 6, D, generator=g).to(dtype)
    calls = []
    loops, fused = cpu_loops.sparse_decode, batched.attend
    monkeypatch.setattr(cpu_loops, "sparse_decode", lambda *a: calls.append("loops") or loops(*a))
    monkeypatch.setattr(batched, "attend", lambda *a, **kw: calls.append("fused") or fused(*a, **kw))
    out = batched_decode_attention(q, pool_k, pool_v, slots, indptr, pos)
    ref = batched_decode_attention(q.double(), pool_k.double(), pool_v.double(), slots, indptr, pos, method="tensor")
    assert calls == [path]
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_attention_over_selection_rejects_bad_method():
    q, kv = torch.zeros(1, 3, D), torch.zeros(10, 3, D)
    args = (q, kv, kv, torch.zeros(1, 10, dtype=torch.long), torch.tensor([0, 1, 2, 3]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="method"):
        batched_decode_attention(*args, method="fast")
    with pytest.raises(ValueError, match="'loops'"):
        batched_decode_attention(q.double(), kv.double(), kv.double(), *args[3:], method="loops")
    with pytest.raises(ValueError, match="'fused'"):
        batched_decode_attention(q.bfloat16(), kv, kv, *args[3:], method="fused")  # mixed dtypes


def test_adakv_shares_the_budget_across_heads():
    """Head 0 attends to 5 planted keys only, head 1 uniformly: under a shared budget head 0 keeps
    little beyond its planted keys, sink and recent, and head 1 takes the rest."""
    g = torch.Generator().manual_seed(5)
    n, budget = 400, 60
    k = torch.randn(n, 2, D, generator=g) * 0.01
    q = torch.zeros(40, 2, D)
    spike = unit(g, 1)[0]
    q[:, 0] = spike * 40
    k[[50, 120, 200, 260, 300], 0] = spike
    ctx = ScoreContext(k=k, prompt_len=n, prompt_q=q)
    sel = AdaKV(kernel=1).select(ctx, budget=budget, sink=4, recent=32)
    counts = (sel >= 0).sum(-1).tolist()
    assert sum(counts) == 2 * budget and counts[0] < budget < counts[1]
    for h, c in enumerate(counts):
        row = sel[h, :c].tolist()
        assert row == sorted(row) and (sel[h, c:] == -1).all()
        assert set(range(4)) <= set(row) and set(range(n - 32, n)) <= set(row)
    assert {50, 120, 200, 260, 300} <= set(sel[0, : counts[0]].tolist())
    comp = DecodeCompressor(budget=budget, interval=16, window=16, sink=4, recent=32)
    comp.fix(sel, n, source="adakv")
    flat, per_head = comp.attended(n + 3)
    assert per_head == [c + 3 for c in counts] and flat.numel() == sum(per_head)
    assert flat[per_head[0] - 3: per_head[0]].tolist() == [n, n + 1, n + 2]  # tokens since, per head
    assert not comp.record(torch.zeros(2, D)) and comp.seeded_from == "adakv"
    with pytest.raises(ValueError, match="ragged"):
        comp.indices(n)


def test_baselines_on_hand_made_case():
    g = torch.Generator().manual_seed(11)
    k = torch.randn(200, 1, D, generator=g) * 0.1
    spike = unit(g, 1)[0]
    k[50, 0] += spike * 3
    ctx = ScoreContext(k=k, prompt_len=180, recent_q=(spike * 30).expand(4, 2, D),
                       prompt_q=(spike * 30).expand(8, 2, D))
    stream = StreamingLLM().select(ctx, budget=40, sink=4, recent=8)
    assert stream[0].tolist() == list(range(4)) + list(range(164, 200))
    snap = SnapKV(window=8, kernel=5).select(ctx, budget=40, sink=4, recent=8)[0].tolist()
    assert {48, 49, 50, 51, 52} <= set(snap)  # the spike and its pooled neighbours
    assert set(range(172, 200)) <= set(snap)  # observation window + generated tokens
    loop = LoopServe().select(ctx, budget=13, sink=4, recent=8)[0].tolist()
    assert 50 in loop and len(loop) == 13
    assert FullAttention().select(ctx, budget=1)[0].tolist() == list(range(200))
    # every decode method the server takes has its scorer (the others are prefill patterns)
    assert set(METHODS) == set(SERVED_METHODS) - set(PREFILL_PATTERNS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0), "budget"), (dict(budget=10, sink=4, recent=32), "sink \\+ recent"),
    (dict(interval=0), "interval"), (dict(window=0), "window"),
    (dict(interval=16, max_interval=8), "max_interval"), (dict(pool_window=True), "pool_window"),
    (dict(pool_window="mean"), "pool_window"), (dict(query_blocks=-1), "query_blocks"),
    (dict(query_blocks=2.0), "query_blocks"), (dict(query_blocks=True), "query_blocks"),
])
def test_compressor_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecodeCompressor(**kwargs)


def test_bad_inputs():
    k = torch.randn(100, 2, D)
    with pytest.raises(ValueError, match="budget"):
        select_decode_kv(torch.randn(4, 6, D), k, budget=0)
    with pytest.raises(ValueError, match="sink \\+ recent"):
        select_decode_kv(torch.randn(4, 6, D), k, budget=20, sink=4, recent=32)
    with pytest.raises(ValueError, match="H % Hk"):
        select_decode_kv(torch.randn(4, 5, D), k, budget=50)
    with pytest.raises(ValueError, match="head dims"):
        select_decode_kv(torch.randn(4, 6, 32), k, budget=50)
    with pytest.raises(ValueError, match="recent_q must be"):
        select_decode_kv(torch.randn(6, D), k, budget=50)
    with pytest.raises(ValueError, match="idx must be"):
        decode_attention(torch.randn(6, D), k, k, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="H % Hk"):
        decode_attention(torch.randn(5, D), k, k, None)


def clustered(length=8000, kv_heads=2, n_passages=6, passage=24, seed=11):
    """Keys whose hot ones sit in a few passages (as the tokens of a document an answer quotes)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(length, kv_heads, D, generator=g) * 0.3
    u = unit(g, kv_heads)
    starts = torch.randperm(length // passage - 4, generator=g)[:n_passages] * passage + passage
    hot = torch.cat([torch.arange(s, s + passage) for s in starts.tolist()])
    for h in range(kv_heads):
        k[hot, h] += u[h] * 4
    return k, hot, u


def test_two_stage_selection_recalls_clustered_keys():
    """Candidates from key-block bounds, exact scores among them: the passages the window's
    queries attend to are kept, as by scoring every key, while 4 x budget keys are scored."""
    k, hot, u = clustered()
    q = queries(u, 16, 6)
    slots = torch.arange(k.shape[0])
    pruned = select_decode_kv_pruned(q, k, slots, KeySummaries(), budget=256, sink=4, recent=32)
    exact = select_decode_kv(q, k, budget=256, sink=4, recent=32)
    assert pruned.shape == exact.shape == (2, 256)
    mass = attention_mass(q, k)  # [Hk, L]: the window's mass on every key
    for h in range(2):
        kept = set(pruned[h].tolist())
        assert set(hot.tolist()) <= kept
        assert set(range(4)) <= kept and set(range(8000 - 32, 8000)) <= kept
        assert pruned[h].tolist() == sorted(kept)
        assert float(mass[h, pruned[h]].sum()) >= 0.99 * float(mass[h, exact[h]].sum())


def test_two_stage_is_every_key_where_pruning_would_not_pay():
    k, v, _, u = planted(1500)
    q = queries(u, 16, 6)
    slots = torch.randperm(4000)[:1500]  # keys live anywhere in a pool
    pool = torch.zeros(4000, 2, D)
    pool[slots] = k
    pruned = select_decode_kv_pruned(q, pool, slots, KeySummaries(), budget=400)  # 4 x 400 > 1500
    assert torch.equal(pruned, select_decode_kv(q, k, budget=400))


def test_summaries_grow_with_the_cache():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1000, 2, D, generator=g)
    grown = KeySummaries(block=16)
    for length in (37, 40, 333, 1000):  # partial blocks redone as keys arrive
        grown.update(k, torch.arange(length))
    whole = KeySummaries(block=16)
    whole.update(k, torch.arange(1000))
    assert torch.equal(grown.kmax, whole.kmax) and torch.equal(grown.kmin, whole.kmin)
    torch.testing.assert_close(grown.kmean, whole.kmean)
    assert torch.equal(whole.kmax[:, 0], k[:16].amax(0)) and torch.equal(whole.kmin[:, -1], k[992:].amin(0))
    torch.testing.assert_close(whole.kmean[:, 0], k[:16].mean(0))
    torch.testing.assert_close(whole.kmean[:, -1], k[992:].mean(0))  # a partial block: its 8 keys only
    partial = KeySummaries(block=16)
    partial.update(k, torch.arange(37))  # the last block holds 5 keys
    torch.testing.assert_close(partial.kmean[:, -1], k[32:37].mean(0))


def test_interval_doubles_while_selections_agree_and_resets_on_a_change():
    k, v, hot, u = planted(3000)
    comp = DecodeCompressor(budget=300, interval=8, window=8, max_interval=32, first_interval=8)
    comp.seed(None, 2900)
    q = queries(u, 200, 6)
    due = []
    for t in range(120):
        length = 2901 + t
        if comp.record(q[t]):
            comp.reselect(k[:length])
            due.append(t + 1)
    # 8 (first), 16 (agrees: next in 16), 32 (agrees: next in 32, the cap), 64, 96
    assert due == [8, 16, 32, 64, 96] and comp.next_interval == 32
    other = queries(unit(torch.Generator().manual_seed(21), 2), 40, 6, seed=21)
    after = []
    for t in range(32):
        if comp.record(other[t]):
            comp.reselect(k[:3021 + t])
            after.append((t + 1, comp.next_interval))
    # The queries moved: the re-selection due 32 tokens after the last one (at 128) resets the
    # interval to the base; then the new topic's selections agree and it grows again.
    assert after == [(8, 8), (16, 16), (32, 32)]


def test_first_interval_sets_only_the_first_reselection_of_a_turn():
    """``first_interval``: a turn seeded with everything re-selects after 3 tokens, then on the
    base interval; each new turn (``seed``) starts with the short one again; bad values refused."""
    k, v, hot, u = planted(3000)
    comp = DecodeCompressor(budget=300, interval=8, window=8, max_interval=8, first_interval=3)
    q = queries(u, 200, 6)
    for turn_start in (2900, 2950):
        comp.seed(None, turn_start)
        assert comp.indices(turn_start + 1) is None  # everything until the first re-selection
        due = []
        for t in range(20):
            if comp.record(q[t]):
                comp.reselect(k[:turn_start + 1 + t])
                due.append(t + 1)
        assert due == [3, 11, 19]
        assert comp.indices(turn_start + 21).shape[1] == 300 + 2  # the selection + 2 tokens since
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="first_interval"):
            DecodeCompressor(first_interval=bad)


def test_two_stage_keeps_only_real_positions():
    """A cache that ends inside a block: the candidates' padding past it is never kept."""
    k, hot, u = clustered(length=5001)
    q = queries(u, 16, 6)
    for budget in (100, 256, 1000):
        kept = select_decode_kv_pruned(q, k, torch.arange(5001), KeySummaries(), budget=budget, recent=40)
        assert kept.shape == (2, budget)
        for h in range(2):
            assert kept[h].unique().numel() == budget and int(kept[h].max()) < 5001
            assert set(range(5001 - 40, 5001)) <= set(kept[h].tolist())


def test_bf16_pool_scores_with_a_bf16_product():
    """A bf16 pool: the re-selection's product runs in bf16 (each logit rounded once), so its mass
    differs from fp32 scoring of the same keys by that rounding only, and it keeps the hot keys
    and almost the same positions."""
    from sglang_loopserve.cache_policy.decode import reselect_pruned

    k, hot, u = clustered(length=6000)
    pool = k.bfloat16()
    q = queries(u, 16, 6)
    slots = torch.arange(6000)
    half = reselect_pruned(q, pool, slots, KeySummaries(), budget=512, method="tensor")
    wide = reselect_pruned(q, pool.float(), slots, KeySummaries(), budget=512, method="tensor")
    shared = [len(set(half[0][h].tolist()) & set(wide[0][h].tolist())) / 512 for h in range(2)]
    assert min(shared) >= 0.99
    for h in range(2):
        assert set(hot.tolist()) <= set(half[0][h].tolist())
    both = (half[0][:, :, None] == wide[0][:, None, :])  # the mass of positions both keep
    m_half = half[1][both.any(2)]
    m_wide = wide[1][both.any(1)]
    torch.testing.assert_close(m_half, m_wide, rtol=0.05, atol=1e-4)
    assert not torch.equal(m_half, m_wide)  # the bf16 product did run


@pytest.mark.parametrize("dtype, window, length, budget, pooled_bounds", [
    (torch.float32, 1, 6000, 256, False), (torch.float32, 16, 3001, 100, False), (torch.bfloat16, 4, 5000, 300, False),
    (torch.float32, 16, 6000, 256, True), (torch.bfloat16, 8, 5000, 300, True),
])
def test_compiled_reselection_equals_tensor_path(dtype, window, length, budget, pooled_bounds):
    """The CPU's one-call re-selection (numba) keeps the positions the tensor ops keep, with
    their mass, the previous selection's share and the summaries, from keys in a pool; also
    with the blocks ranked by the window's mean query and the candidates scored by each
    (``decode_pooling`` ``bounds``).  The loops score a bf16 pool in fp32: the tensor ops do
    so over the pool widened (over the pool itself their product is bf16: the test below)."""
    from sglang_loopserve.cache_policy import cpu_loops
    from sglang_loopserve.cache_policy.decode import reselect_pruned

    assert cpu_loops.available()  # numba ships with SGLang: the CPU path must be there
    g = torch.Generator().manual_seed(length)
    pool = torch.randn(length + 500, 3, D, generator=g).to(dtype)
    slots = torch.randperm(length + 500, generator=g)[:length].to(torch.int32)
    q = torch.randn(window, 9, D, generator=g)
    previous = torch.randperm(length, generator=g)[:budget].sort().values.expand(3, -1).contiguous()
    bound_q = q.mean(0, keepdim=True) if pooled_bounds else None
    out = {}
    for method in ("tensor", "loops"):
        summaries = KeySummaries()
        keys = pool.float() if method == "tensor" else pool
        reselect_pruned(q, keys, slots[:length - 45], summaries, budget=budget, sink=4, recent=32,
                        method=method, bound_q=bound_q)  # then grown by 45 keys, as a decode does
        out[method] = reselect_pruned(q, keys, slots, summaries, budget=budget, sink=4, recent=32,
                                      previous=previous, method=method, bound_q=bound_q) + (summaries.rows,)
    (kept, mass, held, rows), (kept2, mass2, held2, rows2) = out["tensor"], out["loops"]
    d = rows.shape[-1] // 3  # max and min exactly, the mean to rounding (summed in another order)
    assert torch.equal(kept, kept2) and torch.equal(rows[..., :2 * d], rows2[..., :2 * d])
    torch.testing.assert_close(rows2[..., 2 * d:], rows[..., 2 * d:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass2, mass, rtol=1e-4, atol=1e-6)
    assert held2 == pytest.approx(held, rel=1e-5) and 0 < held < 1
    # Nothing held before: share 0 on both paths.
    for method in ("tensor", "loops"):
        assert reselect_pruned(q, pool, slots, KeySummaries(), budget=budget, previous=previous[:, :0],
                               method=method)[2] == 0.0


@pytest.mark.parametrize("pooling, recalled", [("bounds", True), ("none", True), ("all", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_window_query_keeps_what_it_attends_to(pooling, recalled, dtype):
    """Planted: each of 4 window queries attends to its own key (logit 8), and 4 decoys lie
    along their mean (logit 4 from every query).  Scored by each query, a re-selection of 4
    free slots keeps the 4 keys the window attends to; scored by the mean query (``all``) it
    prefers the decoys (logit 2 on a planted key, 4 on a decoy): why ``bounds`` is the default.
    The blocks are ranked by the mean query: among 12 x budget candidates (of 1600 keys), the
    decoys' blocks rank first and the planted ones still find room."""
    g = torch.Generator().manual_seed(7)
    length, budget = 1600, 4 + 8 + 4  # sink 4, recent 8, 4 free
    k = torch.randn(length, 1, D, generator=g) * 0.02
    basis = torch.linalg.qr(torch.randn(D, 4, generator=g))[0].T  # 4 orthonormal directions
    scale = 8.0 ** 0.5 * D ** 0.25  # logit q.k / sqrt(D) = 8 between a query and its key
    hot = [300, 620, 940, 1260]
    decoys = [450, 770, 1090, 1410]
    for i, pos in enumerate(hot):
        k[pos, 0] = scale * basis[i]
    for pos in decoys:
        k[pos, 0] = scale * basis.sum(0) / 2  # logit 4 from every query and from their mean
    window = (scale * basis)[:, None, :].expand(4, 3, D).clone()  # 4 queries, 3 query heads of one KV head
    comp = DecodeCompressor(budget=budget, interval=4, window=4, sink=4, recent=8, pool_window=pooling,
                            candidate_factor=12.0)
    comp._queries = list(window)
    comp.reselect_from(k.to(dtype), torch.arange(length))
    kept = set(comp.selection[0].tolist())
    assert (set(hot) <= kept) == recalled
    if not recalled:
        assert set(decoys) <= kept


def test_compiled_reselection_recalls_planted_keys():
    from sglang_loopserve.cache_policy import cpu_loops
    from sglang_loopserve.cache_policy.decode import reselect_pruned

    assert cpu_loops.available()  # numba ships with SGLang: the CPU path must be there
    k, hot, u = clustered(length=5001)
    q = queries(u, 16, 6)
    kept, _, _ = reselect_pruned(q, k, torch.arange(5001), KeySummaries(), budget=256, sink=4, recent=40,
                                 method="loops")
    for h in range(2):
        assert set(hot.tolist()) <= set(kept[h].tolist())
        assert set(range(4)) | set(range(5001 - 40, 5001)) <= set(kept[h].tolist())


def test_compiled_reselection_has_one_signature_per_pool_dtype():
    """SGLang's slot tables are int32 on some devices and int64 on others: either reads as int64,
    so a server never compiles a second variant in the middle of a decode (seconds)."""
    from sglang_loopserve.cache_policy import cpu_loops
    from sglang_loopserve.cache_policy.decode import reselect_pruned

    assert cpu_loops.available()  # numba ships with SGLang: the CPU path must be there
    k, hot, u = clustered(length=3001)
    q = queries(u, 2, 6)
    from sglang_loopserve.cpu_runtime import torch_threads

    stages = (cpu_loops._update_summaries, cpu_loops._block_logits, cpu_loops._candidate_blocks,
              cpu_loops._candidate_logits, cpu_loops._keep_top)

    def variants():  # the stages' compiled signatures, and the launchers for torch's team
        return [len(stage.signatures) for stage in stages], len(torch_threads._launchers)

    reselect_pruned(q, k, torch.arange(3001, dtype=torch.int32), KeySummaries(), budget=100, method="loops")
    compiled = variants()
    for dtype in (torch.int64, torch.int32):
        reselect_pruned(q, k, torch.arange(3001, dtype=dtype), KeySummaries(), budget=100,
                        previous=torch.arange(100, dtype=dtype).expand(2, -1), method="loops")
    assert variants() == compiled


@pytest.mark.parametrize("window, compiled", [(1, True), (8, False)])
def test_reselection_auto_path_follows_the_scoring_queries(window, compiled, monkeypatch):
    """``auto`` on a CPU: one scoring query (the window's mean) through the compiled call, a
    window of them through the tensor ops' matrix products; the same selection either way."""
    from sglang_loopserve.cache_policy import cpu_loops
    from sglang_loopserve.cache_policy.decode import reselect_pruned

    k, _, u = clustered(length=3001)
    q = queries(u, window, 6)
    calls = []
    real = cpu_loops.reselect
    monkeypatch.setattr(cpu_loops, "reselect", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kept, _, _ = reselect_pruned(q, k, torch.arange(3001), KeySummaries(), budget=128)
    assert bool(calls) == compiled
    other = "tensor" if compiled else "loops"
    assert torch.equal(kept, reselect_pruned(q, k, torch.arange(3001), KeySummaries(), budget=128, method=other)[0])


def test_reselection_method_is_validated():
    from sglang_loopserve.cache_policy.decode import reselect_pruned

    k = torch.randn(500, 2, D)
    q = torch.randn(2, 6, D)
    with pytest.raises(ValueError, match="method must be"):
        reselect_pruned(q, k, torch.arange(500), KeySummaries(), budget=64, method="fast")
    with pytest.raises(ValueError, match="method 'loops' needs"):
        reselect_pruned(q, k.half(), torch.arange(500), KeySummaries(), budget=64, method="loops")


def _reselected(length, query_blocks, budget=256, seed=0, pool_extra=37):
    """A compressor re-selected once over a shuffled bf16 pool of ``length`` keys."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(length + pool_extra, 3, D, generator=g).bfloat16()
    slots = torch.randperm(length + pool_extra, generator=g)[:length]
    comp = DecodeCompressor(budget=budget, interval=16, window=8, query_blocks=query_blocks)
    comp._queries = list(torch.randn(8, 9, D, generator=g).bfloat16())
    comp.reselect_from(pool, slots)
    return comp, pool, slots, torch.randn(9, D, generator=g).bfloat16()


@pytest.mark.parametrize("length, query_blocks", [(4096, 64), (3000, 96), (700, 64), (300, 200)])
def test_query_blocks_compiled_walk_equals_reference(length, query_blocks):
    """On a CPU ``attended`` walks the blocks in one compiled call; the tensor reference
    (``query_block_positions``) gives the same positions, every head as many, none selected twice,
    also where the selection leaves fewer free positions than asked (700 and 300 tokens)."""
    comp, pool, slots, q = _reselected(length, query_blocks)
    flat, counts = comp.attended(length + 3, q, pool, slots)
    ref = comp.query_block_positions(q)
    n_sel = comp.selection.shape[1]
    rows = flat.view(3, -1)
    assert counts == [rows.shape[1]] * 3
    span = length // comp.summaries.block * comp.summaries.block  # the blocks before the selection's length
    assert ref.shape[1] == min(query_blocks * comp.summaries.block,
                               span - int((comp.selection < span).sum(1).max()))
    assert torch.equal(rows[:, :n_sel], comp.selection)
    assert torch.equal(rows[:, n_sel:n_sel + ref.shape[1]], ref)
    assert rows[:, -3:].tolist() == [[length, length + 1, length + 2]] * 3
    for h in range(3):
        assert rows[h].unique().numel() == rows.shape[1]


def test_query_blocks_read_what_the_step_query_needs():
    """Planted: the selection (seeded, so the key summaries are built on the first step) leaves out
    a block whose keys the step's query matches far above every other block: that block is read
    with the step's query, and not without it."""
    g = torch.Generator().manual_seed(1)
    length, start = 4096, 2000
    k = torch.randn(length, 3, D, generator=g) * 0.1
    k[start:start + 8, 0] = 1.0
    scores = torch.rand(3, length, generator=g)
    scores[:, start - 64:start + 64] = 0.0
    comp = DecodeCompressor(budget=256, query_blocks=4)
    comp.seed(scores, length)
    q = torch.zeros(9, D)
    q[0:3] = 1.0  # KV head 0's query heads
    planted = set(range(start, start + 8))
    assert not planted & set(comp.selection[0].tolist())
    flat, counts = comp.attended(length + 2, q, k, torch.arange(length))
    assert counts == [256 + 32 + 2] * 3
    assert planted <= set(flat.view(3, -1)[0].tolist())
    flat, _ = comp.attended(length + 2)
    assert not planted & set(flat.view(3, -1)[0].tolist())


@pytest.mark.parametrize("compiled", [True, False])
def test_query_blocks_ranked_by_mass_not_by_bound(compiled, monkeypatch):
    """Planted: one block's keys each hold a single large coordinate (their elementwise max is large
    everywhere: Quest's bound ranks that block first, yet no key in it matches the query), another's
    keys all match the query moderately (the attention mass is there).  With one query block the
    step reads the matching block; ranked by the bound alone (``BOUND_WEIGHT`` 1) it reads the other."""
    from sglang_loopserve.cache_policy import cpu_loops, summaries

    if not compiled:
        monkeypatch.setattr(cpu_loops, "available", lambda: False)
    g = torch.Generator().manual_seed(2)
    length, spiky, matching = 4096, 1600, 2400
    k = torch.randn(length, 3, D, generator=g) * 0.01
    for i in range(8):
        k[spiky + i, :, i] = 1.0  # key i: large on its own coordinate only
    k[matching:matching + 8] = 0.1
    scores = torch.rand(3, length, generator=g)
    for start in (spiky, matching):
        scores[:, start - 64:start + 64] = 0.0
    q = torch.ones(9, D)
    reads, blend = {}, summaries.BOUND_WEIGHT
    assert 0.0 <= blend < 1.0
    for weight in (blend, 1.0):
        monkeypatch.setattr(summaries, "BOUND_WEIGHT", weight)
        comp = DecodeCompressor(budget=256, query_blocks=1)
        comp.seed(scores, length)
        flat, _ = comp.attended(length + 1, q, k, torch.arange(length))
        reads[weight] = set(flat.view(3, -1)[0].tolist())
    assert set(range(matching, matching + 8)) <= reads[blend]
    assert not set(range(spiky, spiky + 8)) & reads[blend]
    assert set(range(spiky, spiky + 8)) <= reads[1.0]  # Quest's rule: the spiky block


def test_attend_reads_the_query_blocks():
    """``DecodeCompressor.attend`` (the engine-agnostic step) equals attention over the positions
    ``attended`` lists, and with query blocks it differs from the selection alone."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2000, 3, D, generator=g), torch.randn(2000, 3, D, generator=g)
    outs = {}
    for blocks in (0, 16):
        comp = DecodeCompressor(budget=128, interval=4, window=4, first_interval=4, query_blocks=blocks)
        comp.seed(None, 1990)
        for t in range(6):  # the first re-selection after 4 steps, then two steps over it
            q = torch.randn(9, D, generator=torch.Generator().manual_seed(t))
            length = 1991 + t
            if comp.selection is not None:
                flat, counts = comp.attended(length, q, k, torch.arange(length))
                ref = decode_attention(q, k[:length], v[:length], flat.view(3, -1))
                assert len(set(counts)) == 1
            out = comp.attend(q, k[:length], v[:length])
            if comp.selection is not None and t >= 4:
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        outs[blocks] = out
    assert not torch.allclose(outs[0], outs[16])


def test_query_blocks_pyramid_over_depth():
    """``layer_query_blocks``: the first layer reads ``1 + slope`` times the blocks, the last
    ``1 - slope`` times, linearly between, the mean kept; slope 0 is every layer alike."""
    from sglang_loopserve.cache_policy.decode import layer_query_blocks

    per_layer = [layer_query_blocks(144, layer, 30, 0.5) for layer in range(30)]
    assert (per_layer[0], per_layer[-1]) == (216, 72)
    assert all(a >= b for a, b in zip(per_layer, per_layer[1:]))
    assert abs(sum(per_layer) / 30 - 144) <= 0.5
    assert {layer_query_blocks(144, layer, 30, 0.0) for layer in range(30)} == {144}
    assert layer_query_blocks(144, 0, 1, 0.5) == 144  # one layer: the middle of the slope
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="decode_pyramid"):
            layer_query_blocks(144, 0, 30, bad)
    with pytest.raises(ValueError, match="layer"):
        layer_query_blocks(144, 30, 30, 0.5)
