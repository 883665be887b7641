"""Parallel loops of the numba kernels on torch's own OpenMP threads.

numba's threading layers start threads of their own.  On a machine with as
many cores as torch has threads that is a loss: after each parallel torch op
the workers of torch's OpenMP runtime (libgomp) spin for milliseconds waiting
for the next one, on the cores numba's workers need.  Measured on the 2-core
CI machine: a 7 ms loop of 144 tasks took 3.5 ms on numba's two workers, and
7 ms when a torch matmul had run just before it (so always, in a forward); the
planner's loops on two workers took as long as on one.

``parallel_for(body, n_tasks, *args)`` runs ``body(task, thread, *args)`` for
every task on the team of the OpenMP runtime torch itself uses: the call is
``GOMP_parallel`` of that library (ctypes, the GIL released), the team's
function a numba ``cfunc`` made for the arguments' types that takes tasks
from an atomic counter (dynamic: tasks differ in cost).  The worker that would
spin takes a task instead: the same loop took 3.6 ms after the matmul.
``thread`` is the caller's index in the team, for per-thread scratch rows
(``n_threads()`` of them).

Where torch runs no OpenMP runtime this module can find (another parallel
backend, or several runtimes loaded and none from torch's folder), the same
bodies run in a numba ``prange`` over the tasks.

A body is an ``@njit`` function; its arguments are C-contiguous numpy arrays,
ints, floats or bools.  Bodies must not raise (a ``cfunc`` cannot pass an
exception on): the callers check their inputs first.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

from .numba_setup import numba, njit

_launchers: dict = {}
_launchers_lock = threading.Lock()


#: OpenMP runtimes with GNU's entry points (``GOMP_parallel``): libgomp, and LLVM's and Intel's,
#: which implement them too.
_RUNTIMES = ("libgomp", "libomp", "libiomp5")


def choose_runtime(loaded, torch_dir: str):
    """Of the shared objects ``loaded`` (paths), the OpenMP runtime torch runs on, or None: the one
    in torch's own folder (its wheels ship one), else the only runtime loaded at all (torch linked
    against the system's or an environment's)."""
    runtimes = sorted(path for path in loaded if os.path.basename(path).startswith(_RUNTIMES))
    own = [path for path in runtimes if any(path.startswith(root + os.sep) for root in (torch_dir, torch_dir + ".libs"))]
    chosen = own or (runtimes if len(runtimes) == 1 else [])
    return chosen[0] if chosen else None


def _torch_openmp():
    """ctypes of the OpenMP library torch's parallel ops run on (``choose_runtime``), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if line.rstrip().split()[-1].startswith("/")}
    except OSError:
        return None
    path = choose_runtime(loaded, os.path.dirname(torch.__file__))
    if path is None:
        return None
    lib = ctypes.CDLL(path)  # already loaded by torch: the same instance, not a second runtime
    if not hasattr(lib, "GOMP_parallel"):
        return None
    lib.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel.restype = None
    lib.omp_get_thread_num.argtypes = []
    lib.omp_get_thread_num.restype = ctypes.c_int
    return lib


_openmp = _torch_openmp() if numba is not None else None


def uses_torch_openmp() -> bool:
    """Whether ``parallel_for`` runs on torch's OpenMP team (else on numba's threads)."""
    return _openmp is not None


def n_threads() -> int:
    """How many threads a ``parallel_for`` may use: the bound of its ``thread`` argument."""
    return torch.get_num_threads() if _openmp is not None else numba.get_num_threads()


