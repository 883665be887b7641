"""LoopServe's settings: one dataclass for the server flags and the per-request overrides.

The server-wide values come from ``--loopserve-*`` flags (``srt/plugin.py``); a
request may override some of them with ``custom_params={"loopserve": {...}}``.
Both go through ``LoopServeConfig.validated``, so a bad value is reported the
same way, naming the flag (start-up) or the field (HTTP 400).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields

#: Environment variable carrying the launcher's resolved config (JSON) to the
#: scheduler and detokenizer processes, which SGLang spawns with a fresh argv.
CONFIG_ENV = "SGLANG_LOOPSERVE_CONFIG"

#: Key of the per-request object inside ``custom_params``.
REQUEST_KEY = "loopserve"

#: What the LoopServe backend serves (``method``): LoopServe, or a baseline at the same budgets.
#: ``full``: exact attention through this backend; ``snapkv``: one selection from the prompt's
#: last window, kept for the whole answer; ``adakv``: SnapKV's scores with the budget shared
#: across a layer's KV heads; ``streaming_llm``: the first ``sink`` and the latest tokens.  The
#: baselines prefill exactly (their papers compress the KV for decoding).  ``a_shape``,
#: ``tri_shape`` and ``minference``: static prefill patterns (``attention.patterns``, about
#: ``decode_budget`` keys per query, on every forward of a block or more), exact decoding.
METHODS = ("loopserve", "full", "snapkv", "adakv", "streaming_llm", "a_shape", "tri_shape", "minference")
#: The methods that compress the prefill with a static pattern (decode reads everything).
PREFILL_PATTERNS = ("a_shape", "tri_shape", "minference")
#: What LoopServe's decode reads before its first re-selection of a turn (``decode_seed``):
#: ``auto`` (default): a turn of at most ``q_window`` new tokens (a follow-up question) reads the
#: cached tokens all of its queries attend to most, a longer turn reads every cached token;
#: ``estimate``: the top of the prefill estimate's column mass, summed over all its sampled rows
#: (after an exact prefill, which has no estimate: as ``last_queries``); ``last_queries``: the
#: cached tokens the turn's last ``decode_window`` prompt queries attend to most; ``full``:
#: every cached token.  ``benchmarks/kl_fidelity.py`` compares them: a seed chosen by prompt
#: queries misses what the answer reads when the question is not among them (per-token KL to
#: stock 2-3x higher than ``full`` with the question at the start or middle of a long turn).
DECODE_SEEDS = ("auto", "estimate", "last_queries", "full")
#: How a decode re-selection's window of queries scores the cache (``decode_pooling``):
#: ``bounds`` (default): their mean per head ranks the key blocks, each query scores the
#: candidates; ``all``: their mean does both (cheapest, a third more KL to full attention);
#: ``none``: each query does both (the paper's scoring).  ``DecodeCompressor.pool_window`` takes these.
DECODE_POOLINGS = ("bounds", "all", "none")
#: The compressed decode step's attention kernel (``decode_kernel``; ``cache_policy.batched``):
#: ``auto``: the one ``calibrate`` measured fastest on this machine.
DECODE_KERNELS = ("auto", "tensor", "loops", "fused")
#: How the server gets its gates (``calibration``; ``calibrate.CALIBRATION_MODES``).
CALIBRATIONS = ("auto", "measure", "off")


#: The largest integer setting (2^31 - 1): "everything" is any value above the context.
MAX_INT = 2**31 - 1


class LoopServeConfigError(ValueError):
    """A setting is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class LoopServeConfig:
    """Defaults from the paper unless said (docs/serving.md); every field has a ``--loopserve-<name>`` flag."""

    enabled: bool = True
    #: What runs: ``"loopserve"`` or a baseline (``METHODS``).
    method: str = "loopserve"
    #: Prefill: fraction of the estimated attention mass the kept lines cover, in (0, 1]; a layer
    #: whose plan is sparser than ``SHARP_BELOW`` covers ``sharpened_alpha`` (0.98 at 0.90) instead.
    #: 0.90 (ours; the paper: 0.95 everywhere): the prefill's error sat in the sparsest layers,
    #: the diffuse ones may lose more (``attention.sparse_prefill.SHARP_BELOW``).
    alpha: float = 0.9
    #: Prefill: last queries of the turn sampled for the estimate (plus as many strided).
    q_window: int = 64
    #: Prefill: query/key block size of the block-sparse kernel (power of two >= 16).
    block_size: int = 64
    #: Prefill: sequences shorter than this (cached + new tokens) run the exact
    #: rectangle (new rows over cached + new keys); so do forwards with fewer
    #: than ``block_size`` new tokens.  ``None``: measured on this machine (``calibrate``).
    min_prefill_len: int | None = None
    #: Prefill: a plan computing at least this share of the pairs runs the exact rectangle
    #: instead.  ``None``: measured on this machine (``calibrate``).
    prefill_max_density: float | None = None
    #: Decode: cached tokens the window's re-selection keeps per KV head (the paper's budget: 1024;
    #: ours 512, as each step also reads ``decode_query_blocks`` x 8 positions of its own choosing:
    #: ``cache_policy.decode.BUDGET``).
    decode_budget: int = 512
    #: Decode: re-select every this many generated tokens (the paper: 16; with query blocks 32
    #: loses nothing measurable: ``cache_policy.decode.INTERVAL``).
    decode_interval: int = 32
    #: Decode: latest generated queries that score the cached tokens (``cache_policy.decode.WINDOW``).
    decode_window: int = 8
    #: Decode: while consecutive re-selections agree the interval doubles, up to this.
    decode_max_interval: int = 128
    #: Decode: what a turn's tokens read before its first re-selection (``DECODE_SEEDS``).
    decode_seed: str = "auto"
    #: Decode: tokens from a turn's start to its first re-selection (``None``: ``decode_interval``).
    decode_first_interval: int | None = 4
    #: Decode: how the window's queries score the cache at a re-selection (``DECODE_POOLINGS``).
    decode_pooling: str = "bounds"
    #: Decode: key blocks (of 8 tokens) each step's own query adds to the selection, ranked by their
    #: key summaries (``KeySummaries.block_mass``; 0: the selection only).
    decode_query_blocks: int = 144
    #: Decode: slope of the query blocks over depth, in [0, 1): the first layer reads
    #: ``1 + slope`` times ``decode_query_blocks``, the last ``1 - slope`` times (the mean is kept;
    #: ``cache_policy.decode.PYRAMID``, ``layer_query_blocks``).
    decode_pyramid: float = 0.8
    #: Decode: a LoopServe turn compresses its decode only where each step would read at most this
    #: share of the cache (``decode_budget`` + ``decode_query_blocks`` x 8 over the cached tokens at
    #: the turn's first step); otherwise the turn decodes on the base path, exactly, at no cost of
    #: its own (``cache_policy.decode.decode_pays``: AVX2, fp32, a turn reading 0.85 of a 1.9K cache
    #: decoded at 0.7x stock).  1 compresses wherever the selection is smaller than the cache.
    decode_max_read: float = 0.5
    #: Decode: a turn over fewer cached tokens than this decodes on the base path, exactly.
    #: ``None``: measured on this machine (``calibrate``: where a compressed step costs at most
    #: 0.9 of stock's).
    decode_min_len: int | None = None
    #: Decode: the compressed step's attention kernel (``DECODE_KERNELS``; ``auto``: measured).
    decode_kernel: str = "auto"
    #: Decode on a CPU: a turn that decodes exactly over at least this many cached tokens reads
    #: every position through ``decode_kernel`` instead of the base path (stock's gather of every
    #: row and its SDPA).  ``None``: measured (``calibrate``: where that costs at most 0.9 of
    #: stock's step); the largest integer: always the base path.  Keep-everything requests
    #: always run on the base path.
    exact_decode_min_len: int | None = None
    #: Where the gates above come from when left unset (``CALIBRATIONS``): ``auto``, this machine's
    #: cached measurement, measured at start-up where none is; ``measure``, measured again;
    #: ``off``, defaults no measured machine lost at (``calibrate.SAFE_GATES``).
    calibration: str = "auto"
    #: First tokens always kept (prefill columns and decode selection).
    sink: int = 4
    #: Decode: last tokens always kept.
    recent: int = 32

    # Fields a request may override through custom_params (block_size is fixed
    # per server: the kernels are compiled for it).
    REQUEST_FIELDS = ("enabled", "method", "alpha", "q_window", "min_prefill_len", "decode_budget",
                      "decode_interval", "decode_window", "decode_max_interval", "decode_seed",
                      "decode_first_interval", "decode_pooling", "decode_query_blocks", "decode_pyramid",
                      "decode_max_read", "decode_min_len", "sink", "recent")

    def validated(self, name=lambda field: field) -> "LoopServeConfig":
        """``self`` if every value is in range, else ``LoopServeConfigError``;
        ``name(field)`` spells the field in the message (a flag, a JSON path)."""

        def fail(field, why):
            raise LoopServeConfigError(field, f"{name(field)} {why}, got {getattr(self, field)!r}")

        def is_int(v):
            # Bounded: the kernels index with int64 and the planner sums counts in int32.
            return isinstance(v, int) and not isinstance(v, bool) and v <= MAX_INT

        if not isinstance(self.enabled, bool):
            fail("enabled", "must be true or false")
        if self.method not in METHODS:
            fail("method", f"must be one of {', '.join(METHODS)}")
        if self.decode_seed not in DECODE_SEEDS:
            fail("decode_seed", f"must be one of {', '.join(DECODE_SEEDS)}")
        if self.decode_pooling not in DECODE_POOLINGS:
            fail("decode_pooling", f"must be one of {', '.join(DECODE_POOLINGS)}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0.0 < float(self.alpha) <= 1.0:
            fail("alpha", "must be a number in (0, 1]")
        if self.decode_kernel not in DECODE_KERNELS:
            fail("decode_kernel", f"must be one of {', '.join(DECODE_KERNELS)}")
        if self.calibration not in CALIBRATIONS:
            fail("calibration", f"must be one of {', '.join(CALIBRATIONS)}")
        if self.prefill_max_density is not None and (
                isinstance(self.prefill_max_density, bool) or not isinstance(self.prefill_max_density, (int, float))
                or not 0.0 <= float(self.prefill_max_density) <= 1.0):
            fail("prefill_max_density", "must be a number in [0, 1]")
        if isinstance(self.decode_pyramid, bool) or not isinstance(self.decode_pyramid, (int, float)) \
                or not 0.0 <= float(self.decode_pyramid) < 1.0:
            fail("decode_pyramid", "must be a number in [0, 1)")
        if isinstance(self.decode_max_read, bool) or not isinstance(self.decode_max_read, (int, float)) \
                or not 0.0 <= float(self.decode_max_read) <= 1.0:
            fail("decode_max_read", "must be a number in [0, 1]")
        for f in ("q_window", "decode_budget", "decode_interval", "decode_window", "decode_max_interval",
                  "decode_first_interval"):
            if f == "decode_first_interval" and self.decode_first_interval is None:
                continue
            if not is_int(getattr(self, f)) or getattr(self, f) < 1:
                fail(f, f"must be an integer in [1, {MAX_INT}]")
        for f in ("min_prefill_len", "decode_min_len", "exact_decode_min_len", "decode_query_blocks", "sink",
                  "recent"):
            if f in ("min_prefill_len", "decode_min_len", "exact_decode_min_len") and getattr(self, f) is None:
                continue
            if not is_int(getattr(self, f)) or getattr(self, f) < 0:
                fail(f, f"must be an integer in [0, {MAX_INT}]")
        bs = self.block_size
        if not is_int(bs) or bs < 16 or bs & (bs - 1):
            fail("block_size", "must be a power of two >= 16")
        if self.decode_budget < self.sink + self.recent:
            fail("decode_budget", f"must be >= sink + recent = {self.sink + self.recent}")
        if self.decode_max_interval < self.decode_interval:
            fail("decode_max_interval", f"must be >= decode_interval = {self.decode_interval}")
        return self

    def keeps_everything(self, context_len: int) -> bool:
        """Exact attention in both phases: LoopServe disabled, or ``alpha`` 1 with a decode budget
        covering the model's context.  Such requests run on SGLang's own backend, bit for bit
        (method ``full`` asks for this backend's exact paths instead)."""
        if not self.enabled:
            return True
        return self.method == "loopserve" and self.alpha >= 1.0 and self.decode_budget >= context_len

    def override(self, values: dict, name=lambda field: field) -> "LoopServeConfig":
        """A copy with a request's ``values`` applied, validated; unknown keys are errors."""
        if not isinstance(values, dict):
            raise LoopServeConfigError("", f"{name('')} must be an object of settings, got "
                                           f"{type(values).__name__}")
        for key in values:
            if key not in self.REQUEST_FIELDS:
                raise LoopServeConfigError(key, f"{name(key)} is not a per-request setting; "
                                                f"known: {', '.join(self.REQUEST_FIELDS)}")
        return dataclasses.replace(self, **values).validated(name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoopServeConfig":
        return cls(**json.loads(text)).validated()

    @classmethod
    def from_env(cls) -> "LoopServeConfig | None":
        """The launcher's config in this process, or ``None`` when LoopServe is off."""
        text = os.environ.get(CONFIG_ENV)
        return cls.from_json(text) if text else None


#: ``field -> flag``; ``enabled`` is ``--enable-loopserve``.
FLAGS = {f.name: ("--enable-loopserve" if f.name == "enabled" else "--loopserve-" + f.name.replace("_", "-"))
         for f in fields(LoopServeConfig)}


def request_field_name(field: str) -> str:
    """How a per-request field is named in errors: its JSON path."""
    return f"custom_params.{REQUEST_KEY}" + (f".{field}" if field else "")
