"""The SGLang plugin (entry point group ``sglang.srt.plugins``): ``--enable-loopserve``.

SGLang runs ``register()`` in every one of its processes (launcher/HTTP server,
scheduler, detokenizer) and then applies the hooks registered here.  No file
of SGLang is edited.  What each hook does:

* launcher: ``ServerArgs.add_cli_args`` gains the ``--loopserve-*`` flags (so
  ``--help`` lists them); ``prepare_server_args`` validates them, disables
  decode CUDA graphs for LoopServe on a GPU, and hands the resolved settings to
  the child processes through ``SGLANG_LOOPSERVE_CONFIG``.
* launcher: ``SamplingParams.verify`` checks ``custom_params["loopserve"]``, so
  a bad per-request value is a 400 naming the field.
* scheduler: ``_build_resolved_backend`` wraps the attention backend SGLang
  resolved (torch-native on the CPU, FlashInfer/Triton on a GPU) in
  ``LoopServeAttnBackend``; ``Req.__init__`` attaches the request's settings
  and stats; ``release_kv_cache`` frees its decode state (finish, abort,
  retraction); the output streamer puts the stats into ``meta_info["loopserve"]``;
  ``/server_info`` reports the backend's state, the KV pool and the radix
  tree's counters;
* HTTP server: the OpenAI chat and completion responses, streamed or not,
  carry the same stats in ``sglext.loopserve`` (``srt/openai_stats.py``);
* scheduler: ``default_radix_cache_factory`` builds LoopServe's radix cache
  under ``--radix-eviction-policy loopserve`` (``srt/radix_cache.py``); the
  policy is a choice of that flag in every process, and asking for it without
  ``--enable-loopserve`` (or with a cache it cannot use) stops the launch.

Without ``--enable-loopserve`` every hook returns at once: SGLang is stock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pkgutil
from dataclasses import dataclass, fields

from ..config import (CONFIG_ENV, FLAGS, REQUEST_KEY, LoopServeConfig, LoopServeConfigError,
                     request_field_name)
from .platform import check_cpu_tensor_parallel, cpu_rank_environment
from .radix import POLICY as RADIX_POLICY

logger = logging.getLogger(__name__)

# Where the hooks attach (checked at start-up: a missing one stops the launch).
T_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
T_PREPARE = "sglang.srt.server_args.prepare_server_args"
T_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
T_BUILD_BACKEND = ("sglang.srt.model_executor.model_runner_components.attention_backend_setup."
                   "_build_resolved_backend")
T_REQ_INIT = "sglang.srt.managers.schedule_batch.Req.__init__"
T_RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
T_STREAM = ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
            "_stream_output_generation")
T_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
T_GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
T_INTERNAL_STATE = ("sglang.srt.managers.scheduler_components.internal_state."
                    "SchedulerInternalStateController.get_internal_state")
T_SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
T_TREE_CACHE = "sglang.srt.mem_cache.registry.default_radix_cache_factory"
T_DP_LOOP = "sglang.srt.managers.data_parallel_controller.DataParallelController.event_loop"
T_CHAT_RESPONSE = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._build_chat_response"
T_CHAT_STREAM = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._generate_chat_stream"
T_COMPLETION_RESPONSE = ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion."
                         "_build_completion_response")
T_COMPLETION_STREAM = ("sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion."
                       "_generate_completion_stream")
OPENAI_TARGETS = (T_GENERATE, T_CHAT_RESPONSE, T_CHAT_STREAM, T_COMPLETION_RESPONSE, T_COMPLETION_STREAM)
SCHEDULER_TARGETS = (T_BUILD_BACKEND, T_REQ_INIT, T_RELEASE, T_STREAM, T_INTERNAL_STATE, T_TREE_CACHE)
ALL_TARGETS = ((T_ADD_CLI_ARGS, T_PREPARE, T_VERIFY, T_META, T_SCHEDULER_INIT, T_DP_LOOP) + SCHEDULER_TARGETS
               + OPENAI_TARGETS)

_DEFAULTS = LoopServeConfig()
_TYPES = {"alpha": float, "decode_pyramid": float, "decode_max_read": float, "prefill_max_density": float,
          "method": str, "decode_seed": str, "decode_pooling": str, "decode_kernel": str, "calibration": str}


@dataclass(frozen=True)
class LaunchSettings:
    """What the launcher hands to its children (JSON in ``SGLANG_LOOPSERVE_CONFIG``)."""

    config: LoopServeConfig
    enable_metrics: bool = False

    def to_env(self) -> str:
        return json.dumps({"config": json.loads(self.config.to_json()),
                           "enable_metrics": self.enable_metrics})

    @classmethod
    def from_env(cls) -> "LaunchSettings | None":
        text = os.environ.get(CONFIG_ENV)
        if not text:
            return None
        data = json.loads(text)
        return cls(LoopServeConfig(**data["config"]).validated(), bool(data.get("enable_metrics")))


_settings_cache: list = []


def launch_settings() -> LaunchSettings | None:
    """This process's settings (``None``: LoopServe is off)."""
    if not _settings_cache:
        _settings_cache.append(LaunchSettings.from_env())
    return _settings_cache[0]


