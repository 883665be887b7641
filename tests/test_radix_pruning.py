"""Importance-aware pruning on SGLang's radix tree (``--radix-eviction-policy loopserve``).

The scoring (``cache_policy.prune``) on planted inputs; the tree (``srt/radix_cache.py``)
on SGLang's own unified radix cache with its Python core and a real allocator: what is
pruned, what never is (shared prefixes, locked nodes, other namespaces, sink and recent
tokens), the pool's accounting through splits and evictions, and the padding slot never
freed; the backend's masking of pruned positions against attention with those keys removed.
"""

from __future__ import annotations

import types

import pytest
import torch

from sglang_loopserve.cache_policy.prune import TokenImportance, leaf_priority, prune_plan
from sglang_loopserve.srt.radix import IMPORTANCE, PADDING_SLOT, TOMBSTONES, LoopServeEvictionStrategy


# ------------------------------------------------------------------ scoring
def test_prune_plan_takes_the_least_important_live_tokens_outside_the_protected_spans():
    imp = torch.tensor([0.0, 0.9, 0.1, 0.5, 0.05, 0.7, 0.2, 0.01, 0.3, 0.0])
    live = torch.ones(10, dtype=torch.bool)
    live[4] = False  # already pruned
    # Node at positions 10..19 of a branch ending at 22: recent 4 protects 18..21 (local 8, 9).
    plan = prune_plan(imp, live, start=10, branch_end=22, sink=4, recent=4, keep_ratio=0.5)
    # 10 tokens, 9 live -> leave ceil(0.5 * 10) = 5 live, prune 4 among local 0..7: 0, 7, 2, 6.
    assert plan.tolist() == [0, 2, 6, 7]
    # The sink: positions below `sink` are never pruned (node starting at 0).
    plan = prune_plan(imp, live, start=0, branch_end=100, sink=4, recent=0, keep_ratio=0.0)
    assert plan.min() >= 4 and 4 not in plan.tolist()
    assert prune_plan(imp, live, start=10, branch_end=22, sink=4, recent=4, keep_ratio=0.5,
                      max_tokens=2).tolist() == [0, 7]
    assert prune_plan(imp, live, start=10, branch_end=22, sink=4, recent=4, keep_ratio=1.0).numel() == 0


def test_prune_plan_rejects_bad_arguments():
    imp, live = torch.zeros(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep_ratio"):
        prune_plan(imp, live, start=0, branch_end=4, sink=0, recent=0, keep_ratio=1.5)
    with pytest.raises(ValueError, match="live"):
        prune_plan(imp, live[:3], start=0, branch_end=4, sink=0, recent=0, keep_ratio=0.5)
    with pytest.raises(ValueError, match="sink"):
        prune_plan(imp, live, start=0, branch_end=4, sink=-1, recent=0, keep_ratio=0.5)


def test_token_importance_is_the_max_share_over_heads_and_observations():
    imp = TokenImportance()
    # Head 0 spreads its mass, head 1 puts half on position 2: the max share wins.
    imp.observe_columns(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 2.0, 1.5]]))
    assert torch.allclose(imp.upto(4), torch.tensor([0.25, 0.25, 0.5, 0.375]))
    # A decode selection over longer history: positions 1 and 5 of head 0 (mass 3:1), padding -1.
    imp.observe_selection(torch.tensor([[1, 5, -1]]), torch.tensor([[3.0, 1.0, 9.0]]))
    assert torch.allclose(imp.upto(7), torch.tensor([0.25, 0.75, 0.5, 0.375, 0.0, 0.25, 0.0]))
    with pytest.raises(ValueError, match="mass"):
        imp.observe_columns(torch.zeros(4))
    with pytest.raises(ValueError, match="positions"):
        imp.observe_selection(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3))


