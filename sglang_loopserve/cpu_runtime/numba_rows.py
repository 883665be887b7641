"""Row helpers shared by the CPU loops (``attention/cpu_loops.py``, ``cache_policy/cpu_loops.py``).

numba has no bfloat16 and no vectorised ``exp`` (without Intel's SVML its
``np.exp`` is a libm call per element, 14 us for a row of 4K floats), and a
float ``max`` reduction in strict order does not vectorise either (2 us for
4K).  These helpers do each in a form LLVM vectorises:

* ``float_row`` / ``load_row``: a row of a cache or a product as float32:
  bfloat16 bits widened by a shift (a bf16 is the top half of a float32);
* ``row_max``: the maximum through the float's bits, ordered as integers
  (0.15 us for 4K);
* ``exp_shifted``: ``exp(row - top)`` in place as a polynomial (Cephes'
  ``expf``, relative error ~1e-7; 0.5 us for 4K), returning the sum.
"""

from __future__ import annotations

import numpy as np
import torch

from .numba_setup import njit, numba

#: Tensor dtypes the loops read in place, and the dtype numba sees them as (it has no bfloat16:
#: the bits as int16, widened by ``float_row`` / ``load_row``).
READS = {torch.float32: torch.float32, torch.bfloat16: torch.int16}


def numba_view(t: torch.Tensor) -> np.ndarray:
    """``t`` (float32 or bfloat16, on the CPU) as the numpy array the loops read, without a copy."""
    return t.view(READS[t.dtype]).numpy()

if numba is not None:
    from numba import types
    from numba.extending import overload

    def float_row(row, buf):
        """A row as float32: itself, or (bfloat16 bits) widened into ``buf`` (uint32)."""

    @overload(float_row, inline="always")
    def _float_row_typed(row, buf):
        if isinstance(row.dtype, types.Float):
            return lambda row, buf: row

        def widen(row, buf):
            for x in range(buf.shape[0]):
                buf[x] = (np.uint32(row[x]) & np.uint32(0xFFFF)) << 16
            return buf.view(np.float32)
        return widen

    def load_row(row, out):
        """``out[:] = row`` as float32 (``row``: float32, or bfloat16 bits as int16)."""

    @overload(load_row, inline="always")
    def _load_row_typed(row, out):
        if isinstance(row.dtype, types.Float):
            def copy(row, out):
                for x in range(out.shape[0]):
                    out[x] = row[x]
            return copy

        def widen(row, out):
            bits = out.view(np.uint32)
            for x in range(out.shape[0]):
                bits[x] = (np.uint32(row[x]) & np.uint32(0xFFFF)) << 16
        return widen

    @njit(inline="always")
    def row_max(row):
        """The largest of a float32 row (``-inf`` for an empty one): the floats' bits with the
        magnitude bits of negatives flipped order as the floats do, and an integer maximum
        vectorises."""
        bits = row.view(np.int32)
        top = np.int32(-(2**31))
        for x in range(bits.shape[0]):
            b = bits[x]
            top = max(top, b ^ ((b >> 31) & np.int32(0x7FFFFFFF)))
        if bits.shape[0] == 0:
            return np.float32(-np.inf)
        out = np.empty(1, dtype=np.int32)
        out[0] = top ^ ((top >> 31) & np.int32(0x7FFFFFFF))
        return out.view(np.float32)[0]

    @njit(inline="always", fastmath={"reassoc", "contract"})
    def exp_shifted(row, top, scratch):
        """``row[c] = exp(row[c] - top)`` in place, returning their sum (``-inf`` counts as
        ``e^-87``, negligible).  ``scratch``: int32, at least as long as ``row``."""
        m = row.shape[0]
        for c in range(m):
            x = max(row[c] - top, np.float32(-87.0))  # e^-87 is still a normal float
            t = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
            r = x - t * np.float32(0.693359375) + t * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            row[c] = p * r * r + r + np.float32(1.0)
            scratch[c] = np.int32(t) << 23
        bits = row.view(np.int32)
        total = np.float32(0.0)
        for c in range(m):
            bits[c] += scratch[c]  # times 2^t
            total += row[c]
        return total
