"""Where LoopServe pays on this machine: its gates, from a short timing run, cached per machine.

Whether a sparse prefill or a compressed decode step beats the exact path it replaces depends on
the machine more than on the method: on a 2-core AVX-512 bf16 EPYC the sparse prefill broke even
at 3K tokens, on an AVX2-only one (fp32) not by 6K, and a decode step reading 0.85 of a 1.9K cache
ran at 0.7x stock there.  So the gates are measured where the server runs, at the model's head
shape and dtype, by timing both sides of each choice side by side on planted inputs:

* ``min_prefill_len``: a turn's prefill (half of the sequence new) as plan + block-sparse kernel at
  a served plan's density (``TYPICAL_DENSITY``) against the exact rectangle, at ``PREFILL_LENGTHS``;
* ``prefill_max_density``: the plan density above which the kernel costs more than the exact
  rectangle (the plan is then paid for, and only the kernel is weighed);
* ``decode_min_len``: one decode step of one layer as the server runs it compressed (the read set
  with the step's own query blocks, attention over it, a re-selection amortised over the interval)
  against stock's (every cached row gathered, one SDPA), at ``DECODE_LENGTHS``;
* ``decode_kernel``: the fastest of the compressed step's attention kernels here;
* ``exact_decode_min_len``: a turn that decodes exactly (below ``decode_min_len``, or reading
  most of its cache) reads every cached position through that kernel instead of stock's step,
  from this length on, at ``EXACT_LENGTHS`` (stock's gather of every row and its SDPA cost 1.4 ms
  a layer at 1.9K cached tokens in bf16 on an AVX-512 EPYC, the kernel over the same rows 0.3).

A path is taken from the first measured length from which it costs at most ``MARGIN`` of the
other (interpolated between the two lengths around the crossing); where it never does within the
measured lengths it is never taken (``NEVER``).  The result is cached per ``MachineKey`` (device,
CPU flags, the thread count and the ISA caps of torch, oneDNN and numba, dtypes, torch version,
head shape), so a server measures once per machine; ``--loopserve-calibration off`` takes
``SAFE_GATES`` instead, and each gate's own flag overrides what was measured.

    python -m sglang_loopserve.calibrate [--model smollm2-135m | --heads 9,3,64] [--dtype float32] [--refresh]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import CALIBRATIONS, MAX_INT, LoopServeConfig

logger = logging.getLogger(__name__)

#: Bumped whenever what is measured changes, so older cached results are measured again.
CALIBRATION_VERSION = 3
#: A replacing path must cost at most this share of the path it replaces: the server's own glue
#: around a step (per-request options, statistics, the CSR of the batch) is not in the timing.
MARGIN = 0.9
#: Density of a served plan (share of the causal pairs computed): SmolLM2's real attention plans
#: 0.33 / 0.45 / 0.59 of the pairs at alpha 0.90 / 0.95 / 0.99 (``benchmarks/results/real_attention``).
TYPICAL_DENSITY = 0.4
#: Sequence lengths (cached + new, half new) the prefill is timed at.
PREFILL_LENGTHS = (2048, 4096, 8192)
#: Cached tokens the decode step is timed at.
DECODE_LENGTHS = (2048, 3072, 4096, 6144, 8192)
#: Cache lengths of an exact decode step (kernel over every position against stock's step): the
#: turns below the decode gates.
EXACT_LENGTHS = (256, 1024, 2048, 4096)
#: Timed rounds per figure (their median), after one warm-up round.
REPEATS = 3
#: A gate that is never reached.
NEVER = MAX_INT
#: Gates are rounded up to a multiple of this many tokens.
GATE_STEP = 256
#: Environment variables that hold torch, oneDNN and numba below the CPU's own ISA (an AVX2 run on
#: an AVX-512 machine): part of the machine key, as they change every timing.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NUMBA_CPU_NAME")
#: ``--loopserve-calibration``: ``auto`` (the cached result, measured once where none is),
#: ``measure`` (measure again and cache it), ``off`` (``SAFE_GATES``, nothing measured).
CALIBRATION_MODES = CALIBRATIONS


@dataclass(frozen=True)
class Gates:
    """What decides, per turn, whether LoopServe's paths run (see the module's docstring)."""

    min_prefill_len: int
    prefill_max_density: float
    decode_min_len: int
    decode_kernel: str
    #: From how many cached tokens an exact decode step reads every position through
    #: ``decode_kernel`` rather than on the base path (``NEVER``: always the base path).
    exact_decode_min_len: int = MAX_INT
    #: Where they come from: ``measured``, ``cached``, ``defaults``, with ``+flags`` when a flag
    #: replaced one.
    source: str = "measured"

    def describe(self) -> str:
        def tokens(n):
            return "never" if n >= NEVER else f"from {n} tokens"

        return (f"sparse prefill {tokens(self.min_prefill_len)} at densities below {self.prefill_max_density:.2f}, "
                f"compressed decode {tokens(self.decode_min_len)} cached with the {self.decode_kernel} kernel, "
                f"exact decode on that kernel {tokens(self.exact_decode_min_len)} ({self.source})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Without a measurement (``--loopserve-calibration off``, or a failed one): gates no measured
#: machine lost at.  The highest of the measured prefill gates (an AMX Xeon's: dense products
#: there are 4x faster), the decode from 8K cached tokens (an AVX2 EPYC, fp32: a compressed
#: step over 7.4K ran at 1.4-1.9x stock), and only plans far sparser than any break-even.
SAFE_GATES = Gates(min_prefill_len=16384, prefill_max_density=0.3, decode_min_len=8192, decode_kernel="auto",
                   exact_decode_min_len=NEVER, source="defaults")

#: ``LoopServeConfig`` fields that override each gate when set (``None`` / ``"auto"``: measured).
GATE_FLAGS = {"min_prefill_len": None, "prefill_max_density": None, "decode_min_len": None, "decode_kernel": "auto",
              "exact_decode_min_len": None}


@dataclass(frozen=True)
class MachineKey:
    """What a calibration holds for: a result measured under another key is measured again."""

    device: str
    cpu_flags: tuple
    threads: int
    isa_caps: tuple
    dtype: str
    kv_dtype: str
    torch: str
    heads: tuple  # (query heads, KV heads, head dim)
    block_size: int
    version: int = CALIBRATION_VERSION

    @classmethod
    def of(cls, device, dtype, kv_dtype, heads, block_size) -> "MachineKey":
        from .cpu_runtime.cpu_info import KERNEL_FLAGS, cpu_flags

        device = torch.device(device)
        name = device.type
        if device.type == "cuda":
            name += ":" + torch.cuda.get_device_name(device)
        flags = tuple(f for f in KERNEL_FLAGS if f in cpu_flags())
        caps = tuple(f"{v}={os.environ[v]}" for v in ISA_CAPS if os.environ.get(v))
        return cls(device=name, cpu_flags=flags, threads=torch.get_num_threads(), isa_caps=caps,
                   dtype=str(dtype).removeprefix("torch."), kv_dtype=str(kv_dtype).removeprefix("torch."),
                   torch=torch.__version__, heads=tuple(int(h) for h in heads), block_size=int(block_size))

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(key: MachineKey, root: Path | None = None) -> Path:
    """Where ``key``'s calibration is kept (under the models' cache root by default)."""
    from .models import cache_dir

    return (root or cache_dir() / "calibration") / f"{key.digest()}.json"


# ----------------------------------------------------------------- timings -> gates
def _first_paying(points: list[tuple[int, float]]) -> int:
    """The length from which ``ratio <= MARGIN`` holds through the longest measured one, given
    ``(length, replacing / replaced)`` pairs; between a losing and a paying length the crossing is
    interpolated linearly and rounded up to ``GATE_STEP``.  ``NEVER`` if the longest one loses."""
    points = sorted(points)
    if not points or points[-1][1] > MARGIN:
        return NEVER
    i = len(points) - 1
    while i > 0 and points[i - 1][1] <= MARGIN:
        i -= 1
    if i == 0:
        return points[0][0]
    (l0, r0), (l1, r1) = points[i - 1], points[i]
    cross = l0 + (l1 - l0) * (r0 - MARGIN) / (r0 - r1)
    return min(l1, int(math.ceil(cross / GATE_STEP) * GATE_STEP))


def kernel_cost(row: dict, density: float) -> float:
    """The block-sparse kernel's seconds at ``density`` for one prefill timing row, on the line
    through its two measured points: the plan's density and every causal block."""
    d0, k0, k1 = row["planned_density"], row["kernel_s"], row["dense_kernel_s"]
    if d0 >= 1.0:
        return k1 * density
    return k0 + (k1 - k0) * (density - d0) / (1.0 - d0)


