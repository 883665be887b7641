"""``LoopServeAttnBackend``: SGLang attention with LoopServe's two phases.

It wraps the platform's own backend (``base``: torch-native on the CPU,
FlashInfer or Triton on a GPU) and takes over only the requests it can make
cheaper:

* ``forward_extend``: a request whose sequence reaches ``min_prefill_len`` (by
  default the device's measured break-even) and whose forward brings at least
  ``block_size`` new tokens runs its new tokens over its whole cached prefix
  (radix hit or earlier chunks) with ``sparse_prefill_attention``; the other
  LoopServe requests compute exactly their new rows over cached + new keys
  (``exact_prefill_attention``), where the torch-native base would recompute
  the square of the whole sequence (on a GPU the base already computes only
  the new rows, and runs them).
* ``forward_decode``: a request whose ``DecodeCompressor`` selection is smaller
  than its cache reads only the selected tokens (``batched_decode_attention``,
  one padded gather for the whole batch); the others run on ``base``.

So with everything kept (``alpha`` 1, a budget above the context) or LoopServe
disabled for a request, that request's numbers are exactly ``base``'s.

Pruned prefixes (``--radix-eviction-policy loopserve``, ``radix_cache.py``): a
request whose cached prefix has positions pointing at the padding slot runs
its prefill exactly over the keys still held (the pruned ones removed, not
zeroed) and its decode never reads those positions (``without_positions``).
Every prefill and decode re-selection also feeds the request's per-token
importance (``request_state.RequestStore.importance``), which the radix cache
stores on the nodes of its path.

Both phases share the KV pool: the backend never writes or frees KV other than
the forward's own new tokens, so radix-shared prefixes are untouched; decode
selection is a per-request index set.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import torch

from ..attention import sparse_prefill_attention
from ..attention.exact import exact_prefill_attention
from ..attention.kernels import default_kernel
from ..cache_policy import METHODS, KeySummaries, ScoreContext, attention_mass, batched_decode_attention
from ..cache_policy.batched import every_position
from ..cache_policy.decode import DecodeCompressor, decode_pays, reselect_pruned
from ..calibrate import gates_for
from ..config import PREFILL_PATTERNS, LoopServeConfig
from .faults import FaultHook, fail_request, failed, injection_from_env
from .faults import stats as fault_stats
from .request_state import RequestStats, live_requests, model_context, set_model_context, store
from .radix import PADDING_SLOT, count_prefill
from .radix import POLICY as RADIX_POLICY, stats as radix_stats

logger = logging.getLogger(__name__)


def causal_pairs(prefix: int, n_new: int) -> int:
    """(query, key) pairs of ``n_new`` queries after ``prefix`` cached keys, causal."""
    return n_new * prefix + n_new * (n_new + 1) // 2


def without_positions(rows, dead: torch.Tensor, length: int, n_kv: int):
    """A decode read set (``DecodeCompressor.attended``: flat positions and a count per KV
    head, or ``None`` for every position) without the positions ``dead``."""
    if rows is None:
        keep = torch.ones(length, dtype=torch.bool, device=dead.device)
        keep[dead] = False
        live = keep.nonzero().flatten()
        return live.repeat(n_kv), [live.numel()] * n_kv
    flat, counts = rows
    keep = ~torch.isin(flat, dead.to(flat.device))
    head = torch.repeat_interleave(torch.arange(len(counts), device=flat.device),
                                   torch.tensor(counts, device=flat.device))
    return flat[keep], torch.bincount(head[keep], minlength=len(counts)).tolist()


#: Per device type: whether a LoopServe turn that reads every cached token (a ``full`` seed
#: before its first re-selection) runs through the batched decode kernel rather than the base.
#: CPU, measured (bf16 pool, 9 query / 3 KV heads, d 64, one request over 7,400 tokens, one
#: layer): the kernel 9.6 ms, a gather + SDPA as the torch-native base runs it 14.6 ms.  A GPU's
#: FlashInfer/Triton base decode is not slower than a gather kernel: it keeps those steps.
FULL_READS_THROUGH_KERNEL = {"cpu": True}


def _token_starts(new_lens) -> list[int]:
    """Offsets of each request's new tokens in the batch's flat token axis."""
    starts = [0]
    for n in new_lens:
        starts.append(starts[-1] + n)
    return starts


def _nonfinite_rows(q_, k) -> set[int]:
    """Rows of a decode batch whose query or new key holds NaN/Inf: one sum over the batch (per
    layer and step, so three ops, not the seven of a sum per row: 0.2 ms of a 3 ms fp32 step at 8K),
    and only where that is not finite one per row (a sum that overflows lands there too)."""
    if bool(torch.isfinite(q_.sum() + k.sum())):
        return set()
    n = q_.shape[0]
    sums = q_.reshape(n, -1).float().sum(1) + k.reshape(n, -1).float().sum(1)
    bad = ~torch.isfinite(sums)
    return set(bad.nonzero().flatten().tolist()) if bool(bad.any()) else set()


#: This process's gates (``LoopServeAttnBackend.gates``), for ``/server_info``.
serving_gates: dict = {}


def _attention_shape(model_runner) -> tuple[tuple[int, int, int], torch.dtype, torch.dtype]:
    """``((query heads, KV heads, head dim) of this rank, model dtype, KV cache dtype)``."""
    cfg = model_runner.model_config
    tp = max(getattr(model_runner, "tp_size", 1), 1)
    heads = max(cfg.num_attention_heads // tp, 1)
    kv_heads = max(cfg.get_num_kv_heads(tp), 1)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = getattr(model_runner, "dtype", torch.float32)
    kv_dtype = getattr(model_runner, "kv_cache_dtype", dtype)
    return (heads, kv_heads, dim), dtype, kv_dtype if isinstance(kv_dtype, torch.dtype) else dtype


def _request(rid: str):
    return live_requests.get(rid)


def options_of(rid: str, default: LoopServeConfig) -> LoopServeConfig:
    req = _request(rid)
    return getattr(req, "loopserve_options", None) or default


def request_stats(rid: str) -> RequestStats | None:
    return getattr(_request(rid), "loopserve_stats", None)


class DenseLayers:
    """Layers whose last plan was far too dense to pay (``REMEMBER_FROM``): their next
    sparse-eligible forwards *of the same kind* skip planning and run the exact rectangle, and
    every ``probe_every``-th of them plans again.

    A model's early layers attend diffusely turn after turn (SmolLM2's layer 0 keeps over 90% of
    its cells at alpha 0.95), and planning them costs as much as a sparse layer's plan for
    nothing: at 8K tokens half of the layers, 5-10% of a dense prefill each.  How dense a plan
    is depends on the forward's shape: a conversation's first turn (a square over a short
    sequence) plans far denser than its next turn over a long cached history (SmolLM2, 3.6K
    tokens after a 1.6K-token first turn: remembered across lengths, 9 more layers run exact and
    0.79 of the causal pairs are computed instead of 0.62).  So the memory is per layer and length
    octave (``n_ctx``'s bit length) and holds only for an ``alpha`` at least the one that planned
    too dense.  It also depends on the conversation: a layer planned just above the gate in one
    (0.6-0.8) plans below it in the next, and remembering it would run the next conversations'
    prefills exact there (served, 3 documents in turn: 0.65 of the pairs where each alone plans
    0.53-0.62); so only a plan at least ``remember_from`` dense is remembered, and a layer nearer
    the gate plans every time.
    """

    #: The planned density from which a too-dense layer is remembered.
    REMEMBER_FROM = 0.8

    def __init__(self, probe_every: int = 8, remember_from: float = REMEMBER_FROM):
        self.probe_every = probe_every
        self.remember_from = remember_from
        #: (layer, length octave) -> [sparse-eligible forwards since its dense plan, that plan's alpha]
        self._skipped: dict[tuple[int, int], list] = {}

    def skip(self, layer_id: int, n_ctx: int, alpha: float) -> bool:
        """True when this forward of ``layer_id`` (``n_ctx`` keys at ``alpha``) should not plan
        (it then counts as skipped)."""
        entry = self._skipped.get((layer_id, int(n_ctx).bit_length()))
        if entry is None or alpha < entry[1] or entry[0] + 1 >= self.probe_every:
            return False
        entry[0] += 1
        return True

    def observe(self, layer_id: int, planned_density: float, n_ctx: int, alpha: float) -> None:
        """A plan of ``layer_id`` over ``n_ctx`` keys at ``alpha`` came out ``planned_density``
        dense: remember the layer if that is at least ``remember_from``, else forget it."""
        key = (layer_id, int(n_ctx).bit_length())
        if planned_density >= self.remember_from:
            self._skipped[key] = [0, alpha]
        else:
            self._skipped.pop(key, None)


class LoopServeAttnBackend:
    """One backend for the whole batch; ``base`` serves what LoopServe leaves dense.

    Duck-types SGLang's ``AttentionBackend``: the methods LoopServe changes are
    defined here, every other attribute (CUDA-graph hooks, metadata helpers)
    is ``base``'s.
    """

    def __init__(self, model_runner, base, config: LoopServeConfig, metrics=None):
        self.base = base
        self.config = config
        self.device = model_runner.device
        translator = getattr(model_runner, "kv_index_translator", None)
        if getattr(translator, "is_translating", False):
            # Hybrid SWA/Mamba pools address KV through a translated id space;
            # LoopServe reads req_to_token slots directly.
            raise NotImplementedError(
                "--enable-loopserve: this model's KV pool translates token ids (hybrid SWA/Mamba "
                "allocator); LoopServe supports models with a plain per-layer KV pool")
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.num_layers = model_runner.model_config.num_hidden_layers
        set_model_context(getattr(model_runner.model_config, "context_len", 1 << 62))
        self.kernel = "auto"  # the device's fastest kernel, exact rectangle above the measured density gate
        self._full_reads_through_kernel = FULL_READS_THROUGH_KERNEL.get(torch.device(self.device).type, False)
        self.dense_layers = DenseLayers()
        self.store = store
        self.metrics = metrics
        # The torch-native base computes one request at a time from plain
        # tensors, so a subset of the batch can run on it exactly as stock
        # would.  Other bases plan the whole batch in init_forward_metadata:
        # a batch LoopServe takes entirely skips them; a mixed one runs on
        # them whole and LoopServe overwrites its requests' rows.
        self._base_subsets = hasattr(base, "_run_sdpa_forward_extend")
        self._pruned_now: dict = {}  # rid -> pruned prefix positions, this forward
        self._live_now: dict = {}  # rid -> the other positions, this forward
        self.fault_hook = FaultHook(injection_from_env())
        heads, dtype, kv_dtype = _attention_shape(model_runner)
        self._warm_up(heads, dtype, kv_dtype)
        t = time.perf_counter()
        #: Where LoopServe's paths pay on this machine (``calibrate``): measured once per machine
        #: and head shape, cached, each overridden by its flag.
        self.gates = gates_for(self.device, dtype, kv_dtype, heads, config)
        serving_gates.update(self.gates.to_dict())
        logger.info("LoopServe gates in %.1f s: %s", time.perf_counter() - t, self.gates.describe())

    def _warm_up(self, heads, dtype, kv_dtype) -> None:
        """Compile the planner's and the decode's CPU loops (numba, cached on disk) and the kernel
        now, not inside the first long turn's time to first token (nor the calibration's timings)."""
        heads, kv_heads, dim = heads
        gen = torch.Generator(device="cpu").manual_seed(0)
        n_new, n_ctx = 4 * self.config.block_size, 8 * self.config.block_size
        q, k, v = (torch.randn(n, h, dim, generator=gen).to(self.device, dtype)
                   for n, h in ((n_new, heads), (n_ctx, kv_heads), (n_ctx, kv_heads)))
        t = time.perf_counter()
        kernel = default_kernel(torch.device(self.device))
        sparse_prefill_attention(q, k, v, alpha=0.5, q_window=self.config.q_window,
                                 block_size=self.config.block_size, kernel=kernel)
        # A decode re-selection (compiled on the CPU: with one scoring query, ``decode_pooling all``;
        # a window of them runs tensor ops), from a pool of the KV cache's dtype.
        pool = torch.randn(n_ctx, kv_heads, dim, generator=gen).to(self.device, kv_dtype)
        slots = torch.arange(n_ctx, dtype=torch.int32, device=self.device)
        summaries, budget = KeySummaries(), self.config.sink + self.config.recent + 16
        previous = torch.arange(budget, device=self.device).expand(kv_heads, -1)
        for length in (n_ctx - 5, n_ctx):  # the summaries built, then grown
            reselect_pruned(q[-1:].float(), pool, slots[:length], summaries, budget=budget, sink=self.config.sink,
                            recent=self.config.recent, factor=1.0, previous=previous)
        # A step's read set with query blocks (compiled on the CPU), from a seeded selection.
        comp = DecodeCompressor(budget=budget, sink=self.config.sink, recent=self.config.recent, query_blocks=2)
        comp.seed(torch.rand(kv_heads, n_ctx, generator=gen).to(self.device), n_ctx - 5)
        comp.attended(n_ctx, q[-1], pool, slots)
        # Attention over a selection (compiled on the CPU), as ``_decode_selected`` calls it.
        positions = torch.arange(budget, device=self.device).repeat(kv_heads)
        indptr = torch.arange(kv_heads + 1, device=self.device) * budget
        batched_decode_attention(q[:1], pool, pool, slots[None], indptr, positions)
        logger.info("LoopServe: %s kernel and planner ready in %.1f s", kernel, time.perf_counter() - t)

    def __getattr__(self, name):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    # ------------------------------------------------------------------ glue
    def init_forward_metadata(self, forward_batch):
        self.store.drop_missing()
        self._pruned_now = self._pruned_prefixes(forward_batch)
        self._live_now = {}
        if self.metrics is not None:
            self.metrics.sync_radix(radix_stats)
        self.base.init_forward_metadata(forward_batch)

    def _live_positions(self, rid, pruned, length, device):
        """Positions ``0 .. length-1`` but ``pruned``: built once per forward, read by every layer."""
        live = self._live_now.get(rid)
        if live is None:
            keep = torch.ones(length, dtype=torch.bool, device=device)
            keep[pruned.to(device)] = False
            live = self._live_now[rid] = keep.nonzero().flatten()
        return live

    def _pruned_prefixes(self, fb) -> dict:
        """``rid -> positions`` of each extend request's cached prefix whose slot is the padding
        slot (KV the radix tree pruned, ``srt/radix.py``), for requests that have any; and the
        prompt tokens computed (not served from the cache) go to the tree's counters."""
        mode = fb.forward_mode
        if mode is None or not mode.is_extend() or not fb.rids:
            return {}
        count_prefill(sum(fb.extend_seq_lens_cpu))
        if radix_stats.policy != RADIX_POLICY:  # no other policy leaves tombstones
            return {}
        out = {}
        rows = self.req_to_token_pool.req_to_token
        for i, (rid, prefix) in enumerate(zip(fb.rids, fb.extend_prefix_lens_cpu)):
            if prefix <= 0:
                continue
            dead = (rows[int(fb.req_pool_indices[i]), :prefix] == PADDING_SLOT).nonzero().flatten()
            if dead.numel():
                out[rid] = dead
        return out

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            return q.new_empty(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        if not self._layer_supported(layer) or kwargs:
            return self.base.forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if mode == type(mode).EXTEND:
            return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        # Mixed chunks, speculative verify/draft: stock path.
        return self.base.forward(q, k, v, layer, forward_batch, save_kv_cache)

    @staticmethod
    def _layer_supported(layer) -> bool:
        # Plain causal self-attention; sliding windows, cross attention, logit
        # caps and differing q/v head dims stay on the base backend.
        return (not getattr(layer, "is_cross_attention", False)
                and (getattr(layer, "sliding_window_size", None) is None or layer.sliding_window_size < 0)
                and not getattr(layer, "logit_cap", 0)
                and layer.qk_head_dim == layer.v_head_dim)

    def _scaled(self, q, layer):
        # Our kernels use 1/sqrt(d); fold the layer's own scaling into q.
        factor = layer.scaling * math.sqrt(layer.qk_head_dim)
        return q if abs(factor - 1.0) < 1e-6 else q * factor

    def _save_kv(self, layer, forward_batch, k, v):
        """Write the forward's new K/V as the base would (it is skipped for these tokens)."""
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        loc = KVWriteLoc.for_batch(forward_batch, swa_loc=getattr(self.base, "swa_out_cache_loc", None))
        k_scale = getattr(layer, "k_scale", None)
        if k_scale is None:
            self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)
        else:  # quantized KV: the pool scales in place, k/v are still read afterwards
            self.token_to_kv_pool.set_kv_buffer(layer, loc, k.clone(), v.clone(), k_scale, layer.v_scale)

    def _kv_of(self, layer, pool_idx: int, length: int, dtype):
        slots = self.req_to_token_pool.req_to_token[pool_idx, :length].long()
        k = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[slots]
        v = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[slots]
        return k.to(dtype), v.to(dtype)

    # ---------------------------------------------------------------- extend
    def extend_mode(self, opts: LoopServeConfig, seq_len: int, new_len: int) -> str:
        """How a request's extend runs: ``"base"`` (SGLang's backend: keep-everything requests,
        and on a GPU every exact one), ``"exact"`` (the new rows over cached + new keys) or
        ``"sparse"`` (``sparse_prefill_attention``)."""
        if opts.keeps_everything(model_context()):
            return "base"
        if opts.method in PREFILL_PATTERNS:  # a static pattern on every forward of a block or more
            return "sparse" if new_len >= self.config.block_size else "exact"
        if opts.method != "loopserve":  # the decode baselines prefill exactly, over the new rows only
            return "exact"
        gate = self.gates.min_prefill_len if opts.min_prefill_len is None else opts.min_prefill_len
        if opts.alpha < 1.0 and seq_len >= gate and new_len >= self.config.block_size:
            return "sparse"
        # The torch-native base recomputes the square of the whole sequence;
        # GPU bases (FlashInfer, Triton) already compute only the new rows.
        return "exact" if self._base_subsets else "base"

    def _seed_after_exact(self, comp, opts, q_i, k_all, length, live=None, rid=None, estimate=None,
                          turn=0):
        """The decode selection after a prefill.  LoopServe's (``decode_seed``): ``auto``
        (default): a turn of ``turn <= q_window`` new tokens (a follow-up, its question among
        them) from the attention of all its queries, so it reads its selection from the first
        token on; a longer turn, whose question may sit anywhere in it, every token until the
        first re-selection; ``estimate``: from the sparse prefill's ``estimate`` (its column mass
        over every sampled row); after an exact prefill, which has none, and with
        ``last_queries``: from the attention of the prompt's last ``decode_window`` queries;
        ``full``: every token until the first re-selection.  A baseline's one selection
        (``full``: none, every token).  ``live``: the positions of ``k_all``'s rows when pruned
        ones were removed (selections and scores map back to positions)."""
        if opts.method == "loopserve":
            seed, window = opts.decode_seed, opts.decode_window
            if seed == "auto":
                seed, window = ("last_queries", max(turn, 1)) if turn <= opts.q_window else ("full", opts.decode_window)
            if seed == "estimate" and estimate is not None:
                comp.seed(estimate, length)
                return
            # The pruning radix cache needs every turn's importance, a full seed's too: without it
            # the turns that prefill and decode exactly (below the gates) left pruning blind, and
            # their histories were evicted whole (radix_pressure: 4,600 tokens prefilled again).
            observe = rid is not None and estimate is None and (seed != "full" or self.store.importance_wanted)
            if seed == "full" and not observe:
                comp.seed(None, length)
                return
            mass = attention_mass(q_i[-window:], k_all)
            if live is not None:
                mass = mass.new_zeros(mass.shape[0], length).index_copy_(1, live.to(mass.device), mass)
            if seed == "full":
                comp.seed(None, length)
            else:
                comp.seed(mass, length, source="prompt")
            if observe:
                self.store.importance(rid).observe_columns(mass)
        elif opts.method == "full" or opts.method in PREFILL_PATTERNS:
            comp.seed(None, length)
            comp.fixed = True
        else:
            ctx = ScoreContext(k=k_all, prompt_len=k_all.shape[0], prompt_q=q_i)
            selection = METHODS[opts.method]().select(ctx, opts.decode_budget, opts.sink, opts.recent)
            if live is not None:
                selection = torch.where(selection >= 0, live.to(selection.device)[selection.clamp(min=0)], -1)
            comp.fix(selection, length, source=opts.method)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        fb = forward_batch
        rids = fb.rids or []
        new_lens = fb.extend_seq_lens_cpu
        seq_lens = fb.seq_lens_cpu.tolist()
        plans = []  # (i, options, mode)
        for i, rid in enumerate(rids):
            opts = options_of(rid, self.config)
            mode = self.extend_mode(opts, seq_lens[i], new_lens[i])
            if failed(_request(rid)):  # finishing with an error: exactly, as stock
                mode = "base"
            if rid in self._pruned_now:  # a pruned prefix: exact over the keys still held
                mode = "exact"
            plans.append((i, opts, mode))

        o = self._run_base(False, q, k, v, layer, fb, save_kv_cache,
                           taken={i for i, _, mode in plans if mode != "base"})
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        starts = _token_starts(new_lens)
        for i, opts, mode in plans:
            rid = rids[i]
            req = _request(rid)
            rows = slice(starts[i], starts[i + 1])
            if failed(req):
                if mode != "base":
                    o_[rows] = self._exact_rows(q_[rows], layer, fb, i).to(o_.dtype)
                continue
            try:
                self._extend_request(i, opts, mode, q_[rows], o_[rows], layer, fb)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the server
                fail_request(req, rid, exc)
                if mode != "base":
                    o_[rows] = self._exact_rows(q_[rows], layer, fb, i).to(o_.dtype)
        return o

    def _exact_rows(self, q_rows, layer, fb, i):
        """Exact attention of request ``i``'s query rows ``q_rows`` (its last ones) over the keys it
        holds: the fallback of a request LoopServe failed on."""
        seq_len = int(fb.seq_lens_cpu[i])
        k_all, v_all = self._kv_of(layer, int(fb.req_pool_indices[i]), seq_len, q_rows.dtype)
        pruned = self._pruned_now.get(fb.rids[i])
        state = self.store.get(fb.rids[i])
        pruned = pruned if pruned is not None else getattr(state, "pruned", None)
        if pruned is not None:
            live = self._live_positions(fb.rids[i], pruned, seq_len, k_all.device)
            k_all, v_all = k_all[live], v_all[live]
        return exact_prefill_attention(self._scaled(q_rows, layer), k_all, v_all)

    def _extend_request(self, i, opts, mode, q_rows, o_rows, layer, fb):
        """Request ``i``'s rows of this extend (``o_rows``, written in place), its stats and the
        seed of its decode selection."""
        rid = fb.rids[i]
        prefix_len, new_len, seq_len = fb.extend_prefix_lens_cpu[i], fb.extend_seq_lens_cpu[i], int(fb.seq_lens_cpu[i])
        stats = request_stats(rid)
        if stats is not None:
            stats.enabled, stats.num_layers, stats.method = opts.enabled, self.num_layers, opts.method
        if not opts.enabled:
            return
        self.fault_hook.check("prefill", rid)
        # A prefill starts the turn's decode state afresh (at the first layer).
        state = None if layer.layer_id == 0 else self.store.get(rid)
        if state is None:
            state = self.store.new_turn(rid, opts, new_len)
            state.pruned = self._pruned_now.get(rid)
            if stats is not None:
                stats.pruned_cached_tokens = 0 if state.pruned is None else int(state.pruned.numel())
        comp = state.compressor(layer.layer_id, self.num_layers)
        causal = causal_pairs(prefix_len, new_len) * layer.tp_q_head_num
        if mode == "base":
            comp.seed(None, seq_len)
            if stats is not None:
                stats.add_prefill(causal, causal, sparse=False)
            return
        k_all, v_all = self._kv_of(layer, int(fb.req_pool_indices[i]), seq_len, q_rows.dtype)
        q_i = self._scaled(q_rows, layer)
        if mode == "sparse" and opts.method == "loopserve" and self.dense_layers.skip(
                layer.layer_id, seq_len, opts.alpha):
            mode = "exact"
        if mode == "exact":
            live = None
            if state.pruned is not None:  # the pruned positions' keys are removed, not zeroed
                live = self._live_positions(rid, state.pruned, seq_len, k_all.device)
                k_all, v_all = k_all[live], v_all[live]
            o_rows[:] = exact_prefill_attention(q_i, k_all, v_all).to(o_rows.dtype)
            self._seed_after_exact(comp, opts, q_i, k_all, seq_len, live, rid, turn=state.turn_tokens)
            if stats is not None:
                stats.add_prefill(causal, causal, sparse=False)
                stats.seeded_from = comp.seeded_from
            return
        pattern = opts.method if opts.method in PREFILL_PATTERNS else "loopserve"
        out, st = sparse_prefill_attention(
            q_i, k_all, v_all, alpha=opts.alpha, q_window=opts.q_window,
            block_size=self.config.block_size, sink=opts.sink, kernel=self.kernel, return_stats=True,
            pattern=pattern, budget=opts.decode_budget, max_density=self.gates.prefill_max_density)
        o_rows[:] = out.to(o_rows.dtype)
        if st.nonfinite:  # served exactly; the turn decodes exactly too
            state.nonfinite = True
            self._count_nonfinite(stats)
            comp.seed(None, seq_len)
        elif pattern == "loopserve":
            self.dense_layers.observe(layer.layer_id, st.planned_density, seq_len, opts.alpha)
            self._seed_after_exact(comp, opts, q_i, k_all, seq_len, estimate=st.key_scores,
                                   turn=state.turn_tokens)
            self.store.importance(rid).observe_columns(st.key_scores[:, :seq_len])
        else:  # a prefill pattern: decoding reads everything
            self._seed_after_exact(comp, opts, q_i, k_all, seq_len)
        select_s = sum(st.timings.get(stage, 0.0) for stage in ("estimate", "select", "index"))
        if stats is not None:
            stats.add_prefill(st.density * causal, causal, sparse=st.kernel != "exact", select_s=select_s)
            stats.seeded_from = comp.seeded_from
        if self.metrics is not None:
            self.metrics.observe_prefill(st.density, select_s)

    @staticmethod
    def _count_nonfinite(stats) -> None:
        fault_stats.nonfinite_exact_layers += 1
        if stats is not None:
            stats.nonfinite_exact_layers += 1

    def _run_base(self, decode, q, k, v, layer, fb, save_kv_cache, taken):
        """The base backend's output for every request LoopServe does not ``take``.

        With a torch-native base, only those requests run on it (exactly as
        stock would run them).  Other bases run the whole batch, and LoopServe
        overwrites its own requests' rows afterwards, unless LoopServe takes
        every request: then the base is skipped and only the KV is written.
        """
        whole = self.base.forward_decode if decode else self.base.forward_extend
        rest = [i for i in range(len(fb.rids)) if i not in taken]
        if not taken or (rest and not self._base_subsets):
            return whole(q, k, v, layer, fb, save_kv_cache=save_kv_cache)
        if save_kv_cache:
            self._save_kv(layer, fb, k, v)
        o = q.new_empty(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        if rest:
            (self._decode_subset_on_base if decode else self._extend_subset_on_base)(q, o, layer, fb, rest)
        return o

    def _decode_subset_on_base(self, q, o, layer, fb, idx):
        """Stock torch-native decode attention for the requests ``idx`` of the batch."""
        sel = torch.tensor(idx, device=fb.seq_lens.device)
        o_sub = torch.empty_like(q[sel]).view(len(idx), layer.tp_q_head_num, -1)
        self.base._run_sdpa_forward_decode(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)[sel], o_sub,
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
            fb.req_pool_indices[sel], fb.seq_lens[sel], None, scaling=layer.scaling,
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num, causal=False)
        o.view(-1, layer.tp_q_head_num, layer.v_head_dim)[sel] = o_sub

    def _extend_subset_on_base(self, q, o, layer, fb, idx):
        """Stock torch-native attention for the requests ``idx`` of the batch."""
        starts = _token_starts(fb.extend_seq_lens_cpu)
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=q.device) for i in idx])
        sel = torch.tensor(idx, device=fb.seq_lens.device)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)[rows]
        o_sub = torch.empty_like(q_)
        self.base._run_sdpa_forward_extend(
            q_, o_sub, self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), self.req_to_token_pool.req_to_token,
            fb.req_pool_indices[sel], fb.seq_lens[sel], fb.extend_prefix_lens[sel], fb.extend_seq_lens[sel],
            None, scaling=layer.scaling, enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
            causal=True)
        o.view(-1, layer.tp_q_head_num, layer.v_head_dim)[rows] = o_sub

    # ---------------------------------------------------------------- decode
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        fb = forward_batch
        rids = fb.rids or []
        seq_lens = fb.seq_lens_cpu.tolist()
        q_ = self._scaled(q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim), layer)
        comps, sparse = {}, {}  # i -> compressor, i -> (flat positions, count per KV head)
        nonfinite = None  # rows of the batch whose query or new key holds NaN/Inf (looked at once)
        for i, rid in enumerate(rids):
            req = _request(rid)
            opts = options_of(rid, self.config)
            if not opts.enabled or req is None or req.finished():
                continue
            state = self.store.get(rid) or self.store.new_turn(rid, opts)
            rows = None
            try:
                if not failed(req):
                    self.fault_hook.check("decode", rid)
                    if state.base_decode is None:  # once per turn, at its first step: every layer agrees
                        min_len = self.gates.decode_min_len if opts.decode_min_len is None else opts.decode_min_len
                        state.base_decode = (opts.method == "loopserve" and state.pruned is None and not decode_pays(
                            seq_lens[i], opts.decode_budget, opts.decode_query_blocks, float(opts.decode_max_read),
                            min_len=min_len))
                    if state.base_decode:
                        self._observe_read(rid, seq_lens[i], seq_lens[i])
                        if self._exact_on_kernel(opts, seq_lens[i]):
                            if nonfinite is None:
                                nonfinite = _nonfinite_rows(q_, k)
                            if i not in nonfinite:  # else stock's path, as it would have run
                                sparse[i] = every_position(seq_lens[i], layer.tp_k_head_num, q.device)
                        continue
                    if nonfinite is None:
                        nonfinite = _nonfinite_rows(q_, k)
                    state.nonfinite = state.nonfinite or i in nonfinite
                    if state.nonfinite:  # exactly from here on, as stock
                        self._count_nonfinite(self._observe_read(rid, seq_lens[i], seq_lens[i]))
                    else:
                        comp = comps[i] = state.compressor(layer.layer_id, self.num_layers)
                        rows = comp.attended(seq_lens[i], q_[i], self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                                             self.req_to_token_pool.req_to_token[fb.req_pool_indices[i]])
            except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the server
                fail_request(req, rid, exc)
            if failed(req) or state.nonfinite:  # exactly: the base, or every position it holds
                comps.pop(i, None)
                if state.pruned is not None:
                    sparse[i] = without_positions(None, state.pruned, seq_lens[i], layer.tp_k_head_num)
                continue
            # A compressing turn that still reads everything (a full seed) also runs on the kernel.
            read_all = (rows is None and self._full_reads_through_kernel and not comp.fixed
                        and opts.decode_budget < seq_lens[i])
            if state.pruned is not None:  # never read a pruned position's (padding) slot
                rows = without_positions(rows, state.pruned, seq_lens[i], layer.tp_k_head_num)
            elif read_all:
                rows = every_position(seq_lens[i], layer.tp_k_head_num, q.device)
            if rows is not None and (read_all or sum(rows[1]) < seq_lens[i] * len(rows[1])):
                sparse[i] = rows

        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = self._run_base(True, q, k, v, layer, fb, save_kv_cache, taken=set(sparse))
        if sparse:
            try:
                self._decode_selected(q_, o, layer, fb, sparse, seq_lens)
            except Exception:  # noqa: BLE001 - find the request it failed on, serve the others
                self._decode_selected_one_by_one(q_, o, layer, fb, sparse, seq_lens)
        self._record(q_, layer, fb, comps, sparse, seq_lens)
        return o

    def _exact_on_kernel(self, opts: LoopServeConfig, cached: int) -> bool:
        """Whether a turn that decodes exactly reads every position through the decode kernel
        (``Gates.exact_decode_min_len``) rather than on the base path; keep-everything requests
        stay on the base path, bit for bit."""
        return (self._full_reads_through_kernel and cached >= self.gates.exact_decode_min_len
                and not opts.keeps_everything(model_context()))

    def _decode_selected_one_by_one(self, q_, o, layer, fb, sparse, seq_lens):
        """The batched call failed: each request alone; one that fails again is served exactly
        (``_exact_rows``) and finished with an error."""
        for i in sorted(sparse):
            try:
                self._decode_selected(q_, o, layer, fb, {i: sparse[i]}, seq_lens)
            except Exception as exc:  # noqa: BLE001
                fail_request(_request(fb.rids[i]), fb.rids[i], exc)
                o.view(-1, layer.tp_q_head_num, layer.v_head_dim)[i] = self._exact_rows(
                    q_[i:i + 1], layer, fb, i)[0].to(o.dtype)

    def _decode_selected(self, q_, o, layer, fb, sparse, seq_lens):
        """Attention of the compressed requests over their selections, one batched call.

        Runs every layer of every step: the CSR is built from Python ints and one
        ``cat`` (a dozen tiny tensor ops cost more here than the kernel's setup)."""
        order = sorted(sparse)
        counts = [c for i in order for c in sparse[i][1]]
        indptr = torch.tensor([0] + list(itertools.accumulate(counts)), device=q_.device)
        positions = torch.cat([sparse[i][0] for i in order]) if len(order) > 1 else sparse[order[0]][0]
        width = max(seq_lens[i] for i in order)
        table = self.req_to_token_pool.req_to_token
        if len(order) > 1:
            slots = table[fb.req_pool_indices[order].long(), :width]
        else:  # a view, not a copy: the indexed copy took 5% of a decode step's time in the server
            row = int(fb.req_pool_indices[order[0]])
            slots = table[row:row + 1, :width]
        sel = order if len(order) > 1 else slice(order[0], order[0] + 1)
        out = batched_decode_attention(
            q_[sel], self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id), slots, indptr, positions,
            method=self.gates.decode_kernel)
        o.view(-1, layer.tp_q_head_num, layer.v_head_dim)[sel] = out.to(o.dtype)

    def _observe_read(self, rid, attended, cached):
        """A decode step's read into the request's stats and the metrics; the stats, or None."""
        stats = request_stats(rid)
        if stats is not None:
            stats.add_decode(attended, cached)
        if self.metrics is not None:
            self.metrics.observe_decode(attended, cached)
        return stats

    def _record(self, q_, layer, fb, comps, sparse, seq_lens):
        """Feed each request's query to its compressor; re-select where due."""
        for i, comp in comps.items():
            try:
                self._record_one(q_, layer, fb, i, comp, sparse, seq_lens)
            except Exception as exc:  # noqa: BLE001 - this step's output is already right
                fail_request(_request(fb.rids[i]), fb.rids[i], exc)

    def _record_one(self, q_, layer, fb, i, comp, sparse, seq_lens):
        rid = fb.rids[i]
        stats = self._observe_read(rid, sum(sparse[i][1]) / len(sparse[i][1]) if i in sparse else seq_lens[i],
                                   seq_lens[i])
        if comp.record(q_[i].clone()):
            t = time.perf_counter()
            slots = self.req_to_token_pool.req_to_token[int(fb.req_pool_indices[i]), :seq_lens[i]]
            comp.reselect_from(self.token_to_kv_pool.get_key_buffer(layer.layer_id), slots)
            dt = time.perf_counter() - t
            self.store.importance(rid).observe_selection(comp.selection, comp.selection_mass)
            if stats is not None:
                stats.reselections += 1
                stats.select_time_s += dt
            if self.metrics is not None:
                self.metrics.observe_reselection(dt)
