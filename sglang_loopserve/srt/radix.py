"""``--radix-eviction-policy loopserve``: importance-aware eviction on SGLang's radix tree.

Under pressure SGLang asks the tree for N free slots (``evict_for_alloc``) and the
tree's FULL component walks its evictable leaves.  Here that walk first **prunes**:
for each unlocked, branch-private node of LoopServe's own radix namespace (a leaf,
or an ancestor on a chain no other branch shares), the lowest-importance tokens
(``cache_policy.prune.prune_plan``; never the first ``sink`` positions or the
branch's last ``recent``) lose their KV slot: the slot is freed and the node's
value points that position at the pool's padding slot (slot 0, never handed out).
The node keeps its key and length, so matching, splitting and the positions of
every later token stay as they were; LoopServe's backend masks positions whose
slot is the padding slot.  Only when no node can be pruned further are whole
leaves evicted, in ``prune.leaf_priority`` order.

Pieces (all SGLang's own extension points; no file of SGLang is edited):

* here: ``LoopServeEvictionStrategy``, the policy name's strategy
  (``get_priority``) holding the policy's settings; the counters (``stats``);
  ``register_policy`` (every process: the flag's choice and the strategy);
* ``radix_cache.py``: ``LoopServeFullComponent``, the FULL component with
  tombstones (its ledger counts live slots only, a split keeps each side's
  importance and tombstone count, an evicted node frees its live slots only,
  and the eviction walk prunes before it evicts); ``LoopServeRadixCache``,
  which stores a request's per-token importance on the nodes of its path when
  it is cached; ``build_cache``, the factory run for the policy (it selects the
  Python tree core: the Rust one rejects unknown policies).

Shared prefixes stay exact: a node on the path of two branches (two children)
is never pruned, nor a node another request has locked, nor any node outside a
LoopServe namespace (stock and exact requests never match those: the namespace
is part of every radix key).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import asdict, dataclass


from ..cache_policy.prune import leaf_priority

logger = logging.getLogger(__name__)

POLICY = "loopserve"
#: Node metadata keys (FULL component): per-token importance, and how many entries are tombstones.
IMPORTANCE = "loopserve_importance"
TOMBSTONES = "loopserve_tombstones"
#: The KV pool's padding slot: SGLang's allocators never hand it out.
PADDING_SLOT = 0
NAMESPACE_PREFIX = "loopserve("


def in_loopserve_namespace(extra_key) -> bool:
    """Whether a radix key's ``extra_key`` is one of LoopServe's namespaces (plugin.cache_namespace)."""
    return isinstance(extra_key, str) and NAMESPACE_PREFIX in extra_key


_SPANS = re.compile(r"\bs=(\d+).*\br=(\d+)")


def protected_spans(extra_key, sink: int, recent: int) -> tuple[int, int]:
    """The sink and recent spans a node keeps: the policy's, or the larger ones of the LoopServe
    settings its namespace was computed with (``plugin.cache_namespace`` writes ``s=`` / ``r=``)."""
    m = _SPANS.search(extra_key) if isinstance(extra_key, str) else None
    if m is None:
        return sink, recent
    return max(sink, int(m.group(1))), max(recent, int(m.group(2)))


@dataclass
class RadixStats:
    """Counters of the tree's pressure handling (``/metrics``, ``/server_info``)."""

    policy: str = "lru"  # the server's --radix-eviction-policy (set at scheduler start; SGLang's default)
    pruned_tokens: int = 0  # entries turned into tombstones
    freed_slots: int = 0  # pool slots given back: pruned + those of evicted leaves
    evicted_leaves: int = 0
    evicted_tokens: int = 0  # live slots of evicted leaves
    reprefilled_tokens: int = 0  # prompt tokens computed, not served from the cache

    def as_dict(self) -> dict:
        return asdict(self)


#: This scheduler process's counters (one tree per process).
stats = RadixStats()
_stats_lock = threading.Lock()


def count_prefill(new_tokens: int) -> None:
    with _stats_lock:
        stats.reprefilled_tokens += int(new_tokens)


class LoopServeEvictionStrategy:
    """``--radix-eviction-policy loopserve`` (duck-types SGLang's ``EvictionStrategy``:
    ``get_priority``, smallest evicted first; this module imports nothing of SGLang, so the
    backend and its tests run where SGLang is absent).  ``--radix-eviction-policy-config`` keys:
    ``prune`` (bool, default true: prune before evicting), ``keep_ratio`` (a pruned node keeps
    at least this share of its tokens, default 0.5), ``max_step`` (tokens pruned per walk step,
    default 256), ``sink`` and ``recent`` (protected positions, default LoopServe's 4 and 32)."""

    def __init__(self, prune: bool = True, keep_ratio: float = 0.5, max_step: int = 256, sink: int = 4,
                 recent: int = 32):
        if not isinstance(prune, bool):
            raise ValueError(f"--radix-eviction-policy-config: prune must be true or false, got {prune!r}")
        if not isinstance(keep_ratio, (int, float)) or not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"--radix-eviction-policy-config: keep_ratio must be in [0, 1], got {keep_ratio!r}")
        for name, value in (("max_step", max_step), ("sink", sink), ("recent", recent)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "max_step" else 0):
                raise ValueError(f"--radix-eviction-policy-config: {name} must be an integer >= "
                                 f"{1 if name == 'max_step' else 0}, got {value!r}")
        self.prune, self.keep_ratio, self.max_step = prune, float(keep_ratio), max_step
        self.sink, self.recent = sink, recent
        self.stats = stats

    def get_priority(self, node):
        from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

        cd = node.component_data[ComponentType.FULL]
        imp = cd.metadata.get(IMPORTANCE)
        live = cd.value is not None and len(cd.value) > cd.metadata.get(TOMBSTONES, 0)
        mean = float(imp[(cd.value != PADDING_SLOT).cpu()].mean()) if imp is not None and live else 0.0
        return leaf_priority(shared=max(getattr(node, "hit_count", 0) - 1, 0), importance=mean,
                             last_access=node.last_access_time, recompute_tokens=len(node.key))


def register_policy() -> None:
    """Make ``loopserve`` a choice of ``--radix-eviction-policy`` and a known strategy (every process)."""
    from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES
    from sglang.srt.mem_cache import utils

    if POLICY not in RADIX_EVICTION_POLICY_CHOICES:
        RADIX_EVICTION_POLICY_CHOICES.append(POLICY)
    utils._EVICTION_POLICY_FACTORIES.setdefault(POLICY, LoopServeEvictionStrategy)
