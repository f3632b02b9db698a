"""The detail panel's steer controls in a real browser, on the tiny models: a direction in words and an alpha
slider re-explain the selected token through `describe` with `steer`, debounced, showing the steered explanation,
its metrics and the steered norm; a new token keeps the direction; an empty direction asks for one and a
server refusal is shown."""

from __future__ import annotations

import json

import pytest
from browser_helpers import analyse, open_ui
from e2e_helpers import Server
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]


def set_alpha(page: Page, value: float) -> None:
    """Move the slider as a user does: the value changes and an `input` event fires."""
    page.eval_on_selector(
        "#steer-alpha",
        "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', { bubbles: true })); }",
        value,
    )


def test_direction_and_alpha_slider_re_explain_the_selected_token(page: Page, tiny_server: Server) -> None:
    open_ui(page, tiny_server.url)
    jid = analyse(page, "The cat sat on the mat.", k=2)
    rows = tiny_server.status(jid)["result"]["tokens"]
    describes: list[dict] = []
    page.on(
        "request",
        lambda r: (
            describes.append(json.loads(r.post_data or "{}")) if r.url.endswith("/api/v1/describe") else None
        ),
    )

    page.click("#tok-2")
    expect(page.locator("#steer-direction")).to_be_visible()
    page.fill("#steer-direction", "the ocean")
    # several slider moves within the debounce window make one request, with the last alpha
    for value in (1.0, 2.0, 3.0):
        set_alpha(page, value)
    expect(page.locator("#steer-alpha-value")).to_have_text("3.0")
    result = page.locator("#steer-result")
    expect(result.locator(".steer-explanation")).to_be_visible(timeout=60_000)
    expect(result).to_contain_text("Steered by alpha 3.0 towards “the ocean”")
    assert len(describes) == 1
    sent = describes[0]
    assert sent["options"]["steer"] == {"direction": {"text": "the ocean"}, "alpha": 3.0}
    assert (
        sent["tokens"] == [rows[2]["token_id"]]
        and sent["options"]["optimize_explanations_config"]["best_of_k"] == 2
    )

    # the server's answer to the same request is what the panel shows
    answer = tiny_server.post("/api/v1/describe", sent).json()["results"][0]
    expect(result.locator(".steer-explanation")).to_have_text(answer["explanation"])
    expect(result.locator(".steer-metrics")).to_contain_text("Norm")
    ext = tiny_server.post("/api/v1/extract", {"text": "The cat sat on the mat.", "positions": [2]}).json()
    assert answer["norm"] > ext["tokens"][0]["norm"] * 2  # pushed by 3 × its own norm

    # alpha 0 explains the unsteered activation: the norm is the token's own
    set_alpha(page, 0)
    expect(result).to_contain_text("Steered by alpha 0.0", timeout=60_000)
    assert describes[-1]["options"]["steer"]["alpha"] == 0

    # another token keeps the direction and is re-explained
    before = len(describes)
    page.click("#tok-3")
    expect(result.locator(".steer-explanation")).to_be_visible(timeout=60_000)
    assert len(describes) == before + 1 and describes[-1]["tokens"] == [rows[3]["token_id"]]

    # without a direction nothing is asked; a refusal from the server is shown where the explanation would be
    page.fill("#steer-direction", "   ")
    expect(result).to_contain_text("Write a direction")
    page.route(
        "**/api/v1/describe",
        lambda route: route.fulfill(
            status=400,
            content_type="application/json",
            body=json.dumps({"detail": "the direction is refused"}),
        ),
    )
    page.fill("#steer-direction", "the sea")
    expect(result.locator("[role=alert]")).to_have_text("the direction is refused", timeout=30_000)
