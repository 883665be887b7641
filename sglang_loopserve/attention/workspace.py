"""Scratch buffers reused across calls (CPU).

The planner's large temporaries (the sampled probabilities, ``H x S x n_ctx``
floats: 37 MB at 8K) are rewritten every layer.  On the CPU a fresh
allocation of that size comes straight from the kernel (``mmap``) and its
first touch page-faults: measured here, that costs more than the arithmetic
on it (a 37 MB ``exp`` 19 ms into new memory, 5 ms in place).  So those
buffers live here and grow as needed, one set per thread.  On a GPU torch's
caching allocator already reuses memory: ``scratch`` just allocates.

A scratch tensor is valid until the next request for the same name in the
same thread: callers copy what they keep.
"""

from __future__ import annotations

import math
import threading

import torch

_local = threading.local()


def scratch(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor, reusing this thread's buffer ``name`` on the CPU."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (name, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel].view(shape)


def release() -> None:
    """Free this thread's buffers."""
    _local.buffers = {}