# ---------------------------------------------------------------- CLI flags
def add_flags(parser: argparse.ArgumentParser) -> None:
    from ..attention.sparse_prefill import SHARP_BELOW, SHARP_MISS

    group = parser.add_argument_group(
        "LoopServe", "Sparse prefill over cached history and progressive decode KV compression "
                     "for long multi-turn conversations (sglang-loopserve).")
    group.add_argument(FLAGS["enabled"], action="store_true",
                       help="Serve with LoopServe: sparse prefill and decode KV selection.")
    helps = {
        "method": "What this backend serves: loopserve, or a baseline at the same budgets (full, snapkv, "
                  "adakv, streaming_llm; a_shape, tri_shape, minference: static prefill patterns).",
        "alpha": "Prefill: share of the estimated attention mass the kept lines cover, in (0, 1]; a layer "
                 f"planned under {SHARP_BELOW * 100:.0f}%% of the pairs covers 1 - (1 - ALPHA) x {SHARP_MISS:g}.",
        "q_window": "Prefill: last queries of a turn sampled to estimate attention (plus as many "
                    "spread over the turn).",
        "block_size": "Prefill: block size of the block-sparse kernel (power of two >= 16).",
        "min_prefill_len": "Prefill: shorter sequences (cached + new tokens), and forwards of fewer new "
                           "tokens than a block, run exact attention.",
        "prefill_max_density": "Prefill: a plan computing at least this share of the pairs runs exact "
                               "attention instead.",
        "decode_budget": "Decode: cached tokens per KV head a re-selection keeps (each step also reads "
                         "its own DECODE_QUERY_BLOCKS x 8).",
        "decode_interval": "Decode: re-select the attended tokens every this many generated tokens.",
        "decode_window": "Decode: latest generated queries that score the cached tokens.",
        "decode_max_interval": "Decode: while consecutive re-selections agree (70%% of the mass on held "
                               "positions), the interval doubles, up to this.",
        "decode_seed": "Decode: what a turn reads before its first re-selection: auto (a short turn: what "
                       "its queries attend to most; a long one: everything), estimate, last_queries or full.",
        "decode_first_interval": "Decode: tokens from a turn's start to its first re-selection (with seed "
                                 "full: how long it reads everything).",
        "decode_pooling": "Decode: how a re-selection's window scores the cache: bounds (mean query ranks "
                          "blocks, each query scores candidates), all (mean only) or none (each query only).",
        "decode_query_blocks": "Decode: key blocks of 8 tokens each step's own query adds to the selection, "
                               "ranked by their key summaries; 0: the selection only.",
        "decode_pyramid": "Decode: slope of the query blocks over depth, in [0, 1): the first layer reads "
                          "1 + SLOPE times DECODE_QUERY_BLOCKS, the last 1 - SLOPE times.",
        "decode_max_read": "Decode: a turn compresses only where each step would read at most this share "
                           "of its cache, else decodes exactly; 1: wherever the selection is smaller.",
        "decode_min_len": "Decode: a turn over fewer cached tokens decodes exactly on the base path.",
        "decode_kernel": "Decode: the compressed step's attention kernel: auto (measured), tensor, loops or fused.",
        "exact_decode_min_len": "Decode on a CPU: a turn decoding exactly over at least this many cached tokens "
                                "reads every position through the decode kernel, not the base path.",
        "calibration": "Where unset gates come from: auto (this machine's measurement, cached; measured at "
                       "start-up where none is), measure (measure again) or off (defaults no measured "
                       "machine lost at).",
        "sink": "First tokens always kept (prefill columns and decode selection).",
        "recent": "Decode: last tokens always kept.",
    }
    measured = "measured on this machine (python -m sglang_loopserve.calibrate)"
    shown = {"min_prefill_len": measured, "prefill_max_density": measured, "decode_min_len": measured,
             "exact_decode_min_len": measured}
    for f in fields(LoopServeConfig):
        if f.name == "enabled":
            continue
        default = getattr(_DEFAULTS, f.name)
        group.add_argument(FLAGS[f.name], type=_TYPES.get(f.name, int), default=default,
                           metavar=f.name.upper(),
                           help=f"{helps[f.name]} Default: {shown.get(f.name, default)}.")