def test_leaf_priority_orders_private_before_shared_then_least_recent():
    private_old = leaf_priority(shared=0, importance=0.9, last_access=1, recompute_tokens=100)
    private_new = leaf_priority(shared=0, importance=0.1, last_access=5, recompute_tokens=10)
    shared_old = leaf_priority(shared=2, importance=0.0, last_access=0, recompute_tokens=1)
    assert sorted([shared_old, private_new, private_old]) == [private_old, private_new, shared_old]


def test_protected_spans_follow_the_namespace_settings():
    from sglang_loopserve.config import LoopServeConfig
    from sglang_loopserve.srt.plugin import cache_namespace
    from sglang_loopserve.srt.radix import in_loopserve_namespace, protected_spans

    ns = cache_namespace(LoopServeConfig(sink=16, recent=8))
    assert in_loopserve_namespace(f"lora|{ns}") and not in_loopserve_namespace(None)
    assert protected_spans(ns, 4, 32) == (16, 32)  # the larger of the policy's and the request's
    assert protected_spans(None, 4, 32) == (4, 32)


def test_policy_config_is_validated_naming_the_key():
    for bad, key in (({"keep_ratio": 2}, "keep_ratio"), ({"prune": "yes"}, "prune"),
                     ({"max_step": 0}, "max_step"), ({"recent": -1}, "recent")):
        with pytest.raises(ValueError, match=key):
            LoopServeEvictionStrategy(**bad)


# ------------------------------------------------------------------ the tree
NS = "loopserve(test)"
POOL = 96


@pytest.fixture
def tree():
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    from sglang_loopserve.srt.radix import register_policy
    from sglang_loopserve.srt.radix_cache import LoopServeFullComponent, LoopServeRadixCache

    register_policy()
    alloc = TokenToKVPoolAllocator(POOL, torch.float32, "cpu", None, False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=ReqToTokenPool(4, 256, "cpu", False), token_to_kv_pool_allocator=alloc,
        page_size=1, eviction_policy="loopserve", eviction_policy_config={"sink": 2, "recent": 4},
        tree_components=(ComponentType.FULL,), component_registry_override={ComponentType.FULL: LoopServeFullComponent},
        tree_core_backend="python")
    cache = LoopServeRadixCache(params)
    return types.SimpleNamespace(cache=cache, alloc=alloc, full=ComponentType.FULL)


def _insert(t, tokens, ns=NS, importance=None):
    """Insert a sequence (allocating slots for its uncached tail), return its last node."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(list(tokens), ns)
    m = t.cache.match_prefix(MatchPrefixParams(key=key))
    prefix = t.cache.path_device_indices(m.last_device_node) if m.device_prefix_len else torch.zeros(0, dtype=torch.int64)
    fresh = t.alloc.alloc(len(tokens) - m.device_prefix_len)
    value = torch.cat([prefix.to(torch.int64), fresh.to(torch.int64)])
    res = t.cache.insert(InsertParams(key=key, value=value, prev_prefix_len=m.device_prefix_len))
    node = t.cache.tree_core.node_by_id(res.last_device_node)
    if importance is not None:  # what LoopServeRadixCache.checkpoint_into_tree stores, per node
        cur, end = node, len(tokens)
        while cur is not t.cache.tree_core.root_node:
            start = end - len(cur.key)
            cur.component_data[t.full].metadata[IMPORTANCE] = importance[start:end].clone()
            end, cur = start, cur.parent
    return node


def _accounting(t):
    """Pool conservation and the tree's own invariants (what SGLang checks at idle)."""
    t.cache.sanity_check()
    free = t.alloc.free_pages
    assert free.unique().numel() == free.numel(), "a slot was freed twice"
    assert PADDING_SLOT not in free.tolist(), "the padding slot was freed"
    assert t.alloc.available_size() + t.cache.evictable_size() + t.cache.protected_size() == POOL


def _in_tree(t, node) -> bool:
    return node.id in t.cache.tree_core._node_arena


def _value(t, node):
    return node.component_data[t.full].value


