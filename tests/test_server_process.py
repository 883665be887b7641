"""SGLangServer stops the launcher and every process it spawned."""

from __future__ import annotations

import os
import sys
import time

import pytest

from sglang_loopserve.server import PortTakenError, SGLangServer, ServerStartError


class FakeServer(SGLangServer):
    """A 'server' that spawns a grandchild and never becomes healthy."""

    def __init__(self, tmp_path, script):
        super().__init__("unused", log_path=tmp_path / "log")
        self.script = script

    def command(self):
        return [sys.executable, "-c", self.script]


SPAWNER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('child', child.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_timeout_kills_the_whole_group(tmp_path):
    srv = FakeServer(tmp_path, SPAWNER)
    with pytest.raises(ServerStartError, match="not healthy"):
        srv.start(timeout=3)
    pids = [int(line.split()[1]) for line in (tmp_path / "log").read_text().splitlines()
            if line.startswith("child")]
    assert pids, "the fake server did not start its child"
    time.sleep(0.5)
    assert not alive(pids[0])
    assert srv.proc is None


def test_early_exit_is_reported_with_log(tmp_path):
    srv = FakeServer(tmp_path, "import sys; print('bad flag --x'); sys.exit(3)")
    with pytest.raises(ServerStartError, match="code 3") as exc:
        srv.start(timeout=30)
    assert "bad flag --x" in str(exc.value)


class PortStealer(FakeServer):
    """Its first start-ups find their port taken (uvicorn's message, then the launcher hangs on);
    a later one serves /health."""

    def __init__(self, tmp_path, taken_starts, port=None):
        super().__init__(tmp_path, "")
        self._pick_port = port is None
        self.port = port or self.port
        self.taken_starts, self.ports = taken_starts, []

    def command(self):
        self.ports.append(self.port)
        if len(self.ports) <= self.taken_starts:
            msg = (f"ERROR:    [Errno 98] error while attempting to bind on address ('{self.host}', {self.port}): "
                   f"address already in use")
            return [sys.executable, "-c", f"import time; print({msg!r}, flush=True); time.sleep(600)"]
        handler = ("from http.server import BaseHTTPRequestHandler as B, HTTPServer as S\n"
                   "class H(B):\n"
                   "    def do_GET(self):\n"
                   "        self.send_response(200); self.end_headers()\n"
                   f"S(('{self.host}', {self.port}), H).serve_forever()\n")
        return [sys.executable, "-c", handler]


def test_a_port_taken_during_start_up_is_retried_on_a_fresh_one(tmp_path):
    srv = PortStealer(tmp_path, taken_starts=2)
    with srv:
        assert len(srv.ports) == 3 and len(set(srv.ports)) == 3
    fixed = PortStealer(tmp_path, taken_starts=1, port=srv.ports[0])
    with pytest.raises(PortTakenError):  # a port the caller chose is not changed behind its back
        fixed.start(timeout=30)


def test_cpu_servers_outlast_sglangs_watchdog_unless_told_otherwise():
    # A long prefill on 2 busy cores outlasts SGLang's default watchdog (300 s), which exits the server.
    cmd = SGLangServer("/m", port=1).command()
    assert cmd[cmd.index("--watchdog-timeout") + 1] == "3600"
    own = SGLangServer("/m", port=1, extra_args=["--watchdog-timeout", "60"]).command()
    assert own.count("--watchdog-timeout") == 1 and own[own.index("--watchdog-timeout") + 1] == "60"
    assert "--watchdog-timeout" not in SGLangServer("/m", port=1, device="cuda").command()