def parse_flags(argv) -> LoopServeConfig:
    """The ``--loopserve-*`` settings in ``argv``; exits (status 2) naming a bad flag."""
    parser = argparse.ArgumentParser(prog="sglang serve", add_help=False)
    add_flags(parser)
    ns, _ = parser.parse_known_args(argv)
    values = {f.name: getattr(ns, FLAGS[f.name].lstrip("-").replace("-", "_"))
              for f in fields(LoopServeConfig)}
    try:
        return LoopServeConfig(**values).validated(lambda field: FLAGS[field])
    except LoopServeConfigError as exc:
        parser.error(str(exc))


def _check_targets() -> None:
    missing = []
    for target in ALL_TARGETS:
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{target} ({exc})")
    if missing:
        raise SystemExit("--enable-loopserve: this SGLang lacks what LoopServe hooks into: "
                         + "; ".join(missing))


def _on_add_cli_args(result, parser):
    add_flags(parser)


def _around_prepare_server_args(original, argv, *args, **kwargs):
    server_args = _prepare_server_args(original, argv, *args, **kwargs)
    check_cpu_tensor_parallel(server_args)
    ranks_env = cpu_rank_environment(server_args)
    if ranks_env:  # spawned ranks inherit it; the same for stock and LoopServe servers
        os.environ.update(ranks_env)
        logger.info("LoopServe CPU platform: %s", " ".join(f"{k}={v}" for k, v in ranks_env.items()))
    return server_args


def _prepare_server_args(original, argv, *args, **kwargs):
    config = parse_flags(argv)
    if not config.enabled:
        os.environ.pop(CONFIG_ENV, None)
        _settings_cache.clear()
        server_args = original(argv, *args, **kwargs)
        if getattr(server_args, "radix_eviction_policy", None) == RADIX_POLICY:
            raise SystemExit(f"--radix-eviction-policy {RADIX_POLICY} needs --enable-loopserve: it prunes "
                             f"the KV that LoopServe's attention scored (and masks)")
        return server_args
    _check_targets()
    argv = list(argv)
    server_args = original(argv, *args, **kwargs)
    _check_radix_policy(server_args)
    if server_args.device not in (None, "cpu"):
        server_args = _eager_attention(original, argv, server_args, *args, **kwargs)
    settings = LaunchSettings(config, bool(getattr(server_args, "enable_metrics", False)))
    os.environ[CONFIG_ENV] = settings.to_env()  # spawned children inherit it
    _settings_cache.clear()
    from .openai_stats import add_sglext_field

    add_sglext_field()  # this process serves the OpenAI endpoints
    logger.info("LoopServe enabled: %s", config)
    return server_args


