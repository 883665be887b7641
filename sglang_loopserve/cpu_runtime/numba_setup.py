"""numba for the CPU loops of ``attention/`` and ``cache_policy/``: one configuration.

numba is a dependency of SGLang; where it cannot be imported ``numba`` is
``None`` and the callers run their torch paths.  The loops compile on first
use (seconds; cached on disk).

Threading layer: numba's own work queue, never OpenMP, for the loops that
use ``prange``.  numba's OpenMP layer is a second OpenMP runtime (the
system's libgomp, not the one torch ships) and, once it has launched, left
torch's parallel ops oversubscribed: measured on the 2-core CI machine, a
2.3K-token one-shot prefill took 7.3 s on stock attention in the server and
16-27 s on the sparse paths (one static-pattern layer: 1.2 s instead of 40
ms); with the work queue 3.7 s and 2.6-3.8 s.  The work queue takes one
parallel launch at a time: callers hold ``lock``.  The planner's loops run on
torch's own OpenMP team instead (``torch_threads``).
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
        numba.config.THREADING_LAYER = "workqueue"

lock = threading.Lock()


def available() -> bool:
    return numba is not None
