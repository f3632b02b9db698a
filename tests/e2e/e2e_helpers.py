"""Helpers of the end-to-end tests: a server process and its HTTP and WebSocket clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[2]

#: options that keep tiny-model jobs quick: one sample per position, no KL, no salience
FAST: dict[str, Any] = {
    "no_kl": True,
    "calculate_token_salience": False,
    "optimize_explanations_config": {"best_of_k": 1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `talkative serve` process; `kill()` is a hard stop (SIGKILL), `start()` runs it again."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str = "server") -> None:
        self.workdir = workdir
        self.env = env
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 180) -> Server:
        self.starts += 1
        # a Ray address of the caller's environment is not inherited: a server joins only a cluster its test names
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env = {**inherited, **self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "talkative.cli", "serve"],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self, tail: int | None = 6000) -> str:
        """The server's log: its last `tail` characters (enough for a failure message), or all of it with None
        (what a test searching for a line needs: access lines of polling can push an early line out of a tail)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text if tail is None else text[-tail:]

    # -- clients ------------------------------------------------------------------------------------------------
    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kw)

    def analyze(self, text: str, options: dict[str, Any] | None = None, **extra: Any) -> str:
        r = self.post("/analyze", {"text": text, "options": FAST if options is None else options, **extra})
        assert r.status_code == 200, r.text
        return str(r.json()["request_id"])

    def status(self, request_id: str) -> dict[str, Any]:
        r = self.get(f"/status/{request_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(
        self, request_id: str, until: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 180
    ) -> dict[str, Any]:
        """Poll /status until `until(body)` (default: a terminal status)."""
        until = until or (lambda b: b["status"] in ("completed", "failed", "cancelled"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            body = self.status(request_id)
            if until(body):
                return body
            if body["status"] in ("completed", "failed", "cancelled"):
                raise AssertionError(f"{request_id} ended before getting there: {body}")
            time.sleep(0.05)
        raise AssertionError(f"{request_id} did not get there in {timeout}s: {self.status(request_id)}")

    def ws(self) -> ClientConnection:
        return connect(self.ws_url, open_timeout=30, max_size=None)


def recv_until(
    ws: ClientConnection, pred: Callable[[dict[str, Any]], bool], timeout: float = 120
) -> list[dict[str, Any]]:
    """Messages up to and including the first one matching `pred`."""
    out = []
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError(f"no matching message within {timeout}s; got {[m.get('type') for m in out]}")
        msg = json.loads(ws.recv(timeout=left))
        out.append(msg)
        if pred(msg):
            return out