def _check_radix_policy(server_args) -> None:
    """``--radix-eviction-policy loopserve`` needs the radix cache LoopServe builds; stop the launch
    where SGLang would build another one."""
    if getattr(server_args, "radix_eviction_policy", None) != RADIX_POLICY:
        return
    conflicts = [flag for flag, on in (
        ("--disable-radix-cache", getattr(server_args, "disable_radix_cache", False)),
        ("--enable-hierarchical-cache", getattr(server_args, "enable_hierarchical_cache", False)),
        ("--enable-lmcache", getattr(server_args, "enable_lmcache", False)),
        ("--radix-cache-backend", bool(getattr(server_args, "radix_cache_backend", None))),
        ("--speculative-algorithm", bool(getattr(server_args, "speculative_algorithm", None))),
        ("--page-size > 1", (getattr(server_args, "page_size", 1) or 1) > 1),
        ("--enable-mixed-chunk", getattr(server_args, "enable_mixed_chunk", False)),
        ("--disaggregation-mode", getattr(server_args, "disaggregation_mode", "null") not in (None, "null")),
        ("--pp-size > 1", (getattr(server_args, "pp_size", 1) or 1) > 1),
    ) if on]
    if conflicts:
        raise SystemExit(f"--radix-eviction-policy {RADIX_POLICY} cannot run with {', '.join(conflicts)}: "
                         f"it needs the Python tree core of SGLang's unified radix cache, page size 1 "
                         f"and LoopServe's attention reading every pruned row (under pipeline parallelism a stage "
                         f"would score its own layers only)")
    logger.info("LoopServe: --radix-eviction-policy %s selects the Python radix tree core", RADIX_POLICY)


def graph_backends(server_args) -> dict[str, str | None]:
    """The CUDA-graph backend asked for each phase (``--cuda-graph-config`` JSON wins over
    ``--cuda-graph-backend-{decode,prefill}``); None where SGLang's default applies."""
    config = getattr(server_args, "cuda_graph_config", None)
    out = {}
    for phase in ("decode", "prefill"):
        part = config.get(phase) if isinstance(config, dict) else getattr(config, phase, None)
        from_json = part.get("backend") if isinstance(part, dict) else getattr(part, "backend", None)
        out[phase] = from_json or getattr(server_args, f"cuda_graph_backend_{phase}", None)
    if getattr(server_args, "disable_cuda_graph", False):
        out = {phase: out[phase] or "disabled" for phase in out}
    return out


def _eager_attention(original, argv, server_args, *args, **kwargs):
    """LoopServe's attention has per-request, data-dependent shapes and Python-side
    state, so it must run outside CUDA graphs: decode graphs are turned off; prefill
    graphs may be SGLang's default ``breakable`` (attention runs eagerly between the
    graph's pieces) or ``disabled``, never ``full`` (attention captured)."""
    asked = graph_backends(server_args)
    if asked["decode"] != "disabled":
        if "--cuda-graph-config" in " ".join(argv) and asked["decode"] is not None:
            raise SystemExit("--enable-loopserve needs decode CUDA graphs off: set the decode backend of "
                             "--cuda-graph-config to \"disabled\"")
        server_args = original(list(argv) + ["--cuda-graph-backend-decode", "disabled"], *args, **kwargs)
        logger.info("LoopServe: decode CUDA graphs disabled (--cuda-graph-backend-decode disabled)")
    if graph_backends(server_args)["prefill"] == "full":
        raise SystemExit("--enable-loopserve cannot run under a full prefill CUDA graph "
                         "(--cuda-graph-backend-prefill full): use breakable or disabled")
    return server_args