def gates_from_timings(timings: dict) -> Gates:
    """The gates that ``timings`` (``measure``'s result, or planted) call for.

    ``timings["prefill"]``: rows of ``length``, ``exact_s``, ``plan_s``, ``planned_density``,
    ``kernel_s`` (at that density), ``dense_kernel_s`` (every causal block); ``timings["decode"]``:
    rows of ``cached``, ``base_s`` and ``steps`` (kernel name -> seconds of the compressed step);
    ``timings["exact"]`` (optional): rows of ``cached``, ``base_s`` and ``reads_all`` (kernel name ->
    seconds of a step reading every position)."""
    prefill, decode = timings["prefill"], timings["decode"]
    widest = max(prefill, key=lambda r: r["length"])
    # Density where the kernel alone costs the exact rectangle (the plan is already paid for).
    d0, k0, k1, exact = widest["planned_density"], widest["kernel_s"], widest["dense_kernel_s"], widest["exact_s"]
    if k1 <= exact:
        max_density = 1.0
    elif k0 >= exact:
        max_density = 0.0 if d0 >= 1.0 else max(0.0, d0 * exact / k0)
    else:
        max_density = d0 + (exact - k0) * (1.0 - d0) / (k1 - k0)
    max_density = round(min(max(max_density, 0.0), 1.0), 2)
    paying_density = min(TYPICAL_DENSITY, max_density)
    prefill_ratio = [(r["length"], (r["plan_s"] + min(r["exact_s"], kernel_cost(r, paying_density))) / r["exact_s"])
                     for r in prefill]
    kernel = min(max(decode, key=lambda r: r["cached"])["steps"].items(), key=lambda kv: kv[1])[0]
    decode_ratio = [(r["cached"], r["steps"][kernel] / r["base_s"]) for r in decode]
    exact_ratio = [(r["cached"], r["reads_all"][kernel] / r["base_s"]) for r in timings.get("exact", ())
                   if kernel in r["reads_all"]]
    return Gates(min_prefill_len=_first_paying(prefill_ratio), prefill_max_density=max_density,
                 decode_min_len=_first_paying(decode_ratio), decode_kernel=kernel,
                 exact_decode_min_len=_first_paying(exact_ratio), source="measured")


