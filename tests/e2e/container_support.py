"""The container test's machinery: a Docker engine, a locally made base image, the image build, timings.

No image registry is reachable from the machines these tests run on, so nothing is pulled: the base image is a
Debian bookworm root filesystem made by `debootstrap` (python3 and venv) and brought in with `docker import`, and
torch comes from the CPU wheel that pip resolves on this host. What takes minutes (the root filesystem, the
engine's layers, the torch wheel) is kept in a cache directory outside the repository
(`$TALKATIVE_TEST_CACHE`, default `~/.cache/talkative-test`), so a rerun rebuilds only what changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from e2e_helpers import REPO

#: the packages of the base image: python3 and venv, as the Dockerfile's build stage needs
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: the root filesystem's name; a new package list makes a new tarball
ROOTFS_KEY = hashlib.sha256(" ".join(("bookworm", *BASE_PACKAGES)).encode()).hexdigest()[:12]
TORCH_SPEC = "torch==2.13.0"


def cache_dir() -> Path:
    path = Path(
        os.environ.get("TALKATIVE_TEST_CACHE", Path.home() / ".cache" / "talkative-test")
    ).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Timings:
    """Seconds per step, printed at the end and written to the cache for docs/deploy.md."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = round(time.monotonic() - start, 1)
            print(f"[container test] {name}: {self.steps[name]} s", flush=True)

    def save(self, extra: dict[str, object]) -> Path:
        path = cache_dir() / "last-run.json"
        path.write_text(json.dumps({"seconds": self.steps, **extra}, indent=2))
        return path


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True) -> str:
    """A command's stdout; on failure the error names the command and carries its output."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


class Engine:
    """A Docker engine: the one already running, or a `dockerd` started here and stopped by `close()`.

    A started engine keeps its images in the cache directory (so a rerun finds the layers it built) and its
    sockets and state in a temporary directory; a lock keeps two test runs from sharing one data root.
    """

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._lock: int | None = None
        self.log_path: Path | None = None

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        return run("docker", *args, env=self.env, timeout=timeout, check=check)

    def _answers(self) -> bool:
        try:
            self.docker("version", "--format", "{{.Server.Version}}", timeout=20)
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def start(self) -> Engine:
        if shutil.which("docker") is None:
            raise RuntimeError("no docker command: `make test` installs Debian's docker.io")
        if self._answers():
            return self
        if shutil.which("dockerd") is None:
            raise RuntimeError("no Docker engine runs and dockerd is missing: `make test` installs docker.io")
        self._lock = os.open(cache_dir() / "dockerd.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # another run's engine on the same data root: wait for it
        self._tmp = Path(tempfile.mkdtemp(prefix="tkd-", dir="/tmp"))  # short: socket paths are limited
        sock = self._tmp / "docker.sock"
        self.log_path = self._tmp / "dockerd.log"
        self.proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={cache_dir() / 'docker'}",
                f"--exec-root={self._tmp / 'exec'}",
                f"--pidfile={self._tmp / 'dockerd.pid'}",
                f"--host=unix://{sock}",
            ],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log()}")
            if sock.exists() and self._answers():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer within 60 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and containerd
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(30)
            self.proc = None
        if self._tmp is not None:
            # dockerd leaves its network namespace bind-mounted under the exec root: unmount, then remove.
            prefix = str(self._tmp) + "/"
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
                run("umount", mount, check=False)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def rootfs_tarball() -> Path:
    """A minimal bookworm root filesystem with python3 and venv, made once with debootstrap and cached."""
    tarball = cache_dir() / f"bookworm-python-{ROOTFS_KEY}.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing: `make test` installs it")
    mirror = os.environ.get("TALKATIVE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        root = Path(tmp) / "root"
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(root),
            mirror,
            timeout=1200,
        )
        # What an image never reads: package caches, indexes, documentation, translations.
        for sub in (
            "var/cache/apt",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
        ):
            shutil.rmtree(root / sub, ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        run("tar", "-C", str(root), "-cf", str(partial), ".", timeout=600)
        partial.rename(tarball)
    return tarball


def host_ca_bundle() -> Path:
    """The CA bundle this host's pip trusts (a proxy that intercepts TLS has its own CA in it)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return Path("/etc/ssl/certs/ca-certificates.crt")


def base_image(engine: Engine) -> str:
    """The local base image: the cached root filesystem, imported, with this host's CA bundle for pip.

    The CA layer is built at every run (seconds) rather than cached in the tarball, because a host's intercepting
    CA may change between runs.
    """
    tarball = rootfs_tarball()
    rootfs = f"talkative-test-rootfs:{ROOTFS_KEY}"
    if not engine.docker("images", "-q", rootfs).strip():
        engine.docker("import", str(tarball), rootfs, timeout=600)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(host_ca_bundle(), Path(tmp) / "ca-certificates.crt")
        (Path(tmp) / "Dockerfile").write_text(
            f"FROM {rootfs}\n"
            "COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n"
        )
        tag = "talkative-test-base:latest"
        engine.docker("build", "-q", "-t", tag, tmp, timeout=300)
    return tag


def torch_wheel() -> Path:
    """The torch wheel pip resolves on this host (the CPU build here), downloaded once into the cache."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob("torch-2.13.0*.whl"))
    if found:
        return found[0]
    run(sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), TORCH_SPEC, timeout=1200)
    found = sorted(wheels.glob("torch-2.13.0*.whl"))
    if not found:
        raise RuntimeError(f"pip download {TORCH_SPEC} left no wheel in {wheels}")
    return found[0]


def build_context(dest: Path, wheel: Path) -> Path:
    """A snapshot of what the image is built from: the working tree's files that git does not ignore, plus the
    torch wheel in wheels/.

    A snapshot (rather than the tree itself) keeps the wheel out of the repository and the build independent of
    files other work writes meanwhile; the Dockerfile's .dockerignore still applies.
    """
    files = run("git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard").split(
        "\0"
    )
    for name in filter(None, files):
        src = REPO / name
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    (dest / "wheels").mkdir(exist_ok=True)
    target = dest / "wheels" / wheel.name
    try:
        os.link(wheel, target)
    except OSError:
        shutil.copyfile(wheel, target)
    return dest


def pip_build_args() -> list[str]:
    """This host's pip index settings, when they are addresses a build container can reach too."""
    args = []
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        value = os.environ.get(name, "")
        urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
        if urls:
            args += ["--build-arg", f"{name}={' '.join(urls)}"]
    return args
