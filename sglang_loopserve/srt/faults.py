"""What happens when LoopServe's own code fails for one request, and the test hook that makes it.

SGLang lets an exception in a forward kill the scheduler, and with it the server
(``run_scheduler_process`` signals the launcher, which kills its process tree). LoopServe's
per-request work (planning, selection, its kernels) must not take the other requests down: the
backend catches it, serves that request's attention exactly for the forward (so the KV it writes
is stock's), and finishes the request with an error (``FINISH_ABORT``, HTTP 500 naming LoopServe)
at the end of the step. Queries or keys holding NaN/Inf are not faults: the exact path serves that
forward, as stock would, and the request's stats count it.

Test hook: ``SGLANG_LOOPSERVE_INJECT_FAULT=<phase>:<rid prefix>`` (phase ``prefill`` or
``decode``) raises ``InjectedFault`` inside LoopServe's per-request work for every request whose
id starts with the prefix. Read once per scheduler process; unset, it costs nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

INJECT_ENV = "SGLANG_LOOPSERVE_INJECT_FAULT"
PHASES = ("prefill", "decode")


class InjectedFault(RuntimeError):
    """Raised by the test hook."""


@dataclass
class FaultStats:
    """Process-wide counters, in ``/server_info``'s ``internal_states[].loopserve.faults``."""

    requests_failed: int = 0  # requests finished with an error after LoopServe's code raised
    nonfinite_exact_layers: int = 0  # layer forwards served exactly: NaN/Inf queries or keys

    def as_dict(self) -> dict:
        return {"requests_failed": self.requests_failed, "nonfinite_exact_layers": self.nonfinite_exact_layers}


stats = FaultStats()


def injection_from_env(value: str | None = None) -> tuple[str, str] | None:
    """``(phase, rid prefix)`` from ``SGLANG_LOOPSERVE_INJECT_FAULT``; a malformed value stops
    the process naming the variable."""
    value = os.environ.get(INJECT_ENV) if value is None else value
    if not value:
        return None
    phase, sep, prefix = value.partition(":")
    if not sep or phase not in PHASES or not prefix:
        raise ValueError(f"{INJECT_ENV} must be '<phase>:<rid prefix>' with phase one of {PHASES}, "
                         f"got {value!r}")
    return phase, prefix


class FaultHook:
    """Raises for the requests the test hook names (``None``: never)."""

    def __init__(self, injection: tuple[str, str] | None):
        self.phase, self.prefix = injection or (None, None)

    def check(self, phase: str, rid: str) -> None:
        if self.phase == phase and rid.startswith(self.prefix):
            raise InjectedFault(f"injected fault in LoopServe's {phase} ({INJECT_ENV})")


def fail_request(req, rid: str, exc: BaseException) -> None:
    """Finish ``req`` with an error at the end of this step (its KV row is freed by SGLang's
    finish path); log the exception once."""
    if getattr(req, "loopserve_failed", False):
        return
    stats.requests_failed += 1
    logger.error("LoopServe failed on request %s; it is finished with an error, the others go on",
                 rid, exc_info=exc)
    if req is None:
        return
    req.loopserve_failed = True
    from http import HTTPStatus

    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    req.to_finish = FINISH_ABORT(
        f"LoopServe failed on this request ({type(exc).__name__}: {exc}); the server serves on",
        HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


def failed(req) -> bool:
    return bool(getattr(req, "loopserve_failed", False))
