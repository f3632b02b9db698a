"""The web UI's History lists batches (status, progress) and downloads their results as JSONL, in a real browser
(Debian's chromium) against a tiny-model server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from e2e_helpers import FAST, Server
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def test_history_lists_batches_and_downloads_their_results(
    tiny_server: Server, page: Page, tmp_path: Path
) -> None:
    items = [{"id": f"b{i}", "text": f"Short text number {i}."} for i in range(3)]
    r = httpx.post(f"{tiny_server.url}/api/v1/batches", json={"items": items, "options": FAST}, timeout=60)
    assert r.status_code == 202, r.text
    batch_id = r.json()["batch_id"]
    page.goto(tiny_server.url)
    page.click("#tab-history")
    entry = page.locator(f"#batches-list [data-batch-id='{batch_id}']")
    expect(entry).to_be_visible(timeout=30_000)
    expect(entry.locator(".badge")).to_have_text("done", timeout=60_000)  # refreshes itself while it runs
    expect(entry).to_contain_text("3 of 3 items")
    with page.expect_download() as info:
        entry.get_by_role("button", name="Download JSONL").click()
    saved = tmp_path / "results.jsonl"
    info.value.save_as(saved)
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["b0", "b1", "b2"] and all(row["tokens"] for row in rows)
