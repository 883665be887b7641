"""numba for the CPU loops of ``attention/`` and ``cache_policy/``: one configuration.

numba is a dependency of SGLang; where it cannot be imported ``numba`` is
``None`` and the callers run their torch paths.  The loops compile on first
use (seconds; cached on disk).

Threading layer: OpenMP first.  Measured on the 2-core CI machine (a 4K-token
turn, one layer), the prefill plan took 30-37 ms on it and 36-49 ms on the
workqueue layer, whose two threads start while torch's OpenMP threads still
spin after the estimate's matmul; torch ops right after a plan ran at the
same speed on either.  The workqueue layer takes one parallel launch at a
time: callers hold ``lock`` (harmless on the others).
"""

from __future__ import annotations

import threading

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba ships with SGLang
    numba = njit = prange = None
else:
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

lock = threading.Lock()


def available() -> bool:
    return numba is not None
