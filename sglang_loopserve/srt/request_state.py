"""What the scheduler process knows about each request LoopServe serves.

* ``RequestStats`` lives on SGLang's ``Req`` (``req.loopserve_stats``), so it
  survives a retraction and dies with the request; it becomes
  ``meta_info["loopserve"]``.
* ``DecodeState`` (one ``DecodeCompressor`` per layer) lives in
  ``RequestStore``, keyed by request id; the backend creates it at a prefill
  and the plugin drops it when SGLang releases the request's KV row (finish,
  abort, retraction).
* ``live_requests`` maps ids to their ``Req`` weakly: the backend only sees ids.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..cache_policy import DecodeCompressor
from ..cache_policy.decode import layer_query_blocks
from ..cache_policy.prune import TokenImportance
from ..config import LoopServeConfig

_context = [1 << 62]


def set_model_context(tokens: int) -> None:
    _context[0] = int(tokens)


def model_context() -> int:
    """The served model's context length (set by the backend; huge until then)."""
    return _context[0]


#: rid -> Req, weakly: an entry disappears with its request, whatever path it took.
live_requests: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


@dataclass
class RequestStats:
    """Sums over layers (and heads, chunks, steps); ``summary()`` turns them into means."""

    enabled: bool = True
    method: str = "loopserve"  # what served the request (LoopServeConfig.method)
    num_layers: int = 1  # attention layers of the model (set by the backend)
    prefill_pairs_computed: float = 0.0  # causal (query, key) pairs computed, summed over layers
    prefill_pairs_causal: float = 0.0  # the same for dense attention
    prefill_layer_forwards: int = 0
    prefill_sparse_layer_forwards: int = 0
    decode_layer_steps: int = 0
    decode_tokens_attended: float = 0.0  # per layer-step: mean over KV heads of tokens read
    decode_tokens_cached: float = 0.0  # per layer-step: tokens in the cache
    reselections: int = 0  # per layer
    select_time_s: float = 0.0  # prefill estimate + index, decode re-selection
    seeded_from: str = "full"
    pruned_cached_tokens: int = 0  # cached prefix positions whose KV the radix tree pruned
    nonfinite_exact_layers: int = 0  # layer forwards served exactly: NaN/Inf in its queries or keys

    def add_prefill(self, computed: float, causal: float, sparse: bool, select_s: float = 0.0):
        self.prefill_pairs_computed += computed
        self.prefill_pairs_causal += causal
        self.prefill_layer_forwards += 1
        self.prefill_sparse_layer_forwards += int(sparse)
        self.select_time_s += select_s

    def add_decode(self, attended: float, cached: int):
        self.decode_layer_steps += 1
        self.decode_tokens_attended += attended
        self.decode_tokens_cached += cached

    def summary(self) -> dict:
        """The figures of ``meta_info["loopserve"]``."""
        steps, num_layers = self.decode_layer_steps, self.num_layers
        return {
            "enabled": self.enabled,
            "method": self.method if self.enabled else None,
            # Mean over layers and heads, weighted by the causal pairs of each forward.
            "prefill_density": (self.prefill_pairs_computed / self.prefill_pairs_causal
                                if self.prefill_pairs_causal else None),
            "prefill_sparse_fraction": (self.prefill_sparse_layer_forwards / self.prefill_layer_forwards
                                        if self.prefill_layer_forwards else 0.0),
            "decode_steps": steps // max(num_layers, 1),
            "decode_tokens_attended": self.decode_tokens_attended / steps if steps else None,
            "decode_tokens_cached": self.decode_tokens_cached / steps if steps else None,
            "reselections": self.reselections // max(num_layers, 1),
            "select_time_s": round(self.select_time_s, 6),
            "seeded_from": self.seeded_from,
            "pruned_cached_tokens": self.pruned_cached_tokens,
            "nonfinite_exact_layers": self.nonfinite_exact_layers,
        }


