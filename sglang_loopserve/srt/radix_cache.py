"""The radix tree pieces of ``--radix-eviction-policy loopserve`` (see ``radix.py``): the FULL
component with tombstones, the cache that stores importance on nodes, and the factory.

Imported only when that policy builds its cache (it subclasses SGLang's tree classes).
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.utils.rank_consensus_checker import rank_consensus

from ..cache_policy.prune import prune_plan
from .radix import (IMPORTANCE, PADDING_SLOT, POLICY, TOMBSTONES, LoopServeEvictionStrategy, _stats_lock,
                    in_loopserve_namespace, protected_spans, stats)

logger = logging.getLogger(__name__)


def _tombstones(node, ct) -> int:
    return node.component_data[ct].metadata.get(TOMBSTONES, 0)


def _recount(node, ct) -> None:
    cd = node.component_data[ct]
    if cd.value is None:
        cd.metadata.pop(TOMBSTONES, None)
        return
    n = int((cd.value == PADDING_SLOT).sum())
    if n:
        cd.metadata[TOMBSTONES] = n
    else:
        cd.metadata.pop(TOMBSTONES, None)


def _component_base():
    from sglang.srt.mem_cache.unified_cache.components.full import FullComponent

    return FullComponent


class LoopServeFullComponent(_component_base()):
    """SGLang's FULL component with tombstoned (pruned) entries."""

    # ---- the ledger: live slots only
    def reclaimable_value_len(self, node) -> int:
        return self.value_len(node) - _tombstones(node, self.component_type)

    # ---- a split keeps each side's importance and tombstone count
    def redistribute_on_node_split(self, new_parent, child):
        ct = self.component_type
        imp = child.component_data[ct].metadata.pop(IMPORTANCE, None)
        had_tombstones = child.component_data[ct].metadata.pop(TOMBSTONES, 0)
        super().redistribute_on_node_split(new_parent, child)
        split = len(new_parent.key)
        if imp is not None:
            new_parent.component_data[ct].metadata[IMPORTANCE] = imp[:split].clone()
            child.component_data[ct].metadata[IMPORTANCE] = imp[split:].clone()
        if had_tombstones:
            _recount(new_parent, ct)
            _recount(child, ct)

    # ---- eviction frees live slots only
    def evict_component(self, node, device_frees, host_frees, cache_actions, target=None):
        from sglang.srt.mem_cache.unified_cache.components.base import EvictLayer

        ct = self.component_type
        before = len(device_frees[ct])
        out = super().evict_component(node, device_frees, host_frees, cache_actions,
                                      EvictLayer.DEVICE if target is None else target)
        if len(device_frees[ct]) > before:
            value = device_frees[ct][-1]
            if _tombstones(node, ct):
                device_frees[ct][-1] = value[value != PADDING_SLOT]
            freed = int(device_frees[ct][-1].numel())
            with _stats_lock:
                stats.evicted_leaves += 1
                stats.evicted_tokens += freed
                stats.freed_slots += freed
            node.component_data[ct].metadata.pop(TOMBSTONES, None)
            node.component_data[ct].metadata.pop(IMPORTANCE, None)
        return out

    # ---- the walk: prune every candidate once, then evict whole leaves
    def _evict_device_start(self, request_cnt: int) -> None:
        super()._evict_device_start(request_cnt)
        strategy = self.tree_core.eviction_strategy
        self._prune_queue = []
        if isinstance(strategy, LoopServeEvictionStrategy) and strategy.prune:
            # Each branch-private chain, from its leaf up, in the order leaves would go.
            seen = set()
            for _, leaf in sorted(self._evict_device_heap, key=lambda e: e[0]):
                node = leaf
                while node is not None and node is not self.tree_core.root_node and node.id not in seen:
                    if len(node.children) > 1:
                        break  # a branch point: shared by several branches
                    seen.add(node.id)
                    self._prune_queue.append(node)
                    node = node.parent
            self._prune_queue.reverse()  # popped from the end: the first leaf's chain first

    def _evict_device_next_node(self, tracker, device_frees, host_frees, cache_actions):
        ct = self.component_type
        queue = getattr(self, "_prune_queue", None)
        # An allocation's walk may run "to target" with a quota of everything evictable; pruning
        # cannot be undone, so it frees no more than the allocation asked for.
        need = getattr(self.cache, "loopserve_need", None)
        wanted = self._evict_device_request_cnt - tracker[ct]
        if need is not None:
            wanted = min(wanted, need - tracker[ct])
        while queue and wanted > 0:
            node = queue.pop()
            freed = self._prune(node, wanted, device_frees)
            if freed:
                tracker[ct] += freed
                return None  # one mutation per step: the cache drains the frees and re-checks
        return super()._evict_device_next_node(tracker, device_frees, host_frees, cache_actions)

    def _evict_device_end(self) -> None:
        super()._evict_device_end()
        self._prune_queue = []

    @rank_consensus(same_results=["result.tolist()"])
    def _pruning_plan(self, imp, live, **limits):
        """``prune_plan``'s positions.  Under tensor parallelism every rank must tombstone the same
        tokens, and SGLang's own checks would not see it otherwise (an eviction's result is a count):
        with ``SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1`` the ranks compare these positions."""
        return prune_plan(imp, live, **limits)

    def _prune(self, node, wanted: int, device_frees) -> int:
        """Tombstone up to ``wanted`` (and ``max_step``) of ``node``'s least important tokens."""
        ct = self.component_type
        cd = node.component_data[ct]
        imp = cd.metadata.get(IMPORTANCE)
        # A session's reference (SGLang's --enable-session-radix-cache) orders eviction, it locks
        # nothing: a session's history is pruned like any other, and stays cached for its next turn
        # (skipping it made the pruning policy evict whole sessions: 11,490 history tokens
        # prefilled again in radix_pressure against 6,890 with pruning).
        if (cd.value is None or imp is None or cd.lock_ref > 0 or len(node.children) > 1
                or not in_loopserve_namespace(getattr(node.key, "extra_key", None))):
            return 0
        strategy = self.tree_core.eviction_strategy
        start = _path_start(node, self.tree_core.root_node)
        branch_end = start + _chain_end(node)
        live = (cd.value != PADDING_SLOT).cpu()  # node values live where the KV rows do (a GPU)
        sink, recent = protected_spans(node.key.extra_key, strategy.sink, strategy.recent)
        plan = self._pruning_plan(imp, live, start=start, branch_end=branch_end, sink=sink, recent=recent,
                                  keep_ratio=strategy.keep_ratio, max_tokens=min(wanted, strategy.max_step))
        if not plan.numel():
            return 0
        plan = plan.to(cd.value.device)
        value = cd.value.clone()
        victims = value[plan].clone()
        value[plan] = PADDING_SLOT
        cd.value = value
        cd.metadata[TOMBSTONES] = _tombstones(node, ct) + int(plan.numel())
        self.tree_core.adjust_component_size(node.id, ct, -int(plan.numel()))
        device_frees[ct].append(victims)
        with _stats_lock:
            stats.pruned_tokens += int(plan.numel())
            stats.freed_slots += int(plan.numel())
        return int(plan.numel())


