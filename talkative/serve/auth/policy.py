"""Who may call the server, decided in one place: API keys, local-only mode, origins, hosts, owners.

A shared server on scarce accelerators must know who is calling (to bill rate limits and caps to someone and to
keep one user's jobs from another), and must refuse the calls it cannot attribute. The rules:

* **Keys.** `API_KEY` is one key (its name is `admin`); `API_KEYS` is `name:key,name:key` for several users (the
  key named `admin` is the admin). A request presents its key as `Authorization: Bearer <key>`; a WebSocket may
  use the `api_key` query parameter instead, since browsers cannot set headers on WebSockets. Keys are compared
  through their SHA-256 digests with `hmac.compare_digest`, against every configured key without stopping early,
  so neither a key's content nor its length nor which key matched shows in the timing. Keys never appear in a
  log line, an exception or a response (`scrub` cleans log lines of anything shaped like one).
* **No key configured** means a local development server: only loopback clients are served (others get 403, or
  a WebSocket close 1008) unless `ALLOW_UNAUTHENTICATED=true` says that everyone may use it without a key. The
  local user is the admin and is not metered (rate limits and per-client caps protect users from each other; a
  local server has one user).
* **Owners.** A job belongs to the identity that submitted it (`key:<name>`, or `ip:<address>` without keys);
  another identity gets 404 for it, as if it did not exist, so request ids cannot be probed.
* **Origins and hosts.** A browser page may call the API only from an allowed origin (`ALLOWED_ORIGINS`, plus
  localhost on common ports, plus the server's own origin); a request without `Origin` is not from a browser page
  and is not checked. The `Host` header is checked against `ALLOWED_HOSTS` when `ENABLE_TRUSTED_HOST` is on (by
  default when serving without a key, which stops DNS-rebinding pages from reading a local server).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ..jobs.record import Job
    from ..settings import Settings

ADMIN = "admin"
#: the scope key under which the gate (`middleware.py`) leaves the caller's identity for the routes
IDENTITY_SCOPE_KEY = "talkative.identity"
KEY_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
#: keys shorter than this are accepted but warned about (and too short to scrub from logs by their text)
SHORT_KEY = 16
MIN_SCRUB_LENGTH = 8
_QUERY_KEY = re.compile(r"(?i)(api_key=)[^&\s\"']+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


class SecurityConfigError(ValueError):
    """Bad API_KEY / API_KEYS configuration; the message names the problem, never a key."""


@dataclass(frozen=True)
class ClientIdentity:
    """The caller of one request or WebSocket connection.

    `key` is the stable owner name jobs record (`key:<name>` or `ip:<address>`); `metered` says whether rate
    limits and the per-client cap apply; `is_admin` allows admin operations (e.g. `POST /reset`).
    """

    key: str
    address: str | None
    authenticated: bool
    name: str | None = None
    is_admin: bool = False
    metered: bool = True


@dataclass(frozen=True)
class KeyRing:
    """The configured keys by name, kept as digests for comparison (raw values only for scrubbing logs)."""

    digests: tuple[tuple[str, bytes], ...] = ()
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        pairs: list[tuple[str, str]] = []
        if settings.api_keys:
            for i, item in enumerate(part.strip() for part in settings.api_keys.split(",")):
                if not item:
                    continue
                name, sep, key = item.partition(":")
                name, key = name.strip(), key.strip()
                if not sep or not key:
                    raise SecurityConfigError(f"API_KEYS entry {i + 1} is not name:key")
                if not KEY_NAME.match(name):
                    raise SecurityConfigError(
                        f"API_KEYS entry {i + 1}: a key name is 1-64 letters, digits or _.@- (got {name!r})"
                    )
                pairs.append((name, key))
        if settings.api_key:
            pairs.append((ADMIN, settings.api_key.strip()))
        names = [n for n, _ in pairs]
        for n in set(names):
            if names.count(n) > 1:
                raise SecurityConfigError(
                    f"the key name {n!r} is given twice"
                    + (" (API_KEY is the key named admin)" if n == ADMIN and settings.api_key else "")
                )
        values = [k for _, k in pairs]
        if len(set(values)) != len(values):
            raise SecurityConfigError("two API key names share one key: every key must be different")
        return cls(
            digests=tuple((n, _digest(k)) for n, k in pairs),
            secrets=tuple(k for _, k in pairs),
        )

    def __bool__(self) -> bool:
        return bool(self.digests)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.digests]

    def short_keys(self) -> list[str]:
        return [n for (n, _), k in zip(self.digests, self.secrets, strict=True) if len(k) < SHORT_KEY]

    def match(self, token: str | None) -> str | None:
        """The name of the key `token` is, or None; the same work whichever key (if any) matches."""
        if token is None:
            return None
        probe = _digest(token)
        found: str | None = None
        for name, digest in self.digests:
            if hmac.compare_digest(probe, digest):
                found = name
        return found


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def scope_header(scope: Mapping[str, Any], name: str) -> str | None:
    """One header of an ASGI scope (the first, decoded as latin-1, as HTTP says)."""
    raw = name.lower().encode()
    for key, value in scope.get("headers", ()):
        if key.lower() == raw:
            return bytes(value).decode("latin-1")
    return None


#: headers a reverse proxy adds to name the client; a request carrying one came through a proxy
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def _ip(value: str | None) -> str | None:
    """A bare IP address out of a header value (`"[2001:db8::1]:4711"`, `192.0.2.7:80`, `192.0.2.7`), else None."""
    if not value:
        return None
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _forwarded_for(header: str | None) -> str | None:
    """The client the nearest proxy names in RFC 7239 `Forwarded` (the `for=` of its last element)."""
    if not header:
        return None
    last = header.split(",")[-1]
    for pair in last.split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "for":
            return _ip(value)
    return None


def client_address(scope: Mapping[str, Any], trusted_header: str) -> tuple[str | None, bool]:
    """The client's address and whether the request came through a proxy (it carries a proxy header).

    `X-Forwarded-For` is uvicorn's to resolve (from `FORWARDED_ALLOW_IPS`); it has already rewritten the scope's
    client. `X-Real-IP` or `Forwarded` (TRUSTED_PROXY_HEADER) is believed only from a loopback peer, the proxy on
    this machine; from anyone else it could be forged. A proxied request is never a local client, whatever
    address it resolves to: a keyless server behind a proxy must not take every client for its own user.
    """
    client = scope.get("client")
    peer = str(client[0]) if client else None
    proxied = any(scope_header(scope, name) is not None for name in PROXY_HEADERS)
    if proxied and trusted_header in ("x-real-ip", "forwarded") and is_loopback(peer):
        value = scope_header(scope, trusted_header)
        named = _forwarded_for(value) if trusted_header == "forwarded" else _ip(value)
        if named is not None:
            return named, True
    return peer, proxied


def is_loopback(address: str | None) -> bool:
    """Loopback addresses (IPv4, IPv6, IPv4-mapped IPv6); None = a Unix socket, which is local too."""
    if address is None:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _host_name(host: str) -> str:
    """`example.org:8000` -> `example.org`; `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def host_allowed(host_header: str | None, patterns: list[str]) -> bool:
    """Exact names, `*.example.org` (subdomains, not the bare domain) and `*` (anything)."""
    if host_header is None:
        return False
    host = _host_name(host_header)
    for pattern in patterns:
        p = _host_name(pattern) if not pattern.startswith("*") else pattern.strip().lower()
        if p == "*" or p == host or (p.startswith("*.") and host.endswith(p[1:])):
            return True
    return False


def origin_allowed(origin: str | None, allowed: list[str], host_header: str | None) -> bool:
    """No Origin (not a browser page), `*`, a listed origin, or the server's own origin (same host:port)."""
    if origin is None:
        return True
    origin = origin.strip()
    if "*" in allowed or origin in allowed:
        return True
    if origin.lower() == "null" or not host_header:
        return False
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == host_header.strip().lower()


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`api_key=...` query values, `Bearer ...` tokens and the configured keys themselves become `***`."""
    text = _QUERY_KEY.sub(r"\1***", text)
    text = _BEARER.sub(r"\1***", text)
    for secret in secrets:
        if len(secret) >= MIN_SCRUB_LENGTH and secret in text:
            text = text.replace(secret, "***")
    return text


class AccessPolicy:
    """The decisions of one server: who a caller is, what is metered, which hosts and origins are allowed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyRing.from_settings(settings)
        self.local_only = not self.keys and not settings.allow_unauthenticated
        trusted = settings.enable_trusted_host
        self.check_hosts = trusted if trusted is not None else self.local_only
        self.allowed_hosts = list(settings.allowed_hosts)
        self.origins = settings.cors_origins()

    # -- identity -------------------------------------------------------------------------------------------------
    def identify(
        self, address: str | None, token: str | None, proxied: bool = False
    ) -> ClientIdentity | None:
        """None when keys are configured and `token` is none of them. Without keys, the local user (a loopback
        client, not through a proxy) is the admin; proxied clients the proxy does not name share one identity."""
        if self.keys:
            name = self.keys.match(token)
            if name is None:
                return None
            return ClientIdentity(
                key=f"key:{name}", address=address, authenticated=True, name=name, is_admin=name == ADMIN
            )
        local = self.is_local(address, proxied)
        key = f"proxy:{address}" if proxied and is_loopback(address) else f"ip:{address}"
        return ClientIdentity(
            key=key, address=address, authenticated=False, is_admin=local, metered=not local
        )

    @staticmethod
    def is_local(address: str | None, proxied: bool = False) -> bool:
        return is_loopback(address) and not proxied

    def refuses_address(self, address: str | None, proxied: bool = False) -> bool:
        return self.local_only and not self.is_local(address, proxied)

    def metered_owner(self, owner: str | None) -> bool:
        """Whether a job owner (as recorded on jobs) is subject to the per-client cap."""
        if owner is None:
            return False
        if self.keys:
            return True
        return not (owner.startswith("ip:") and is_loopback(owner[3:] if owner[3:] != "None" else None))

    def client_cap(self, owner: str | None) -> int | None:
        cap = self.settings.max_jobs_per_client
        return cap if cap > 0 and self.metered_owner(owner) else None

    # -- description ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """The startup line that says which mode the server is in (names only, never keys)."""
        if self.keys:
            admin = ADMIN if ADMIN in self.keys.names else "none"
            return (
                f"API keys required ({len(self.keys.names)}: {', '.join(self.keys.names)}; admin: {admin}); "
                f"rate limit {self.settings.rate_limit_per_minute or 'off'}/min per key"
            )
        if self.local_only:
            return (
                "no API key configured: serving loopback clients only (others get 403); set API_KEY or API_KEYS, "
                "or ALLOW_UNAUTHENTICATED=true to serve every client without a key"
            )
        return (
            "no API key configured and ALLOW_UNAUTHENTICATED=true: every client is served without a key; "
            f"rate limit {self.settings.rate_limit_per_minute or 'off'}/min per client address"
        )


def startup_refusal(settings: Settings, keys: KeyRing) -> str | None:
    """Why the server must not start, or None: without a key and without ALLOW_UNAUTHENTICATED it serves only
    its own machine, so listening on a network address (HOST=0.0.0.0, a LAN address) can only mean that a proxy
    or a port mapping was meant to reach it, and through those every client would be taken for the local user."""
    if keys or settings.allow_unauthenticated:
        return None
    host = settings.bind_host()
    if host == "localhost" or is_loopback(host):
        return None
    return (
        f"HOST={host} is not a loopback address and no API key is configured: set API_KEY or API_KEYS (see "
        "docs/security.md), bind to 127.0.0.1, or set ALLOW_UNAUTHENTICATED=true to serve every client without "
        "a key"
    )


def owns(identity: ClientIdentity, job: Job) -> bool:
    """A job is its submitter's; a job with no recorded owner (submitted in-process) is the admin's."""
    if job.owner is None:
        return identity.is_admin
    return job.owner == identity.key