@dataclass
class DecodeState:
    """A request's decode selection, one compressor per layer, for the current turn."""

    options: LoopServeConfig
    layers: dict = field(default_factory=dict)  # layer_id -> DecodeCompressor
    #: ascending positions of the cached prefix whose slot is the padding slot (pruned by the
    #: radix tree; masked in prefill and decode), or None
    pruned: object = None
    #: new tokens this turn's prefill brought, over all its chunks so far
    turn_tokens: int = 0
    #: whether this turn decodes exactly on the base path (``decode_pays`` said no at its first
    #: decode step); None until then
    base_decode: bool | None = None
    #: NaN/Inf met in this turn's queries or keys: it decodes exactly from then on
    nonfinite: bool = False

    def compressor(self, layer_id: int, num_layers: int | None = None) -> DecodeCompressor:
        """Layer ``layer_id``'s compressor; making it takes the model's ``num_layers`` (the query
        blocks' pyramid, ``layer_query_blocks``)."""
        comp = self.layers.get(layer_id)
        if comp is None:
            if num_layers is None:
                raise ValueError(f"layer {layer_id} has no compressor yet: pass num_layers to make one")
            o = self.options
            comp = self.layers[layer_id] = DecodeCompressor(
                budget=o.decode_budget, interval=o.decode_interval, window=o.decode_window,
                sink=o.sink, recent=o.recent, max_interval=o.decode_max_interval,
                first_interval=o.decode_first_interval or 0, pool_window=o.decode_pooling,
                query_blocks=layer_query_blocks(o.decode_query_blocks, layer_id, num_layers,
                                                float(o.decode_pyramid)))
        return comp


class RequestStore:
    """``rid -> DecodeState`` for the requests in flight in this scheduler process."""

    def __init__(self):
        self._states: dict[str, DecodeState] = {}
        self._importance: dict[str, TokenImportance] = {}  # lives as long as the request, across turns' chunks
        self._lock = threading.Lock()  # the overlap scheduler releases from another thread
        #: The radix cache prunes by importance (``--radix-eviction-policy loopserve``): every
        #: prefill measures it, also where the decode does not need it.
        self.importance_wanted = False

    def new_turn(self, rid: str, options: LoopServeConfig, new_tokens: int = 0) -> DecodeState:
        """Fresh state: a prefill (a new turn, or a retracted request's redo) starts over.  A
        later chunk of the same prefill (state with no decode step yet) adds its ``new_tokens``
        to the turn's count."""
        with self._lock:
            old = self._states.get(rid)
            earlier = 0
            if old is not None and not any(c.steps for c in old.layers.values()):
                earlier = old.turn_tokens
            state = self._states[rid] = DecodeState(options, turn_tokens=earlier + new_tokens)
        return state

    def get(self, rid: str) -> DecodeState | None:
        return self._states.get(rid)

    def set_pruned(self, rid: str, positions) -> None:
        """A running request's row gained pruned positions (the radix cache re-pointed it at a
        pruned node when it was cached): its decode must skip them too."""
        state = self._states.get(rid)
        if state is not None:
            held = positions if state.pruned is None else torch.cat([state.pruned, positions])
            state.pruned = torch.unique(held)  # ascending, as extend records them

    def importance(self, rid: str) -> TokenImportance:
        """The request's per-position importance (created on first use)."""
        imp = self._importance.get(rid)
        if imp is None:
            with self._lock:
                imp = self._importance.setdefault(rid, TokenImportance())
        return imp

    def importance_scores(self, rid: str):
        """``[L]`` scores of what the request has observed, or None (what the radix tree stores)."""
        imp = self._importance.get(rid)
        return None if imp is None else imp.scores

    def drop(self, rid: str) -> None:
        with self._lock:
            self._states.pop(rid, None)
            self._importance.pop(rid, None)

    def drop_missing(self) -> None:
        """Forget states whose request object is gone (a backstop for exotic exit paths)."""
        with self._lock:
            for table in (self._states, self._importance):
                for rid in [r for r in table if r not in live_requests]:
                    del table[rid]

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, rid: str) -> bool:
        return rid in self._states


#: The store of this process (SGLang builds one attention backend per model runner).
store = RequestStore()
