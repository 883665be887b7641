"""Out-of-tree SGLang platform that serves on any CPU with pure torch ops.

SGLang 0.5.23's own CPU path (``SGLANG_USE_CPU_ENGINE=1``) needs an AMX build of
sgl-kernel that PyPI does not ship, and ``--device cpu`` alone picks the
``intel_amx`` attention backend and dies importing vllm.  Registering a
``CpuSRTPlatform`` subclass with ``PlatformEnum.OOT`` routes every fused op to
its ``forward_native`` torch implementation and lets us choose a torch-only
attention backend.

Activation rule (``activate``, the ``sglang.srt.platforms`` entry point):
the platform is chosen when ``SGLANG_PLATFORM`` names it, or when no
accelerator is present.  On a CUDA (or ROCm/XPU/NPU/MPS) machine it returns
``None`` and stock SGLang picks its own platform, untouched.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

#: Entry-point name in group ``sglang.srt.platforms`` (see pyproject.toml);
#: ``SGLANG_PLATFORM=loopserve_cpu`` selects this platform explicitly.
PLATFORM_NAME = "loopserve_cpu"
PLATFORM_QUALNAME = "sglang_loopserve.srt.platform.LoopServeCpuPlatform"

#: Serving dtype used when the user leaves ``--dtype auto``, by whether the CPU
#: computes bf16 natively (AVX-512 bf16 or AMX; oneDNN says).  Measured with
#: ``benchmarks/cpu_dtype.py``: on a 2-core AVX-512(bf16) machine, 2.8K-token
#: prompt, prefill 4.97 s (bf16) vs 8.52 s (fp32), decode 167 vs 152 ms/token,
#: so bf16; on a 2-core AVX2 machine without it a 2000 x 576 x 1536 linear
#: takes 208 ms in bf16 and 29 ms in fp32 (bf16 is emulated), so fp32.
#: ``SGLANG_LOOPSERVE_CPU_DTYPE`` overrides it.
DTYPE_WITH_NATIVE_BF16 = "bfloat16"
DTYPE_WITHOUT_NATIVE_BF16 = "float32"


def cpu_has_native_bf16() -> bool:
    """oneDNN's answer: does this CPU compute bf16 natively (AVX-512 bf16, AMX)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a torch without oneDNN
        return False


def default_cpu_dtype() -> str:
    """``--dtype auto`` on this CPU: bf16 where the CPU computes it natively, else fp32."""
    return DTYPE_WITH_NATIVE_BF16 if cpu_has_native_bf16() else DTYPE_WITHOUT_NATIVE_BF16


#: SGLang's per-rank CPU list (``|`` between ranks); unset, it gives each rank a NUMA node and
#: stops a launch with more ranks than nodes.
THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"


def cpu_rank_environment(server_args, environ=None, cpus=None) -> dict[str, str]:
    """The environment several CPU ranks of one server need where the user set none: SGLang binds
    each rank (``dp x tp x pp``) to a NUMA node unless ``SGLANG_CPU_OMP_THREADS_BIND`` lists its
    cores, and stops the launch where ranks outnumber nodes (a 2-core machine has one).  So the
    cores this process may use are split evenly, one group a rank, and ``OMP_NUM_THREADS`` is set
    to a group's size: outside AMX machines SGLang pins nothing, and every rank would otherwise run
    a thread per core on the same cores.  Returns the variables to set (none for one rank, or what
    the user set already); ``SystemExit`` naming the flags where ranks outnumber cores."""
    environ = os.environ if environ is None else environ
    ranks = 1
    for flag in ("dp_size", "tp_size", "pp_size"):
        ranks *= int(getattr(server_args, flag, 1) or 1)
    if ranks <= 1 or (getattr(server_args, "device", "cpu") or "cpu") != "cpu" or THREADS_BIND_ENV in environ:
        return {}
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < ranks:
        raise SystemExit(f"--dp-size x --tp-size x --pp-size = {ranks} CPU ranks, but this process may use "
                         f"{len(cpus)} cores: start fewer ranks, or set {THREADS_BIND_ENV} to the cores of "
                         f"each rank ('|' between ranks)")
    per = len(cpus) // ranks
    groups = [cpus[r * per:(r + 1) * per] for r in range(ranks)]
    env = {THREADS_BIND_ENV: "|".join(",".join(str(c) for c in group) for group in groups)}
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(per)
    return env


