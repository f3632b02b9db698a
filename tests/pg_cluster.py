"""A throwaway PostgreSQL server for tests: Debian's binaries, a cluster in a temporary directory, a free port.

`pg_cluster()` runs `initdb` into a fresh temporary directory, starts `postgres` on a free port of 127.0.0.1 (its
unix socket in the same directory, so nothing outside it is touched), and yields a `PgServer`; afterwards the server
is stopped and the directory removed. PostgreSQL refuses to run as root: as root, both programs run as `nobody`
(through `setpriv`, which execs the program itself, so the process started is the server and stopping it needs no
signal forwarding), with the directory handed to that user. Durability is off (fsync, full-page writes): the data
lives only as long as the test session. `PgServer.fresh_database()` makes an empty database per test (a copy of the
empty template, fast) and returns its URL.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: where Debian's postgresql package puts each major version's programs
DEBIAN_BINARIES = Path("/usr/lib/postgresql")
#: the account the server runs as when the tests run as root
UNPRIVILEGED = "nobody"
SUPERUSER = "postgres"
START_TIMEOUT = 60
#: free ports tried before giving up (a port found free can be taken by another process before the server binds it)
PORT_ATTEMPTS = 3


class PortTaken(RuntimeError):
    """The server could not bind its port."""


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server programs on this machine (Debian's `postgresql` package provides them)."""


def binaries() -> Path:
    """The newest installed major version's bin directory (one with initdb and postgres)."""
    found = sorted(
        (p for p in DEBIAN_BINARIES.glob("*/bin") if (p / "initdb").exists() and (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        which = shutil.which("initdb")
        if which:
            return Path(which).parent
        raise PostgresUnavailable(
            f"no PostgreSQL server under {DEBIAN_BINARIES}/*/bin: install Debian's postgresql package"
        )
    return found[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    socket_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY file_copy")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _as_user(argv: list[str], account: pwd.struct_passwd | None) -> list[str]:
    if account is None:
        return argv
    return [
        "setpriv",
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--clear-groups",
        "--",
        *argv,
    ]


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgServer]:
    """Start a throwaway server; stop it and remove its directory afterwards."""
    bindir = binaries()
    account = pwd.getpwnam(UNPRIVILEGED) if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="talkative-pg-"))
    data = root / "data"
    server: subprocess.Popen[bytes] | None = None
    try:
        if account is not None:
            os.chown(root, account.pw_uid, account.pw_gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(root)}
        made = subprocess.run(
            _as_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                account,
            ),
            env=env,
            capture_output=True,
            cwd=root,
        )
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')}")
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            server = _start(bindir, data, root, port, account, env)
            pg = PgServer("127.0.0.1", port, SUPERUSER, root)
            try:
                _wait_ready(pg, server, root / "server.log")
                break
            except PortTaken:  # another process bound the port between our probe and the server's bind
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        yield pg
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(root, ignore_errors=True)


def _start(
    bindir: Path, data: Path, root: Path, port: int, account: pwd.struct_passwd | None, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    with open(root / "server.log", "ab") as log:  # the server keeps its own descriptor
        return subprocess.Popen(
            _as_user(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(root),
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "max_connections=200",
                ],
                account,
            ),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )


def _wait_ready(pg: PgServer, server: subprocess.Popen[bytes], log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.poll() is not None:
            text = log.read_text(errors="replace")
            if "could not bind" in text or "already in use" in text:
                log.write_text("")
                raise PortTaken(text)
            raise RuntimeError(f"postgres exited with {server.returncode}: {text}")
        try:
            with psycopg.connect(pg.url(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(server: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: clients disconnected, no waiting for them), then kill if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