def test_pressure_prunes_private_branches_before_any_eviction_and_never_the_shared_prefix(tree):
    t = tree
    doc = list(range(1000, 1040))  # 40 shared tokens
    gen = torch.Generator().manual_seed(0)
    a = _insert(t, doc + list(range(1, 25)), importance=torch.rand(64, generator=gen))
    b = _insert(t, doc + list(range(101, 125)), importance=torch.rand(64, generator=gen))
    shared = a.parent
    assert shared is b.parent and len(shared.children) == 2 and len(shared.key) == 40
    doc_slots = _value(t, shared).clone()
    before = t.alloc.available_size()
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    t.cache.evict(EvictParams(num_tokens=12))
    _accounting(t)
    assert t.alloc.available_size() >= before + 12
    pruned = [int((_value(t, n) == PADDING_SLOT).sum()) for n in (a, b)]
    assert sum(pruned) >= 12  # pruned, nothing evicted
    assert _in_tree(t, a) and _in_tree(t, b)
    assert torch.equal(_value(t, shared), doc_slots)  # the shared document is untouched
    for n in (a, b):  # the branch's last `recent` (4) tokens kept, lowest importance pruned
        v, imp = _value(t, n), n.component_data[t.full].metadata[IMPORTANCE]
        assert (v[-4:] != PADDING_SLOT).all()
        dead = v == PADDING_SLOT
        if dead.any():
            assert imp[dead].max() <= imp[~dead][:-4].min()
        assert n.component_data[t.full].metadata.get(TOMBSTONES, 0) == int(dead.sum())
    # Far more pressure: pruning stops at keep_ratio, whole leaves go, the document stays exact.
    t.cache.evict(EvictParams(num_tokens=30))
    _accounting(t)
    assert _in_tree(t, shared) and torch.equal(_value(t, shared), doc_slots)
    assert t.alloc.available_size() >= before + 42


def test_a_split_keeps_tombstones_and_importance_aligned_and_everything_frees_once(tree):
    t = tree
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    imp = torch.linspace(1.0, 0.0, 48)  # later tokens less important: they go first
    leaf = _insert(t, range(1, 49), importance=imp)
    t.cache.evict(EvictParams(num_tokens=10))
    _accounting(t)
    dead_before = (_value(t, leaf) == PADDING_SLOT).nonzero().flatten().tolist()
    assert len(dead_before) == 10 and max(dead_before) < 44  # recent 4 protected
    # A new branch from position 20 splits the pruned node.
    _insert(t, list(range(1, 21)) + [777] * 8)
    top = t.cache.tree_core.root_node.children[next(iter(t.cache.tree_core.root_node.children))]
    assert len(top.key) == 20 and len(top.children) == 2
    joined = torch.cat([_value(t, top), _value(t, leaf)])
    assert (joined == PADDING_SLOT).nonzero().flatten().tolist() == dead_before
    for n in (top, leaf):
        assert n.component_data[t.full].metadata.get(TOMBSTONES, 0) == int((_value(t, n) == PADDING_SLOT).sum())
    assert torch.equal(torch.cat([top.component_data[t.full].metadata[IMPORTANCE],
                                  leaf.component_data[t.full].metadata[IMPORTANCE]]), imp)
    _accounting(t)
    t.cache.evict(EvictParams(num_tokens=POOL))  # everything goes
    _accounting(t)
    assert t.alloc.available_size() == POOL


def test_locked_nodes_other_namespaces_and_unscored_nodes_are_not_pruned(tree):
    t = tree
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    locked = _insert(t, range(1, 31), importance=torch.rand(30))
    stock = _insert(t, range(201, 231), ns=None, importance=torch.rand(30))
    unscored = _insert(t, range(301, 331))
    receipt = t.cache.lock(locked.id)
    t.cache.evict(EvictParams(num_tokens=5))
    _accounting(t)
    assert (_value(t, locked) != PADDING_SLOT).all()
    # Nothing could be pruned: a whole unlocked leaf went instead (stock or unscored).
    assert not (_in_tree(t, stock) and _in_tree(t, unscored))
    for n in (stock, unscored):
        if _in_tree(t, n):
            assert (_value(t, n) != PADDING_SLOT).all()
    t.cache.unlock(receipt)
    _accounting(t)