def check_cpu_tensor_parallel(server_args, config: dict | None = None) -> None:
    """``SystemExit`` naming ``--tp-size`` where it does not divide the model's query and KV heads.

    On ``--device cpu`` SGLang pads the heads of such a model in its config
    (``adjust_config_with_unaligned_cpu_tp``) but pads the weights only under its own CPU engine
    (``SGLANG_USE_CPU_ENGINE``, which this platform replaces), so the launch would die loading the
    QKV projection (SmolLM2's 3 KV heads under ``--tp-size 2``: "start (128) + length (128) exceeds
    dimension size (192)").  ``config``: the model's ``config.json`` (read from ``--model-path``
    when it is a folder; nothing is checked where neither is at hand)."""
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    if tp <= 1 or (getattr(server_args, "device", "cpu") or "cpu") != "cpu":
        return
    if config is None:
        path = os.path.join(str(getattr(server_args, "model_path", "") or ""), "config.json")
        if not os.path.isfile(path):
            return
        import json

        with open(path) as f:
            config = json.load(f)
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    if heads is None:
        return
    if heads % tp or kv_heads % tp:
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise SystemExit(f"--tp-size {tp} does not divide the model's {heads} query and {kv_heads} KV heads: on the "
                         f"CPU platform SGLang cannot pad them (its padded weight loading needs its own CPU "
                         f"engine); use --tp-size {' or '.join(map(str, fits)) if fits else '1'}")


def accelerator_present() -> bool:
    """True when torch sees a GPU or another accelerator SGLang supports."""
    if torch.cuda.is_available():  # CUDA and ROCm builds
        return True
    for name in ("xpu", "npu", "mps"):
        backend = getattr(torch, name, None)
        try:
            if backend is not None and backend.is_available():
                return True
        except Exception:  # a half-installed backend must not break discovery
            continue
    return False


def activate() -> str | None:
    """Entry point: our platform's qualname, or ``None`` to leave SGLang stock."""
    if os.environ.get("SGLANG_PLATFORM") == PLATFORM_NAME:
        return PLATFORM_QUALNAME
    if accelerator_present():
        return None
    return PLATFORM_QUALNAME


def _intel_amx_usable() -> bool:
    # SGLang's own test: AMX tiles *and* the CPU build of sgl-kernel.
    try:
        from sglang.srt.utils.common import cpu_has_amx_support

        return bool(cpu_has_amx_support())
    except Exception:
        return False


def _make_platform_class():
    # Imported lazily: ``activate`` runs in every SGLang process during
    # discovery and must stay cheap; the class is only built when chosen.
    from sglang.srt.platforms.cpu import CpuSRTPlatform
    from sglang.srt.platforms.device_mixin import PlatformEnum
    from sglang.srt.platforms.interface import PlatformCapabilities

    class LoopServeCpuPlatform(CpuSRTPlatform):
        """CPU platform: torch-native attention, no graphs, no Triton, no sgl-kernel."""

        _enum = PlatformEnum.OOT
        # Nothing but plain torch: no Triton launches, no graph capture.
        capabilities = PlatformCapabilities()

        def get_default_attention_backend(self) -> str:
            return "torch_native"

        def apply_server_args_defaults(self, server_args) -> None:
            # ``handle_cpu_backends`` has already defaulted the backend to
            # ``intel_amx`` on x86; that backend needs sgl-kernel's CPU ops.
            if server_args.attention_backend in (None, "intel_amx") and not _intel_amx_usable():
                server_args.attention_backend = "torch_native"
            if server_args.dtype == "auto":
                server_args.dtype = os.environ.get("SGLANG_LOOPSERVE_CPU_DTYPE", default_cpu_dtype())

    LoopServeCpuPlatform.__module__ = __name__
    LoopServeCpuPlatform.__qualname__ = "LoopServeCpuPlatform"
    return LoopServeCpuPlatform


def __getattr__(name: str):
    # ``LoopServeCpuPlatform`` is resolved by qualname from SGLang; build it on
    # first access so importing this module never imports SGLang.
    if name == "LoopServeCpuPlatform":
        cls = _make_platform_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