def _path_start(node, root) -> int:
    """Absolute position of ``node``'s first token."""
    start, cur = 0, node.parent
    while cur is not None and cur is not root:
        start += len(cur.key)
        cur = cur.parent
    return start


def _chain_end(node) -> int:
    """Tokens from ``node``'s first to the end of its (single-child) chain."""
    total, cur = 0, node
    while cur is not None:
        total += len(cur.key)
        cur = next(iter(cur.children.values())) if len(cur.children) == 1 else None
    return total


def agreed_over_tp(scores: torch.Tensor | None, length: int, group=None) -> torch.Tensor | None:
    """``[length]`` importance every tensor-parallel rank agrees on, or None where no rank has any.

    Each rank scores only its own KV heads; a token's importance is the largest share any head
    gave it (``TokenImportance``), so the maximum over the ranks is what one process holding every
    head would have stored, and every rank's tree then prunes the same tokens (SGLang requires
    identical cache decisions on every rank: ``SGLANG_ENABLE_RANK_CONSENSUS_CHECKER``).  Every
    rank calls this for the same request at the same point (rank 0 broadcasts the requests), with
    or without scores of its own; ``group``: SGLang's TP group (default: this process's, none
    outside tensor parallelism)."""
    if group is None:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        if (getattr(parallel, "tp_size", 1) or 1) > 1:
            group = parallel.tp_group
    buf = torch.zeros(length + 1)  # the last entry: whether a rank had scores
    if scores is not None:
        n = min(length, scores.numel())
        buf[:n] = scores[:n].float()
        buf[length] = 1.0
    if group is not None and group.world_size > 1:
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=group.cpu_group)
    return buf[:length] if buf[length] > 0 else None


