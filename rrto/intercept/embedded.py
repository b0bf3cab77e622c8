"""An rrto-server child process on a free loopback port (no torch here: ``rrto run`` uses it too)."""
from __future__ import annotations

import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LinkError


class EmbeddedServer:
    """An rrto-server child process on a free loopback port, stopped with the robot."""

    def __init__(self, start_timeout: float = 120.0):
        root = Path(__file__).resolve().parents[2]  # the folder holding rrto/ and server/
        cmd = [sys.executable, "-m", "server", "--listen", "tcp://127.0.0.1:0", "--exit-with-parent",
               "--log-level", "warning"]
        # cwd=root: `-m server` must find our server package, not a server.py of the app's.
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.url = self._wait_ready(start_timeout)

    def _wait_ready(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and not line:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if not line:
                    break  # the server exited before it was ready
            elif self.proc.poll() is not None:
                break
        sel.close()
        m = re.search(r"listening on (\S+)", line)
        if not m:
            self.stop()
            raise LinkError("the embedded rrto server did not start (see its messages above); "
                            "run `rrto-server --device cpu` yourself to see why, and pass --server")
        return m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