# ----------------------------------------------------------------- measuring
def median_times(fns: dict, device, repeats: int = REPEATS, warmup: int = 1) -> dict:
    """Median seconds of each of ``fns``, timed in rounds (one call of each per round): a shared or
    throttled machine slows a whole round, not one column."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def decode_kernels(device, dtype, kv_dtype) -> tuple:
    """The compressed step's attention kernels that can run here (``batched_decode_attention``):
    the fused one wherever queries and KV share a dtype (in fp32 too: 7% faster than the tensor
    path at 8K on an AVX2 EPYC)."""
    from .cache_policy import cpu_loops

    if torch.device(device).type != "cpu":
        return ("auto",)
    kernels = ["tensor"]
    if cpu_loops.supports(torch.empty(0, dtype=kv_dtype)):
        kernels.append("loops")
    if dtype == kv_dtype:
        kernels.append("fused")
    return tuple(kernels)


def measure_prefill(length, heads, dtype, device, config: LoopServeConfig, repeats=REPEATS, dense_kernel=True) -> dict:
    """One ``timings["prefill"]`` row: a turn of ``length // 2`` new tokens over ``length``."""
    from .attention.block_mask import BlockMask
    from .attention.exact import exact_prefill_attention
    from .attention.kernels import KERNELS, default_kernel
    from .attention.sparse_prefill import build_block_mask
    from .attention.synthetic import planted_qkv

    n_heads, n_kv, dim = heads
    inp = planted_qkv(length // 2, length, n_heads, n_kv, dim, dtype=dtype)
    q, k, v = (t.to(device) for t in (inp.q, inp.k, inp.v))
    kernel = KERNELS[default_kernel(torch.device(device))]

    def plan():
        return build_block_mask(q, k, alpha=config.alpha, q_window=config.q_window, block_size=config.block_size,
                                sink=config.sink, sharpen=True)[0]

    mask = plan()
    fns = {"exact_s": lambda: exact_prefill_attention(q, k, v), "plan_s": plan,
           "kernel_s": lambda: kernel(q, k, v, mask)}
    if dense_kernel:
        full = BlockMask.dense(n_heads, q.shape[0], k.shape[0], config.block_size, device=q.device)
        fns["dense_kernel_s"] = lambda: kernel(q, k, v, full)
    row = {"length": length, **median_times(fns, device, repeats), "planned_density": mask.density()}
    return row


def _decode_inputs(cached, heads, dtype, kv_dtype, device):
    """A pool of ``cached`` random keys and values through scattered slots, one decode query, and
    stock's step over them (SGLang's torch-native decode: every cached row gathered, one SDPA
    with ``enable_gqa``)."""
    n_heads, n_kv, dim = heads
    g = torch.Generator().manual_seed(cached)
    pool_k, pool_v = (torch.randn(cached + 64, n_kv, dim, generator=g).to(device, kv_dtype) for _ in range(2))
    slots = torch.randperm(cached + 64, generator=g)[:cached].to(device, torch.int32)
    q = torch.randn(1, n_heads, dim, generator=g).to(device, dtype)

    def stock():
        key = pool_k[slots].movedim(0, 1).to(dtype)
        value = pool_v[slots].movedim(0, 1).to(dtype)
        return F.scaled_dot_product_attention(q.movedim(0, 1)[None], key[None], value[None],
                                              enable_gqa=n_heads != n_kv)

    return pool_k, pool_v, slots, q, stock


def measure_decode(cached, heads, dtype, kv_dtype, device, config: LoopServeConfig, repeats=REPEATS) -> dict:
    """One ``timings["decode"]`` row: one layer's decode step of one request over ``cached`` tokens."""
    from .cache_policy import DecodeCompressor, batched_decode_attention

    pool_k, pool_v, slots, q, stock = _decode_inputs(cached, heads, dtype, kv_dtype, device)
    g = torch.Generator().manual_seed(cached + 1)
    window = torch.randn(config.decode_window, heads[0], heads[2], generator=g).to(device, dtype)
    comp = DecodeCompressor(budget=config.decode_budget, interval=config.decode_interval, window=config.decode_window,
                            sink=config.sink, recent=config.recent, query_blocks=config.decode_query_blocks,
                            pool_window=config.decode_pooling)
    for row in window:
        comp.record(row)
    comp.reselect_from(pool_k, slots[:cached - 8])  # 8 tokens generated since

    def step(kernel):
        def run():
            flat, counts = comp.attended(cached, q[0], pool_k, slots)
            indptr = torch.tensor([0, *counts], device=q.device).cumsum(0)
            return batched_decode_attention(q, pool_k, pool_v, slots[None], indptr, flat, method=kernel)
        return run

    def reselect():
        comp.reselect_from(pool_k, slots)

    kernels = decode_kernels(device, dtype, kv_dtype)
    t = median_times({"base_s": stock, "reselect_s": reselect, **{k: step(k) for k in kernels}}, device, repeats)
    amortised = t["reselect_s"] / config.decode_interval
    return {"cached": cached, "base_s": t["base_s"], "reselect_s": t["reselect_s"],
            "steps": {k: t[k] + amortised for k in kernels}}


def measure_exact_decode(cached, heads, dtype, kv_dtype, device, repeats=REPEATS) -> dict:
    """One ``timings["exact"]`` row: an exact decode step over ``cached`` tokens, stock's against
    each kernel reading every position (its read set built as the backend builds it)."""
    from .cache_policy import batched_decode_attention
    from .cache_policy.batched import every_position

    pool_k, pool_v, slots, q, stock = _decode_inputs(cached, heads, dtype, kv_dtype, device)

    def reads_all(kernel):
        def run():
            every, counts = every_position(cached, heads[1], q.device)
            indptr = torch.tensor([0, *counts], device=q.device).cumsum(0)
            return batched_decode_attention(q, pool_k, pool_v, slots[None], indptr, every, method=kernel)
        return run

    kernels = decode_kernels(device, dtype, kv_dtype)
    t = median_times({"base_s": stock, **{k: reads_all(k) for k in kernels}}, device, repeats)
    return {"cached": cached, "base_s": t["base_s"], "reads_all": {k: t[k] for k in kernels}}


def measure(heads, dtype, kv_dtype, device="cpu", config: LoopServeConfig | None = None,
            prefill_lengths=PREFILL_LENGTHS, decode_lengths=DECODE_LENGTHS, repeats=REPEATS,
            exact_lengths=EXACT_LENGTHS) -> dict:
    """Time both sides of every gate at the model's ``heads`` (query heads, KV heads, head dim):
    ``{"prefill": [...], "decode": [...], "seconds": ...}`` (``gates_from_timings`` reads it).
    Every kernel is compiled before (``numba`` caches them on disk), so this times steady states."""
    config = config or LoopServeConfig()
    t0 = time.perf_counter()
    widest = max(prefill_lengths)
    # no_grad, not inference_mode: the planner's reused buffers made here serve later forwards.
    with torch.no_grad():
        prefill = [measure_prefill(n, heads, dtype, device, config, repeats, dense_kernel=n == widest)
                   for n in prefill_lengths]
        # The dense kernel is timed once, at the widest length; narrower rows scale its cost per pair.
        for row in prefill:
            if "dense_kernel_s" not in row:
                row["dense_kernel_s"] = prefill[-1]["dense_kernel_s"] * (row["length"] / widest) ** 2
        decode = [measure_decode(n, heads, dtype, kv_dtype, device, config, repeats) for n in decode_lengths]
        exact = [measure_exact_decode(n, heads, dtype, kv_dtype, device, repeats) for n in exact_lengths]
    return {"prefill": prefill, "decode": decode, "exact": exact, "seconds": time.perf_counter() - t0}


def _cached(path: Path, key: MachineKey) -> tuple[Gates, dict] | None:
    """The gates and timings cached at ``path`` for ``key``; None where there are none (an
    unreadable file is logged and counts as none)."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") == json.loads(json.dumps(dataclasses.asdict(key))):
            return dataclasses.replace(gates_from_timings(doc["timings"]), source="cached"), doc["timings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("LoopServe: calibration %s unreadable (%s); measuring again", path, exc)
    return None


@contextlib.contextmanager
def _exclusive(path: Path):
    """Held while one process measures ``path``'s key: the ranks of one server (data or tensor
    parallel, all on this machine) then measure once, not at once (each would time the others'
    load), and read the same gates.  Without a writable cache folder, no lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_suffix(".lock"), "w")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def calibrated_gates(key: MachineKey, measure_fn, mode: str = "auto", root: Path | None = None) -> tuple[Gates, dict]:
    """``key``'s gates and the timings behind them: ``SAFE_GATES`` for ``mode`` ``off``; the cached
    result for ``auto`` where one exists for ``key``; else ``measure_fn()``'s, then cached.  A cache
    that cannot be read is measured again; one that cannot be written is logged, not fatal."""
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_MODES)}, got {mode!r}")
    if mode == "off":
        return SAFE_GATES, {}
    path = cache_path(key, root)
    hit = _cached(path, key) if mode == "auto" else None
    if hit is not None:
        return hit
    with _exclusive(path):
        hit = _cached(path, key) if mode == "auto" else None  # measured by a process we waited for
        if hit is not None:
            return hit
        timings = measure_fn()
        gates = gates_from_timings(timings)
        doc = {"key": dataclasses.asdict(key), "timings": timings, "gates": gates.to_dict(),
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(path)
        except OSError as exc:
            logger.warning("LoopServe: calibration not cached at %s (%s)", path, exc)
    return gates, timings


def with_flags(gates: Gates, config: LoopServeConfig) -> Gates:
    """``gates`` with every gate whose flag is set in ``config`` taken from it."""
    changed = {name: getattr(config, name) for name, unset in GATE_FLAGS.items() if getattr(config, name) != unset}
    if not changed:
        return gates
    return dataclasses.replace(gates, **changed, source=gates.source + "+flags")


def gates_for(device, dtype, kv_dtype, heads, config: LoopServeConfig, root: Path | None = None) -> Gates:
    """The server's gates: calibrated per ``config.calibration`` for this machine and head shape,
    then the flags'."""
    key = MachineKey.of(device, dtype, kv_dtype, heads, config.block_size)
    gates, timings = calibrated_gates(
        key, lambda: measure(heads, dtype, kv_dtype, device, config), config.calibration, root)
    if timings.get("seconds") is not None and gates.source == "measured":
        logger.info("LoopServe: calibrated in %.1f s (cached at %s)", timings["seconds"], cache_path(key, root))
    return with_flags(gates, config)


# ----------------------------------------------------------------- CLI
def format_timings(timings: dict) -> str:
    lines = ["prefill (half the sequence new): exact rectangle vs plan + kernel",
             f"{'length':>7} {'exact ms':>9} {'plan ms':>8} {'density':>8} {'kernel ms':>10} {'dense kernel ms':>16}"]
    for r in timings["prefill"]:
        lines.append(f"{r['length']:>7} {r['exact_s'] * 1e3:>9.1f} {r['plan_s'] * 1e3:>8.1f} "
                     f"{r['planned_density']:>8.3f} {r['kernel_s'] * 1e3:>10.1f} {r['dense_kernel_s'] * 1e3:>16.1f}")
    kernels = list(timings["decode"][0]["steps"])
    lines += ["decode, one layer, one request: stock step vs compressed step (re-selection amortised)",
              f"{'cached':>7} {'stock ms':>9} {'reselect ms':>12} " + " ".join(f"{k + ' ms':>10}" for k in kernels)]
    for r in timings["decode"]:
        lines.append(f"{r['cached']:>7} {r['base_s'] * 1e3:>9.3f} {r['reselect_s'] * 1e3:>12.2f} "
                     + " ".join(f"{r['steps'][k] * 1e3:>10.3f}" for k in kernels))
    if timings.get("exact"):
        lines += ["exact decode, one layer, one request: stock step vs a kernel reading every position",
                  f"{'cached':>7} {'stock ms':>9} " + " ".join(f"{k + ' ms':>10}" for k in kernels)]
        for r in timings["exact"]:
            lines.append(f"{r['cached']:>7} {r['base_s'] * 1e3:>9.3f} "
                         + " ".join(f"{r['reads_all'][k] * 1e3:>10.3f}" for k in kernels))
    return "\n".join(lines)


def main(argv=None) -> int:
    from .models import MODELS, ModelPreparationError, spec

    p = argparse.ArgumentParser(prog="python -m sglang_loopserve.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"whose head shape: one of {', '.join(MODELS)} (default: the "
                                                 "embedded model)")
    p.add_argument("--heads", default=None, help="query heads, KV heads, head dim (instead of --model), e.g. 9,3,64")
    p.add_argument("--dtype", default=None, help="default: what the platform serves on this machine")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--refresh", action="store_true", help="measure again even where a result is cached")
    p.add_argument("--json", action="store_true", help="print the cached document instead of tables")
    a = p.parse_args(argv)
    try:
        heads = tuple(int(x) for x in a.heads.split(",")) if a.heads else spec(a.model).heads
    except (ValueError, ModelPreparationError) as exc:
        p.error(f"--heads / --model: {exc}")
    if len(heads) != 3 or min(heads) < 1 or heads[0] % heads[1]:
        p.error(f"--heads must be three positive integers with query heads a multiple of KV heads, got {a.heads}")
    dtype = getattr(torch, a.dtype) if a.dtype else serving_dtype(a.device)
    if not isinstance(dtype, torch.dtype):
        p.error(f"--dtype must be a torch dtype, got {a.dtype}")
    config = dataclasses.replace(LoopServeConfig(), calibration="measure" if a.refresh else "auto")
    key = MachineKey.of(a.device, dtype, dtype, heads, config.block_size)
    gates, timings = calibrated_gates(key, lambda: measure(heads, dtype, dtype, a.device, config),
                                      config.calibration)
    if a.json:
        print(cache_path(key).read_text())
        return 0
    print(f"machine: {key.device} [{' '.join(key.cpu_flags) or '-'}] {key.threads} threads"
          f"{' ' + ' '.join(key.isa_caps) if key.isa_caps else ''}, {key.dtype}, heads {heads}")
    print(format_timings(timings))
    if timings.get("seconds") is not None:
        print(f"measured in {timings['seconds']:.1f} s")
    print(f"gates: {gates.describe()}")
    print(f"cache: {cache_path(key)}")
    return 0


def serving_dtype(device) -> torch.dtype:
    """The dtype the platform serves on ``device`` with ``--dtype auto`` (``srt/platform.py``)."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    from .srt.platform import default_cpu_dtype  # no SGLang import at this level

    return getattr(torch, os.environ.get("SGLANG_LOOPSERVE_CPU_DTYPE") or default_cpu_dtype())


if __name__ == "__main__":
    sys.exit(main())