def test_a_node_a_session_references_is_pruned_not_evicted_whole(tree):
    """SGLang's session radix cache marks a session's nodes to be evicted last; it locks nothing, and
    pruning keeps the session's history cached."""
    t = tree
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    node = _insert(t, range(1, 31), importance=torch.rand(30))
    node.component_data[t.full].session_ref = 1
    t.cache.evict(EvictParams(num_tokens=5))
    assert _in_tree(t, node)
    assert int((_value(t, node) == PADDING_SLOT).sum()) == 5
    node.component_data[t.full].session_ref = 0
    _accounting(t)


def test_an_allocation_prunes_no_more_than_its_shortfall(tree):
    """SGLang's allocation walk runs "to target" with a quota of everything evictable; pruning is
    irreversible, so it frees only what the allocation is short of."""
    t = tree
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    _insert(t, range(1, 81), importance=torch.rand(80))  # 80 of 96 slots used, 16 free
    t.cache.evict_for_alloc(EvictParams(num_tokens=3))
    _accounting(t)
    assert t.cache.loopserve_need is None  # reset after the walk
    leaf = next(iter(t.cache.tree_core.root_node.children.values()))
    assert int((_value(t, leaf) == PADDING_SLOT).sum()) == 3


def test_a_running_request_learns_of_tombstones_its_row_took():
    from sglang_loopserve.config import LoopServeConfig
    from sglang_loopserve.srt.request_state import RequestStore

    store = RequestStore()
    store.set_pruned("gone", torch.tensor([3]))  # no state: nothing to do
    state = store.new_turn("r", LoopServeConfig())
    store.set_pruned("r", torch.tensor([7, 5]))
    assert state.pruned.tolist() == [5, 7]
    store.set_pruned("r", torch.tensor([5, 9]))
    assert state.pruned.tolist() == [5, 7, 9]


def test_prune_off_evicts_whole_leaves_only(tree):
    t = tree
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    t.cache.tree_core.eviction_strategy.prune = False
    leaf = _insert(t, range(1, 41), importance=torch.rand(40))
    t.cache.evict(EvictParams(num_tokens=5))
    _accounting(t)
    assert not _in_tree(t, leaf) and t.alloc.available_size() == POOL  # the whole leaf, no tombstone