# ------------------------------------------------------- per-request params
def request_options(custom_params, config: LoopServeConfig) -> LoopServeConfig:
    """``config`` with a request's ``custom_params["loopserve"]`` applied (validated)."""
    values = (custom_params or {}).get(REQUEST_KEY) if isinstance(custom_params, dict) else None
    if values is None:
        return config
    return config.override(values, request_field_name)


def _after_verify(result, sampling_params, *args, **kwargs):
    settings = launch_settings()
    if settings is not None:
        request_options(sampling_params.custom_params, settings.config)  # raises -> HTTP 400


def _after_req_init(result, req, *args, **kwargs):
    settings = launch_settings()
    if settings is None:
        return
    from .request_state import RequestStats, live_requests

    try:
        options = request_options(getattr(req.sampling_params, "custom_params", None), settings.config)
    except LoopServeConfigError:  # verified by the tokenizer; never expected here
        logger.exception("LoopServe: request %s has invalid settings; using the server's", req.rid)
        options = settings.config
    req.loopserve_options = options
    req.loopserve_stats = RequestStats(enabled=options.enabled, method=options.method)
    live_requests[req.rid] = req
    namespace = cache_namespace(options)
    if namespace:
        # KV computed with approximate attention must not be reused by a request
        # that asked for exact attention (or other settings): SGLang scopes the
        # radix tree by extra_key (as it does for LoRA and elastic EP).
        req.extra_key = f"{req.extra_key}|{namespace}" if req.extra_key else namespace


def cache_namespace(options: LoopServeConfig) -> str | None:
    """The radix-cache namespace of a request's KV: ``None`` (stock's) when its attention is exact
    (LoopServe disabled, or alpha 1 with a decode budget above the model's context); else one per
    method and settings: every field but ``enabled`` changes the attention, so the KV (a baseline's
    generated tokens carry KV of its own attention)."""
    from .request_state import model_context

    if options.keeps_everything(model_context()):
        return None
    o = options
    return (f"loopserve({o.method},a={o.alpha},q={o.q_window},b={o.block_size},m={o.min_prefill_len},s={o.sink},"
            f"B={o.decode_budget},i={o.decode_interval},w={o.decode_window},I={o.decode_max_interval},"
            f"seed={o.decode_seed},fi={o.decode_first_interval},pool={o.decode_pooling},"
            f"qb={o.decode_query_blocks},pyr={o.decode_pyramid},mr={o.decode_max_read},ml={o.decode_min_len},"
            f"r={o.recent})")


# ------------------------------------------------------------------ backend
def _around_build_backend(original, *args, model_runner, resolved, **kwargs):
    backend = original(*args, model_runner=model_runner, resolved=resolved, **kwargs)
    settings = launch_settings()
    if settings is None or getattr(resolved, "is_draft_override", False):
        return backend
    from .backend import LoopServeAttnBackend
    from .metrics import LoopServeMetrics

    metrics = LoopServeMetrics() if settings.enable_metrics else None
    logger.info("LoopServe: wrapping %s", type(backend).__name__)
    return LoopServeAttnBackend(model_runner, backend, settings.config, metrics=metrics)


def _after_scheduler_init(result, scheduler, *args, **kwargs):
    """Fail the launch if LoopServe was asked for but is not in place."""
    if launch_settings() is None:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry

    from .backend import LoopServeAttnBackend

    from .radix import stats as radix_stats

    radix_stats.policy = getattr(scheduler.server_args, "radix_eviction_policy", None) or "lru"
    missing = [t for t in SCHEDULER_TARGETS if t not in HookRegistry._patched]
    backend = getattr(getattr(getattr(scheduler, "tp_worker", None), "model_runner", None), "attn_backend", None)
    if missing or not isinstance(backend, LoopServeAttnBackend):
        raise RuntimeError(f"--enable-loopserve: LoopServe is not installed in the scheduler "
                           f"(hooks not applied: {missing or 'none'}; attention backend: "
                           f"{type(backend).__name__}); refusing to serve stock attention")


