"""A Talkative server in its own process for the benchmarks: a free loopback port, readiness, a SIGTERM stop.

The benchmarks measure the real server as users run it (`talkative serve` in a process of its own), so they
start it here rather than in-process; both serve.py and load.py use this one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class ServerProcess:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - the process owns it
        full_env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "talkative.cli", "serve"],
            cwd=workdir,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise SystemExit(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM drains the server (docs/reliability.md); kill it if the drain takes longer than `timeout`."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