# ------------------------------------------------------------------ the backend
def test_backend_masks_pruned_positions_exactly_like_removing_their_keys(monkeypatch):
    """Extend and decode over a prefix whose pruned positions point at the padding slot equal
    attention over the same prefix with those keys removed (their slot holds garbage)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_loopserve.srt import radix
    from sglang_loopserve.srt.backend import LoopServeAttnBackend
    from sglang_loopserve.config import LoopServeConfig
    from sglang_loopserve.srt.request_state import store
    from sglang_loopserve.testing import (KVPool, Request, attention_layer, decode_batch, extend_batch,
                                          model_runner)

    H, HK, D = 4, 2, 16
    # What the scheduler sets under --radix-eviction-policy loopserve.
    monkeypatch.setattr(radix.stats, "policy", "loopserve")
    cfg = LoopServeConfig(alpha=0.9, q_window=16, block_size=16, min_prefill_len=64, decode_budget=48,
                          decode_interval=4, decode_window=4, sink=2, recent=4, decode_min_len=0,
                          calibration="off")
    gen = torch.Generator().manual_seed(3)
    pool = KVPool(1024, HK, D)
    pool.k.normal_(generator=gen)
    pool.v.normal_(generator=gen)
    pool.k[PADDING_SLOT] = 50.0  # garbage a reader of the padding slot would notice
    pool.v[PADDING_SLOT] = 50.0
    r2t = torch.zeros(2, 512, dtype=torch.int32)
    runner = model_runner(pool, r2t, H)
    backend = LoopServeAttnBackend(runner, TorchNativeAttnBackend(runner), cfg)
    layer = attention_layer(H, HK, D, attn_type=AttentionType.DECODER)
    req = Request("pruned", cfg)  # noqa: F841 - registers the request's options
    prefix, n_new = 200, 40
    r2t[0, :prefix + n_new] = torch.arange(1, prefix + n_new + 1)
    dead = torch.tensor([5, 6, 40, 41, 42, 99, 150, 151])
    r2t[0, dead] = PADDING_SLOT
    keep = torch.ones(prefix + n_new, dtype=torch.bool)
    keep[dead] = False
    q = torch.randn(n_new, H * D, generator=gen)
    k = torch.randn(n_new, HK * D, generator=gen)
    v = torch.randn(n_new, HK * D, generator=gen)
    out_loc = torch.arange(prefix + 1, prefix + n_new + 1)
    fb = extend_batch(["pruned"], [0], [prefix], [n_new], out_loc, mode=ForwardMode.EXTEND)
    backend.init_forward_metadata(fb)
    o = backend.forward(q, k, v, layer, fb).view(n_new, H, D)

    def reference(qs, length):
        slots = r2t[0, :length].long()[keep[:length]]
        ks, vs = pool.k[slots].repeat_interleave(H // HK, 1), pool.v[slots].repeat_interleave(H // HK, 1)
        n_q = qs.shape[0]
        pos = torch.arange(length)[keep[:length]]
        allowed = pos[None, :] <= torch.arange(length - n_q, length)[:, None]
        logits = torch.einsum("qhd,khd->hqk", qs, ks) / D**0.5
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        return torch.einsum("hqk,khd->qhd", logits.softmax(-1), vs)

    torch.testing.assert_close(o, reference(q.view(n_new, H, D), prefix + n_new), atol=2e-5, rtol=1e-4)
    assert req.loopserve_stats.pruned_cached_tokens == dead.numel()
    # Decode steps: the first reads every live position, later ones a selection; each equals
    # attention over exactly what it reads, and that never includes a pruned position.
    from sglang_loopserve.srt.backend import without_positions

    length, g = prefix + n_new, H // HK
    for step in range(8):
        length += 1
        r2t[0, length - 1] = length
        comp = store.get("pruned").compressor(0)
        qd = torch.randn(1, H * D, generator=gen)
        kd = torch.randn(1, HK * D, generator=gen)
        vd = torch.randn(1, HK * D, generator=gen)
        # What the backend reads: the selection, this query's key blocks, the tokens since.
        read = comp.attended(length, qd.view(H, D), pool.k, r2t[0]) if comp.selection is not None else None
        flat, counts = without_positions(read, dead, length, HK)
        reads = flat.split(counts)
        assert not any(torch.isin(r, dead).any() for r in reads)
        fbd = decode_batch(["pruned"], [0], [length], torch.tensor([length]), mode=ForwardMode.DECODE)
        backend.init_forward_metadata(fbd)
        od = backend.forward(qd, kd, vd, layer, fbd).view(H, D)
        for h, positions in enumerate(reads):
            slots = r2t[0, positions].long()
            ks, vs = pool.k[slots, h], pool.v[slots, h]
            qh = qd.view(H, D)[h * g:(h + 1) * g]
            want = ((qh @ ks.T) / D**0.5).softmax(-1) @ vs
            torch.testing.assert_close(od[h * g:(h + 1) * g], want, atol=2e-5, rtol=1e-4)
    assert comp.reselections > 0  # the selection path was exercised too
    store.drop("pruned")
