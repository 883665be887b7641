"""``torch_threads.parallel_for``: every task once, the arguments as given, on torch's OpenMP team."""

import numpy as np
import pytest
import torch

from sglang_loopserve.cpu_runtime import torch_threads
from sglang_loopserve.cpu_runtime.numba_setup import njit


@njit(cache=True, nogil=True)
def _body(task, thread, values, out, scale, offset, negate, threads, rows):
    """Task ``t``: ``out[t] = ±(sum of row t) * scale + offset``; the thread and a row written."""
    total = 0.0
    for x in range(values.shape[1]):
        total += values[task, x]
    total = total * scale + offset
    out[task] = -total if negate else total
    threads[task] = thread
    for x in range(rows.shape[2]):
        rows[task // rows.shape[1], task % rows.shape[1], x] += 1


def _run(monkeypatch, openmp: bool, n_tasks=37):
    if not openmp:
        monkeypatch.setattr(torch_threads, "_openmp", None)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n_tasks, 50)).astype(np.float32)
    out = np.zeros(n_tasks)
    threads = np.full(n_tasks, -1, dtype=np.int64)
    rows = np.zeros((n_tasks, 1, 3), dtype=np.int16)
    torch_threads.parallel_for(_body, n_tasks, values, out, 0.5, 3, True, threads, rows)
    expected = -(values.astype(np.float64).sum(1) * 0.5 + 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert (rows == 1).all()  # every task ran exactly once
    assert ((threads >= 0) & (threads < torch_threads.n_threads())).all()


def test_openmp_team_runs_every_task_once(monkeypatch):
    # torch's wheels for Linux run on their own libgomp: the planner's loops must use that team
    assert torch_threads.uses_torch_openmp()
    _run(monkeypatch, openmp=True)


def test_prange_fallback_runs_every_task_once(monkeypatch):
    _run(monkeypatch, openmp=False)


def test_zero_tasks_is_a_no_op():
    out = np.zeros(2)
    torch_threads.parallel_for(_body, 0, np.ones((2, 2), dtype=np.float32), out, 1.0, 0, False,
                               np.zeros(2, dtype=np.int64), np.zeros((2, 1, 1), dtype=np.int16))
    assert (out == 0).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="C-contiguous"):
        torch_threads.parallel_for(_body, 1, np.ones((4, 4), dtype=np.float32)[:, ::2], np.zeros(1), 1.0, 0,
                                   False, np.zeros(1, dtype=np.int64), np.zeros((1, 1, 1), dtype=np.int16))
    with pytest.raises(TypeError, match="Tensor"):
        torch_threads.parallel_for(_body, 1, torch.ones(1, 2), np.zeros(1), 1.0, 0, False,
                                   np.zeros(1, dtype=np.int64), np.zeros((1, 1, 1), dtype=np.int16))


def test_the_runtime_is_torchs_own_or_the_only_one():
    torch_dir = "/env/site-packages/torch"
    own = "/env/site-packages/torch/lib/libgomp.so.1"
    system = "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0"
    other = ["/usr/lib/libc.so.6", "/env/site-packages/numpy/core/libfoo.so"]
    assert torch_threads.choose_runtime([system, own, *other], torch_dir) == own  # never numba's second one
    wheel = "/env/site-packages/torch.libs/libgomp-a34b3233.so.1.0.0"
    assert torch_threads.choose_runtime([wheel, system], torch_dir) == wheel
    assert torch_threads.choose_runtime([system, *other], torch_dir) == system  # conda / distro torch
    assert torch_threads.choose_runtime([system, "/opt/intel/libiomp5.so"], torch_dir) is None  # which one?
    assert torch_threads.choose_runtime(other, torch_dir) is None
