"""The CPU loops' shared row helpers (``numba_rows``) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch



def _kernels():
    from sglang_loopserve.cpu_runtime.numba_rows import exp_shifted, load_row, row_max
    from sglang_loopserve.cpu_runtime.numba_setup import njit

    @njit
    def max_of(row):
        return row_max(row)

    @njit
    def softmax_sum(row, top, scratch):
        return exp_shifted(row, top, scratch)

    @njit
    def loaded(row, out):
        load_row(row, out)
        return out

    return max_of, softmax_sum, loaded


def test_row_max_orders_floats_by_their_bits():
    max_of, _, _ = _kernels()
    g = np.random.default_rng(0)
    for row in (g.standard_normal(1000).astype(np.float32) * 50,
                -np.abs(g.standard_normal(257)).astype(np.float32) - 1.0,  # all negative
                np.array([-np.inf, -3.0, -np.inf], dtype=np.float32),
                np.array([0.0, -0.0, -1e-30], dtype=np.float32),
                np.array([7.5], dtype=np.float32)):
        assert max_of(row) == row.max()
    assert max_of(np.array([-np.inf, -np.inf], dtype=np.float32)) == -np.inf
    assert max_of(np.zeros(0, dtype=np.float32)) == -np.inf


def test_exp_shifted_is_exp_within_float32_rounding():
    _, softmax_sum, _ = _kernels()
    g = np.random.default_rng(1)
    row = (g.standard_normal(4099) * 20).astype(np.float32)
    row[5] = -np.inf  # masked: contributes e^-87, nothing
    top = row.max()
    shifted = row - top  # in float32, as the kernel takes it
    expect = np.exp(shifted.astype(np.float64))
    out = row.copy()
    total = softmax_sum(out, top, np.empty(row.size, dtype=np.int32))
    normal = shifted > -87.0  # below, e^-87 stands in: a normal float, negligible in any sum
    np.testing.assert_allclose(out[normal], expect[normal], rtol=3e-7)
    np.testing.assert_allclose(out[~normal], np.exp(-87.0), rtol=1e-6)
    assert total == pytest.approx(expect.sum(), rel=1e-6)


def test_load_row_widens_bfloat16_bits():
    _, _, loaded = _kernels()
    x = torch.randn(300) * 100
    bits = x.bfloat16().view(torch.int16).numpy()
    out = loaded(bits, np.empty(300, dtype=np.float32))
    np.testing.assert_array_equal(out, x.bfloat16().float().numpy())
    np.testing.assert_array_equal(loaded(x.numpy(), np.empty(300, dtype=np.float32)), x.numpy())
