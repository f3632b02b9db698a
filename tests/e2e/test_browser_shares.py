"""Row flags and shares in a real browser, on the tiny models: flagged tokens are marked in the strip and listed in
the table, the filter hides and shows them per flag; a share link opens the shared result with its anchor
highlighted (and selected) and its comment shown; "Share this token" makes such a link."""

from __future__ import annotations

import re

import pytest
from browser_helpers import analyse, open_ui
from e2e_helpers import Server
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

TEXT = "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp for ships."


def test_flagged_tokens_are_marked_and_filtered_per_flag(page: Page, tiny_server: Server) -> None:
    open_ui(page, tiny_server.url)
    jid = analyse(page, TEXT, k=1)
    rows = tiny_server.status(jid)["result"]["tokens"]
    flagged = [i for i, r in enumerate(rows) if r["flags"]]
    early = [i for i, r in enumerate(rows) if "early_position" in r["flags"]]
    assert early and len(rows) > len(early)
    strip = page.locator(".result-card .strip .tok")
    expect(strip).to_have_count(len(rows))
    expect(page.locator(".result-card .strip .tok.flagged")).to_have_count(len(flagged))
    for i in flagged[:3]:
        expect(strip.nth(i)).to_have_attribute("data-flags", " ".join(rows[i]["flags"]))
        assert "Flagged:" in (strip.nth(i).get_attribute("aria-label") or "")
    table_rows = page.locator("table.results tbody tr")
    expect(table_rows).to_have_count(len(rows))
    expect(table_rows.nth(early[0]).locator(".flags-cell .flag").first).to_have_text(
        rows[early[0]]["flags"][0]
    )

    box = page.locator("#flag-filter input[data-flag='early_position']")
    expect(box).to_be_checked()
    box.uncheck()
    expect(page.locator(".result-card .strip .tok[hidden]")).to_have_count(len(early))
    expect(table_rows).to_have_count(len(rows) - len(early))
    assert strip.nth(early[0]).is_hidden() and strip.nth(len(rows) - 1).is_visible() == (
        "early_position" not in rows[-1]["flags"]
    )
    box.check()
    expect(page.locator(".result-card .strip .tok[hidden]")).to_have_count(0)
    expect(table_rows).to_have_count(len(rows))


def test_a_share_link_opens_the_result_with_its_anchor_and_comment(page: Page, tiny_server: Server) -> None:
    jid = tiny_server.analyze(TEXT)
    rows = tiny_server.wait(jid)["result"]["tokens"]
    shown = "".join(r["token"] for r in rows)
    start = shown.index("spiral")
    r = tiny_server.post(
        "/api/v1/shares",
        {
            "request_id": jid,
            "anchor": {"chars": [start, start + len("spiral stairs")]},
            "comment": "the stairs ✓",
        },
    )
    assert r.status_code == 201, r.text
    share = tiny_server.get(f"/api/v1/shares/{r.json()['share_id']}").json()

    page.goto(tiny_server.url + share["url"])
    expect(page.locator("#share-note")).to_contain_text("the stairs ✓")
    anchored = page.locator(".result-card .strip .tok.anchored")
    expect(anchored).to_have_count(len(share["positions"]))
    first = next(i for i, row in enumerate(rows) if row["position"] == share["positions"][0])
    expect(page.locator(f"#tok-{first}")).to_have_attribute("aria-selected", "true")
    expect(page.locator(".result-card .facts")).to_contain_text("shared with you")
    assert "share=" in page.url

    # "Share this token" shares the selected token of one's own result, with the comment the prompt asks for
    open_ui(page, tiny_server.url)
    analyse(page, TEXT, k=1)
    page.locator("#tok-3").click()
    page.once("dialog", lambda d: d.accept("token three"))
    page.click("#share-token")
    toast = page.locator("#toasts", has_text="Share link")
    expect(toast).to_be_visible()
    link = re.search(r"/s/([A-Za-z0-9_-]+)", toast.inner_text())
    assert link, toast.inner_text()
    made = tiny_server.get(f"/api/v1/shares/{link.group(1)}").json()
    assert made["comment"] == "token three" and made["anchor"] == {"position": rows[3]["position"]}