def _after_release(result, req, *args, **kwargs):
    if launch_settings() is None:
        return
    from .request_state import store

    store.drop(req.rid)


# -------------------------------------------------------------------- stats
def _before_stream(streamer, reqs, *args, **kwargs):
    if launch_settings() is None:
        return None
    for req in reqs:
        stats = getattr(req, "loopserve_stats", None)
        if stats is None:
            continue
        if req.customized_info is None:
            req.customized_info = {}
        # A per-token value: SGLang slices it to each emitted chunk (a
        # request-level one would reach a streaming client with its first
        # chunk only), so every slot holds the current summary.
        summary = stats.summary()
        req.customized_info[REQUEST_KEY] = [summary] * max(len(req.output_ids), 1)
    return None


def _after_meta_info(result, manager, meta_info, state, *args, **kwargs):
    value = meta_info.get(REQUEST_KEY)
    if isinstance(value, list):
        # Accumulated per-token values; the latest is the request's summary.
        latest = next((v for v in reversed(value) if v is not None), None)
        if latest is None:
            meta_info.pop(REQUEST_KEY)
        else:
            meta_info[REQUEST_KEY] = latest


def _around_generate_request(original, manager, obj, *args, **kwargs):
    outputs = original(manager, obj, *args, **kwargs)
    from .openai_stats import record_outputs, stream_sink

    sink = stream_sink(obj)  # set by an OpenAI stream only
    return outputs if sink is None else record_outputs(outputs, sink)


def _after_build_response(result, serving, request, ret, *args, **kwargs):
    if launch_settings() is None:
        return None
    from .openai_stats import with_stats

    return with_stats(result, ret)


def _stream_hook(chunk_model: str):
    """An AROUND hook for an OpenAI streaming generator whose chunks are ``protocol.<chunk_model>``."""
    def around(original, serving, adapted_request, request, *args, **kwargs):
        chunks = original(serving, adapted_request, request, *args, **kwargs)
        if launch_settings() is None:
            return chunks
        from sglang.srt.entrypoints.openai import protocol

        from .openai_stats import stream_with_stats

        return stream_with_stats(chunks, adapted_request, request, getattr(protocol, chunk_model))

    return around


def _after_internal_state(result, controller, *args, **kwargs):
    if launch_settings() is None:
        return
    from sglang.srt.runtime_context import get_parallel

    from .backend import serving_gates
    from .faults import stats as fault_stats
    from .radix import stats as radix_stats
    from .request_state import store

    scheduler = controller.scheduler
    tracked = len(store)
    store.drop_missing()
    result.internal_state[REQUEST_KEY] = {
        # SGLang lists its ranks' states in the order they answer, without a rank: this one's
        "dp_rank": get_parallel().dp_rank or 0,
        "tracked_requests": tracked,
        "stale_requests": tracked - len(store),  # tracked after SGLang let them go: a leak if > 0
        "kv_available_tokens": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "kv_evictable_tokens": int(scheduler.tree_cache.evictable_size()),
        "radix": radix_stats.as_dict(),
        "faults": fault_stats.as_dict(),
        "idle_check": idle_check(scheduler),
        "gates": dict(serving_gates) or None,  # where LoopServe's paths pay here (calibrate)
    }


#: How long the data-parallel controller waits for a request before it looks again (it wakes on
#: the first one at once).
DP_IDLE_POLL_MS = 100


