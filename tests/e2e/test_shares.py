"""Shares over HTTP: each anchor kind resolved to the positions it covers, bad anchors and comments refused with
400, only the job's owner (or the admin) shares it, reading needs a key unless PUBLIC_SHARES, the maker deletes
a share, and deleting the job makes its shares answer 404."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from e2e_helpers import FAST, Server
from security_support import API_KEYS, auth, wait_job

pytestmark = pytest.mark.e2e

TEXT = "The lighthouse keeper climbed the stairs at dusk and lit the lamp"


def _analysed(server: Server, who: str) -> dict[str, Any]:
    r = server.post("/analyze", {"text": TEXT, "options": FAST}, headers=auth(who))
    assert r.status_code == 200, r.text
    job = wait_job(server, r.json()["request_id"], headers=auth(who))
    assert job["status"] == "completed", job
    return job


def _share(server: Server, who: str | None, body: dict[str, Any]) -> httpx.Response:
    return server.post("/api/v1/shares", body, headers=auth(who) if who else {})


def _delete(server: Server, path: str, who: str | None) -> httpx.Response:
    return httpx.delete(server.url + path, headers=auth(who) if who else {}, timeout=30)


def test_anchors_owners_keys_and_deletion(make_server: Callable[..., Server]) -> None:
    server = make_server(API_KEYS=API_KEYS)
    job = _analysed(server, "alice")
    rid, rows = job["request_id"], job["result"]["tokens"]
    n_tokens = job["result"]["metadata"]["n_tokens"]
    shown = "".join(r["token"] for r in rows)

    made = _share(server, "alice", {"request_id": rid, "anchor": {"position": 3}, "comment": "look here"})
    assert made.status_code == 201, made.text
    share_id = made.json()["share_id"]
    assert made.json() == {"share_id": share_id, "url": f"/s/{share_id}"}

    read = server.get(f"/api/v1/shares/{share_id}", headers=auth("bob"))  # any key reads it
    assert read.status_code == 200, read.text
    body = read.json()
    assert body["anchor"] == {"position": 3} and body["positions"] == [3] and body["comment"] == "look here"
    assert body["request_id"] == rid and body["result"]["tokens"] == rows and body["url"] == f"/s/{share_id}"

    start = shown.index("lighthouse")
    covering = [r["position"] for r in rows if "light" in r["token"] or "house" in r["token"]]
    for anchor, want in (
        ({"tokens": [2, 5]}, [2, 3, 4]),
        ({"tokens": [n_tokens - 1, n_tokens]}, [n_tokens - 1]),
        ({"chars": [start, start + len("lighthouse")]}, covering),
        ({"chars": [0, 1]}, [0]),
    ):
        r = _share(server, "alice", {"request_id": rid, "anchor": anchor})
        assert r.status_code == 201, (anchor, r.text)
        got = server.get(f"/api/v1/shares/{r.json()['share_id']}", headers=auth("alice")).json()
        assert got["positions"] == want and got["comment"] is None, anchor

    for anchor in (
        {"position": n_tokens},  # no row there
        {"tokens": [3, 3]},  # empty
        {"tokens": [5, 2]},
        {"tokens": [0, n_tokens + 1]},  # beyond the input
        {"chars": [0, len(shown) + 1]},
        {"position": 1, "tokens": [0, 2]},  # two anchors
        {},
        {"position": -1},
        {"line": 3},
    ):
        r = _share(server, "alice", {"request_id": rid, "anchor": anchor})
        assert r.status_code == 400, (anchor, r.text)
        assert r.json()["detail"]
    assert (
        _share(
            server, "alice", {"request_id": rid, "anchor": {"position": 3}, "comment": "x" * 513}
        ).status_code
        == 400
    )
    assert (
        _share(
            server, "alice", {"request_id": rid, "anchor": {"position": 3}, "comment": "x" * 512}
        ).status_code
        == 201
    )

    # only the owner of the job, or the admin, may share it; another caller learns nothing of it
    assert _share(server, "bob", {"request_id": rid, "anchor": {"position": 3}}).status_code == 404
    assert (
        _share(server, "alice", {"request_id": "no-such-job", "anchor": {"position": 3}}).status_code == 404
    )
    assert _share(server, "admin", {"request_id": rid, "anchor": {"position": 3}}).status_code == 201

    # without PUBLIC_SHARES a key is needed to read; the page itself is the UI's shell, served to anyone
    assert server.get(f"/api/v1/shares/{share_id}").status_code == 401
    page = server.get(f"/s/{share_id}", headers={"Accept": "text/html"}, follow_redirects=True)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert str(page.url).endswith(f"/?share={share_id}")

    # the maker deletes it (another caller gets 404, as for an unknown id)
    assert _delete(server, f"/api/v1/shares/{share_id}", "bob").status_code == 404
    assert _delete(server, f"/api/v1/shares/{share_id}", None).status_code == 401
    assert _delete(server, f"/api/v1/shares/{share_id}", "alice").status_code == 200
    assert server.get(f"/api/v1/shares/{share_id}", headers=auth("alice")).status_code == 404

    # deleting the job takes its shares with it
    other = _share(server, "alice", {"request_id": rid, "anchor": {"tokens": [0, 2]}}).json()["share_id"]
    assert _delete(server, f"/api/v1/jobs/{rid}", "bob").status_code == 404  # not bob's job
    assert _delete(server, f"/api/v1/jobs/{rid}", "alice").status_code == 200
    assert server.get(f"/api/v1/shares/{other}", headers=auth("alice")).status_code == 404


def test_public_shares_open_the_link_without_a_key_and_nothing_else(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(API_KEYS=API_KEYS, PUBLIC_SHARES="true")
    job = _analysed(server, "alice")
    made = _share(
        server, "alice", {"request_id": job["request_id"], "anchor": {"tokens": [1, 3]}, "comment": "é ✓"}
    )
    share_id = made.json()["share_id"]
    read = server.get(f"/api/v1/shares/{share_id}")
    assert read.status_code == 200 and read.json()["comment"] == "é ✓" and read.json()["positions"] == [1, 2]
    assert server.get("/api/v1/shares/unknown-id").status_code == 404
    assert (
        _share(server, None, {"request_id": job["request_id"], "anchor": {"position": 1}}).status_code == 401
    )
    assert _delete(server, f"/api/v1/shares/{share_id}", None).status_code == 401
    assert server.get(f"/status/{job['request_id']}").status_code == 401  # the job itself stays keyed
