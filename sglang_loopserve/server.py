"""Start and stop an SGLang server as a child process, leaving no orphans.

Used by ``make run`` and by the test session fixture.  The server runs in its
own process session so that one signal reaches the launcher *and* the
scheduler/detokenizer processes it spawns; :meth:`SGLangServer.stop` is called
from ``finally``/``__exit__`` and from SIGTERM, so Ctrl-C or an exception in
the caller tears the whole group down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import requests

#: KV pool bound used by default: start-up allocates the whole pool, and an
#: unbounded one costs ~20 s and ~14 GB on a CPU host.
DEFAULT_MAX_TOTAL_TOKENS = 32768
#: SGLang's watchdog on a CPU: a forward batch may take this long before the server exits.
CPU_WATCHDOG_TIMEOUT_S = 3600


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


class PortTakenError(ServerStartError):
    """Another socket took the HTTP port before the server bound it (SGLang binds it last,
    after loading the model; its own internal ports are picked among the free ones meanwhile)."""


#: Start-ups retried on a fresh port when the chosen one was taken meanwhile.
PORT_RETRIES = 3


def loopserve_states(url: str, timeout: float = 60) -> list[dict]:
    """Each scheduler rank's LoopServe state (``/server_info``'s ``internal_states[].loopserve``:
    stats, radix, faults, idle check, gates), in data-parallel rank order (SGLang lists them in
    the order the ranks answer)."""
    info = requests.get(url + "/server_info", timeout=timeout).json()
    return sorted((s["loopserve"] for s in info["internal_states"]), key=lambda s: s.get("dp_rank", 0))


def loopserve_state(url: str, timeout: float = 60) -> dict:
    """A LoopServe server's own state: its first data-parallel rank's (``loopserve_states``)."""
    return loopserve_states(url, timeout)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ProcessGroup:
    """A child process in a session of its own, with what it spawned; ``start()`` is the subclass's."""

    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _log_file = None

    def start(self):
        raise NotImplementedError

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``command`` in a session of its own (one signal reaches all it spawns), its output
        into ``log_path`` (or nowhere)."""
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self._log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def stop(self, grace: float = 20.0) -> None:
        """Stop the launcher and every process it spawned (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            # The launcher may be gone while its children linger: kill the group.
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class SGLangServer(_ProcessGroup):
    """``python -m sglang.launch_server`` on the CPU, health-checked.

    >>> with SGLangServer(model_path) as server:
    ...     requests.post(server.url + "/generate", json=...)
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        max_total_tokens: int | None = DEFAULT_MAX_TOTAL_TOKENS,
        device: str | None = "cpu",
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        self.model_path = str(model_path)
        self.host = host
        self._pick_port = port is None  # ours to change if it is taken before the server binds it
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.max_total_tokens = max_total_tokens
        self.device = device
        self.log_path = Path(log_path) if log_path else None
        self.env = env

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", self.host, "--port", str(self.port)]
        if self.device:
            cmd += ["--device", self.device]
        if self.device == "cpu":
            # An idle scheduler otherwise polls without pause and takes a whole
            # core from the ones that compute (several servers share 2 cores in tests).
            cmd += ["--sleep-on-idle"]
            if not any(a.startswith("--watchdog-timeout") for a in self.extra_args):
                # SGLang kills a server whose forward batch outlasts this (default 300 s); one
                # prefill of a long turn on 2 busy cores can: the quality model's 2.2K-token turn
                # took over 300 s beside the test servers.
                cmd += ["--watchdog-timeout", str(CPU_WATCHDOG_TIMEOUT_S)]
        if self.max_total_tokens:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        return cmd + self.extra_args

    def start(self, timeout: float = 600.0) -> "SGLangServer":
        for attempt in range(PORT_RETRIES + 1):
            try:
                return self._start_once(timeout)
            except PortTakenError:
                if not self._pick_port or attempt == PORT_RETRIES:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "SGLangServer":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._spawn(self.command(), env)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"server exited with code {self.proc.returncode} during start-up\n{self.log_tail()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                if f"address ('{self.host}', {self.port}): address already in use" in self.log_tail(200):
                    # uvicorn failed to bind, and the launcher waits on: give up on this port now.
                    raise PortTakenError(f"port {self.port} was taken during start-up") from None
            time.sleep(1.0)
        raise ServerStartError(f"server not healthy after {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no server log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

class Router(_ProcessGroup):
    """SGLang's router (PyPI ``sglang-router``) over running workers, as a child process group.

    >>> with Router([w.url for w in workers], policy="cache_aware") as router:
    ...     requests.post(router.url + "/generate", json=...)

    Ready when its ``/readiness`` answers 200: the workers registered and healthy (``/health``
    answers before that)."""

    def __init__(self, worker_urls: Sequence[str], *, policy: str = "cache_aware", port: int | None = None,
                 host: str = "127.0.0.1", extra_args: Sequence[str] = (), log_path: str | os.PathLike | None = None):
        self.worker_urls, self.policy, self.host = list(worker_urls), policy, host
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", self.host, "--port", str(self.port),
                "--policy", self.policy, "--worker-urls", *self.worker_urls, *self.extra_args]

    def start(self, timeout: float = 120.0) -> "Router":
        self._spawn(self.command())
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"router exited with code {self.proc.returncode} during start-up")
                try:
                    if requests.get(self.url + "/readiness", timeout=5).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(1.0)
            raise ServerStartError(f"router not ready after {timeout:.0f} s")
        except BaseException:
            self.stop()
            raise


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks stop servers."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
