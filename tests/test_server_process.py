"""SGLangServer stops the launcher and every process it spawned."""

from __future__ import annotations

import os
import sys
import time

import pytest

from sglang_loopserve.server import SGLangServer, ServerStartError


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
