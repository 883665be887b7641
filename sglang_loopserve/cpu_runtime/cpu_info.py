"""What this CPU offers the kernels: its ``/proc/cpuinfo`` flags, read once."""

from __future__ import annotations

import functools

#: The flags that change which kernels run and how fast (the platform's dtype, oneDNN's products).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """This CPU's feature flags (Linux's ``/proc/cpuinfo``); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_kind() -> str:
    """The CPU features that decide the dtype and kernels, to name with every figure."""
    found = [flag for flag in ("amx_bf16", "avx512_bf16", "avx2") if flag in cpu_flags()]
    return " ".join(found) or "none of amx_bf16, avx512_bf16, avx2"