def _cache_base():
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    return UnifiedRadixCache


class LoopServeRadixCache(_cache_base()):
    """The unified radix cache, storing each cached request's token importance on its path."""

    importance_of = None  # rid -> [L] scores (set by the plugin at start-up)
    pruned_row = None  # (rid, positions) -> None: a running request's row now has tombstones
    loopserve_need = None  # the shortfall of the allocation being served (caps pruning)

    def evict_for_alloc(self, params, **kwargs):
        self.loopserve_need = params.num_tokens
        try:
            return super().evict_for_alloc(params, **kwargs)
        finally:
            self.loopserve_need = None

    def checkpoint_into_tree(self, req, *, up_to: int, **kwargs) -> None:
        super().checkpoint_into_tree(req, up_to=up_to, **kwargs)
        if not in_loopserve_namespace(getattr(req, "extra_key", None)):
            return
        if not req.finished() and self.pruned_row is not None:
            # The insert may have matched a pruned node over tokens this request computed: its
            # row now points there at the padding slot, and its decode must not read them.
            row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :req.kv.cache_protected_len]
            dead = (row == PADDING_SLOT).nonzero().flatten().cpu()
            if dead.numel():
                self.pruned_row(req.rid, dead)
        if self.importance_of is None:
            return
        node_id = getattr(req, "last_node", None)  # a NodeId in the unified cache
        node = self.tree_core._node_arena.get(node_id) if node_id is not None else None
        if node is None or node is self.tree_core.root_node:
            return
        from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

        ct = ComponentType.FULL
        end = _path_start(node, self.tree_core.root_node) + len(node.key)
        scores = agreed_over_tp(self.importance_of(req.rid), end)
        if scores is None:
            return
        cur = node
        while cur is not None and cur is not self.tree_core.root_node:
            start = end - len(cur.key)
            cd = cur.component_data[ct]
            if cd.value is not None:
                mine = scores[start:end]
                old = cd.metadata.get(IMPORTANCE)
                cd.metadata[IMPORTANCE] = mine.clone() if old is None else torch.maximum(old, mine)
            end, cur = start, cur.parent


def build_cache(ctx):
    """The radix cache of ``--radix-eviction-policy loopserve`` (``TreeCacheBuildContext``)."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    unsupported = [name for name, on in (("hybrid SWA", ctx.is_hybrid_swa), ("hybrid SSM", ctx.is_hybrid_ssm),
                                         ("--enable-hierarchical-cache", ctx.enable_hierarchical_cache),
                                         ("--disable-radix-cache", ctx.disable_radix_cache)) if on]
    if unsupported:
        raise ValueError(f"--radix-eviction-policy {POLICY} does not support {', '.join(unsupported)}")
    if getattr(ctx.params, "page_size", 1) not in (None, 1):
        raise ValueError(f"--radix-eviction-policy {POLICY} needs --page-size 1 (pruning frees single "
                         f"tokens), got {ctx.params.page_size}")
    ctx.params.component_registry_override = {**(ctx.params.component_registry_override or {}),
                                              ComponentType.FULL: LoopServeFullComponent}
    ctx.params.tree_core_backend = "python"  # the Rust core rejects policies it does not know
    cache = create_unified_radix_cache(ctx, cache_class=LoopServeRadixCache)
    logger.info("LoopServe: radix cache with importance-aware pruning (Python tree core, policy %s)", POLICY)
    return cache