def _around_dp_event_loop(original, controller, *args, **kwargs):
    """``--sleep-on-idle`` for SGLang's data-parallel controller: its loop polls the tokenizer's
    socket without ever waiting, a whole core taken on a machine with two (the ranks then ran on
    one); here it waits on the socket (``zmq.Poller``), then dispatches as SGLang's loop does."""
    if not getattr(controller.server_args, "sleep_on_idle", False):
        return original(controller, *args, **kwargs)
    import zmq
    from sglang.srt.managers import data_parallel_controller as dpc

    poller = zmq.Poller()
    poller.register(controller.recv_from_tokenizer, zmq.POLLIN)
    while True:
        poller.poll(DP_IDLE_POLL_MS)
        while True:
            controller.soft_watchdog.feed()
            try:
                request = dpc.sock_recv(controller.recv_from_tokenizer, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            controller._request_dispatcher(request)


def idle_check(scheduler) -> dict | None:
    """SGLang's own idle invariants (``invariant_checker``: every KV token available, evictable
    or protected; every request slot free; the radix tree's ``sanity_check``), checked now when
    the scheduler is idle; None while it runs requests."""
    if not scheduler.is_fully_idle() or scheduler.waiting_queue:
        return None
    tree = scheduler.tree_cache
    protected = int(tree.protected_size()) if hasattr(tree, "protected_size") else 0
    kv = {"total": int(scheduler.max_total_num_tokens),
          "available": int(scheduler.token_to_kv_pool_allocator.available_size()),
          "evictable": int(tree.evictable_size()), "protected": protected}
    slots = scheduler.req_to_token_pool
    slot_total = slots.size + getattr(slots, "pre_alloc_size", 0)
    sanity = "not offered by this cache"
    if hasattr(tree, "sanity_check"):
        try:
            tree.sanity_check()
            sanity = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the server serves on
            sanity = f"{type(exc).__name__}: {exc}"[:2000]
    return {"kv": kv, "kv_balanced": kv["available"] + kv["evictable"] + kv["protected"] == kv["total"],
            "req_slots_free": len(slots.free_slots), "req_slots_total": slot_total,
            "radix_sanity": sanity}


def _around_tree_cache(original, ctx, *args, **kwargs):
    """``--radix-eviction-policy loopserve``: LoopServe's radix cache (``srt/radix.py``)."""
    from sglang.srt.runtime_context import get_memory

    if get_memory().radix_eviction_policy != RADIX_POLICY:
        return original(ctx, *args, **kwargs)
    if launch_settings() is None:
        raise RuntimeError(f"--radix-eviction-policy {RADIX_POLICY} needs --enable-loopserve")
    from .request_state import store
    from .radix_cache import build_cache

    cache = build_cache(ctx)
    cache.importance_of = store.importance_scores
    cache.pruned_row = store.set_pruned
    store.importance_wanted = True
    return cache


# ------------------------------------------------------------------ entry point
def register() -> None:
    """Entry point: register the hooks (applied by SGLang right after)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .radix import register_policy

    register_policy()  # a choice of --radix-eviction-policy in every process (--help lists it)
    hooks = [
        (T_ADD_CLI_ARGS, _on_add_cli_args, HookType.AFTER),
        (T_PREPARE, _around_prepare_server_args, HookType.AROUND),
        (T_VERIFY, _after_verify, HookType.AFTER),
        (T_BUILD_BACKEND, _around_build_backend, HookType.AROUND),
        (T_SCHEDULER_INIT, _after_scheduler_init, HookType.AFTER),
        (T_REQ_INIT, _after_req_init, HookType.AFTER),
        (T_RELEASE, _after_release, HookType.AFTER),
        (T_STREAM, _before_stream, HookType.BEFORE),
        (T_META, _after_meta_info, HookType.AFTER),
        (T_INTERNAL_STATE, _after_internal_state, HookType.AFTER),
        (T_TREE_CACHE, _around_tree_cache, HookType.AROUND),
        (T_DP_LOOP, _around_dp_event_loop, HookType.AROUND),
        (T_GENERATE, _around_generate_request, HookType.AROUND),
        (T_CHAT_RESPONSE, _after_build_response, HookType.AFTER),
        (T_COMPLETION_RESPONSE, _after_build_response, HookType.AFTER),
        (T_CHAT_STREAM, _stream_hook("ChatCompletionStreamResponse"), HookType.AROUND),
        (T_COMPLETION_STREAM, _stream_hook("CompletionStreamResponse"), HookType.AROUND),
    ]
    for target, fn, kind in hooks:
        HookRegistry.register(target, fn, kind)