if numba is not None:
    from numba import carray, cfunc, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _address(typingctx, value):
        """An int64 as a ``void*``."""
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
        return types.voidptr(value), codegen

    @intrinsic
    def _as_float(typingctx, bits):
        """The float64 whose bits an int64 holds."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float64))
        return types.float64(bits), codegen

    @intrinsic
    def _next_task(typingctx, slots):
        """Atomically ``slots[0] += 1``, returning the old value."""
        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, signature.args[0], array,
                                               [context.get_constant(types.intp, 0)])
            return builder.atomic_rmw("add", pointer, context.get_constant(types.int64, 1), "monotonic")
        return types.int64(slots), codegen


def _kind(value):
    """The type key of one argument, and its slots (int64s) in the call's block."""
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise ValueError("parallel_for takes C-contiguous arrays")
        return ("array", value.dtype.name, value.ndim), [value.ctypes.data, *value.shape]
    if isinstance(value, (bool, np.bool_)):
        return ("bool",), [int(value)]
    if isinstance(value, (int, np.integer)):
        return ("int",), [int(value)]
    if isinstance(value, (float, np.floating)):
        return ("float",), [int(np.array(float(value)).view(np.int64))]
    raise TypeError(f"parallel_for takes arrays, ints, floats and bools, got {type(value).__name__}")


def _openmp_launcher(body, kinds):
    """A ``cfunc`` for ``GOMP_parallel``: rebuilds the arguments from the block of int64 slots
    (``[next task, n_tasks, *args]``) and runs tasks until none is left."""
    lines = ["def team(data):", "    slots = carray(data, (3,), np.int64)",
             "    block = carray(data, (slots[2],), np.int64)", "    thread = thread_num()"]
    names, at = [], 3
    for i, kind in enumerate(kinds):
        name = f"a{i}"
        if kind[0] == "array":
            shape = ", ".join(f"block[{at + 1 + d}]" for d in range(kind[2]))
            lines.append(f"    {name} = carray(address(block[{at}]), ({shape},), np.{kind[1]})")
            at += 1 + kind[2]
        else:
            cast = {"bool": "block[{}] != 0", "int": "block[{}]", "float": "as_float(block[{}])"}[kind[0]]
            lines.append(f"    {name} = {cast.format(at)}")
            at += 1
        names.append(name)
    lines += ["    while True:", "        task = next_task(block)", "        if task >= block[1]:",
              "            break", f"        body(task, thread, {', '.join(names)})"]
    scope = dict(carray=carray, address=_address, as_float=_as_float, next_task=_next_task, np=np,
                 thread_num=_openmp.omp_get_thread_num, body=body)
    exec("\n".join(lines), scope)  # noqa: S102 - the source is built above from type names only
    return cfunc(types.void(types.voidptr), nogil=True)(scope["team"])


def _prange_launcher(body, n_args):
    names = ", ".join(f"a{i}" for i in range(n_args))
    source = (f"def team(n_tasks, {names}):\n    for task in prange(n_tasks):\n"
              f"        body(task, numba.get_thread_id(), {names})")
    scope = dict(prange=prange, numba=numba, body=body)
    exec(source, scope)  # noqa: S102
    return njit(parallel=True, nogil=True)(scope["team"])


def parallel_for(body, n_tasks: int, *args) -> None:
    """``body(task, thread, *args)`` for ``task`` in ``range(n_tasks)``, in parallel (see the
    module).  Callers serialise their calls (``numba_setup.lock``): scratch rows per thread."""
    if n_tasks <= 0:
        return
    if _openmp is None:
        key = (body, len(args))
        with _launchers_lock:
            if key not in _launchers:
                _launchers[key] = _prange_launcher(body, len(args))
        _launchers[key](n_tasks, *args)
        return
    kinds, slots = [], [0, n_tasks, 0]
    for value in args:
        kind, values = _kind(value)
        kinds.append(kind)
        slots += values
    slots[2] = len(slots)
    key = (body, tuple(kinds))
    with _launchers_lock:
        if key not in _launchers:
            _launchers[key] = _openmp_launcher(body, kinds)
    block = np.array(slots, dtype=np.int64)
    _openmp.GOMP_parallel(_launchers[key].address, block.ctypes.data, n_threads(), 0)
