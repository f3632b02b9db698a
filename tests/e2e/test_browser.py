"""The web UI in a real browser (Debian's chromium through Playwright) against `talkative serve` on the bundled
SmolLM2: analyse and read a result (token strip, tooltip, keyboard, table, legend), queue and cancel, generate,
history across a reload and a server restart, permalinks, export and offline import, errors, phone width, and the
API key prompt (on tiny models, with a key-protected server).

Small inputs and best_of_k 2-4 keep each analysis to seconds on a CPU. `SCREENSHOT_DIR=docs/img` refreshes the
README's screenshots.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import PHONE, analyse, job_id, open_ui, screenshot
from e2e_helpers import REPO, Server
from playwright.sync_api import BrowserContext, Page, expect

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

LONG_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light."
)
BEST = "rgb(188, 215, 245)"  # the colour scale's ends (metrics.js)
WORST = "rgb(247, 185, 154)"


def shown(token: str) -> str:
    """What the UI draws for a token (format.js `shownToken`)."""
    return "∅" if token == "" else token.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")


def lens_tokens(value: str) -> list[str]:
    return [ast.literal_eval(m) for m in re.findall(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", value)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The repository's model_groups.json (the bundled SmolLM2); one job at a time, so a second one queues."""
    workdir = tmp_path_factory.mktemp("browser-server")
    srv = Server(
        workdir,
        {
            "DATA_DIR": str(workdir / "data"),
            "MODEL_GROUPS_FILE": str(REPO / "model_groups.json"),
            "QUEUE_UPDATE_INTERVAL": "0.5",
            "MAX_ACTIVE_JOBS": "1",
            "HF_HUB_OFFLINE": "1",
        },
        name="browser-server",
    )
    srv.start(timeout=300)
    yield srv
    srv.stop()


# -- serving ---------------------------------------------------------------------------------------------------------
def test_root_serves_the_seed_json_to_api_clients_and_the_ui_to_browsers(server: Server) -> None:
    assert server.get("/", headers={"Accept": "application/json"}).json() == {
        "name": "Consistency Lens API",
        "version": "1.0.0",
        "status": "running",
    }
    assert server.get("/").json()["name"] == "Consistency Lens API"  # no Accept header: JSON too
    html = server.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert html.headers["content-type"].startswith("text/html") and "<title>Talkative" in html.text
    js = server.get("/js/main.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert server.get("/css/app.css").status_code == 200
    assert server.get("/js/no-such-module.js").status_code == 404


# -- analyse and read ------------------------------------------------------------------------------------------------
def test_analyse_a_sentence_then_read_strip_tooltip_keyboard_table_and_legend(
    page: Page, server: Server, tmp_path: Path
) -> None:
    open_ui(page, server.url)
    groups = page.eval_on_selector_all(
        "#analyse-model optgroup", "gs => gs.map(g => [g.label, [...g.children].map(o => o.textContent)])"
    )
    assert groups == [
        [
            "SmolLM2 135M Instruct",
            [
                "SmolLM2 135M L12 · layer 12",
                "SmolLM2 135M L12 (first demo) · layer 12",
                "SmolLM2 135M L10 (untrained) · layer 10",
            ],
        ]
    ]
    expect(page.locator("#analyse-model-info")).to_contain_text("loaded on")
    expect(page.locator("#analyse-model-info")).to_contain_text("The default NLA")

    jid = analyse(page, "The cat sat on the mat.", k=2, lens=True)
    rows: list[dict[str, Any]] = server.status(jid)["result"]["tokens"]
    n = len(rows)
    strip = page.locator(".result-card .strip .tok")
    assert strip.all_text_contents() == [shown(r["token"]) for r in rows]
    expect(page.locator(".result-card .facts")).to_contain_text("best of 2")

    # outliers are flagged and left out of the colour scale; the scale's ends are the best and worst tokens
    colours = page.eval_on_selector_all(".strip .tok", "els => els.map(e => e.style.backgroundColor)")
    flagged = page.eval_on_selector_all(".strip .tok.outlier", "els => els.map(e => Number(e.dataset.i))")
    assert flagged == [i for i, r in enumerate(rows) if r["outlier"]]
    scaled = [i for i, r in enumerate(rows) if not r["outlier"]]
    assert all((colours[i] == "") == rows[i]["outlier"] for i in range(n))
    assert colours[min(scaled, key=lambda i: rows[i]["relative_rmse"])] == BEST
    assert colours[max(scaled, key=lambda i: rows[i]["relative_rmse"])] == WORST

    # hovering a token: its explanation word by word (coloured by salience), its metrics, its logit lens
    i = scaled[0]
    page.hover(f"#tok-{i}")
    tip = page.locator("#token-tip")
    expect(tip).to_be_visible()
    assert tip.locator(".piece").all_text_contents() == [shown(p) for p in rows[i]["explanation_structured"]]
    piece_colours = tip.locator(".piece").evaluate_all("els => els.map(e => e.style.backgroundColor)")
    assert sum(bool(c) for c in piece_colours) >= len(piece_colours) - 1  # only a zero salience stays white
    expect(tip).to_contain_text(f"{rows[i]['relative_rmse']:.3f}")
    expect(tip).to_contain_text(f"{rows[i]['kl_divergence']:.3f} nats")
    assert tip.locator(".lens-token").first.text_content() == shown(lens_tokens(rows[i]["logit_lens_top"])[0])
    screenshot(page, tmp_path, "analysis.png")

    # keyboard: focus moves along the strip with the arrow keys; the selection, detail and tooltip follow
    page.focus("#tok-0")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tok-1")).to_be_focused()
    expect(page.locator("#tok-1")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#detail-title")).to_contain_text(f"Token 2 of {n}")
    expect(tip.locator(".tip-pos")).to_have_text(f"position {rows[1]['position']}")
    assert tip.locator(".piece").all_text_contents() == [shown(p) for p in rows[1]["explanation_structured"]]
    page.keyboard.press("End")
    expect(page.locator(f"#tok-{n - 1}")).to_be_focused()
    expect(page.locator("#detail-title")).to_contain_text(f"Token {n} of {n}")
    page.keyboard.press("Escape")
    expect(tip).to_be_hidden()
    assert "Explanation" in (page.locator(f"#tok-{n - 1}").get_attribute("aria-label") or "")

    # the table: every token, sortable, columns toggle, a row click selects
    table = page.locator("table.results")
    expect(table.locator("tbody tr")).to_have_count(n)
    headers = table.locator("thead th").all_text_contents()
    assert {"#", "Token", "Explanation", "Rel. RMSE", "KL", "Logit lens"} <= {h.strip(" ▲▼") for h in headers}

    def positions() -> list[int]:
        return [int(x) for x in table.locator("tbody tr td:first-child").all_text_contents()]

    table.locator("thead button", has_text="Rel. RMSE").click()
    by_rmse = [r["position"] for r in sorted(rows, key=lambda r: r["relative_rmse"])]
    assert positions() == by_rmse
    expect(table.locator("thead th", has_text="Rel. RMSE")).to_have_attribute("aria-sort", "ascending")
    table.locator("thead button", has_text="Rel. RMSE").click()
    assert positions() == by_rmse[::-1]
    page.click(".column-menu summary")
    page.uncheck(".column-menu [data-column='cosine']")
    assert "Cosine" not in table.locator("thead th").all_text_contents()
    page.click(".column-menu summary")
    table.locator(
        "tbody tr", has=page.locator("td:first-child", has_text=str(rows[2]["position"]))
    ).first.click()
    expect(page.locator("#detail-title")).to_contain_text(f"Token 3 of {n}")

    # colour by another metric: the strip and the legend follow
    page.select_option("#metric-select", "kl_divergence")
    expect(page.locator(".legend")).to_contain_text("KL: lower is better")
    colours = page.eval_on_selector_all(".strip .tok", "els => els.map(e => e.style.backgroundColor)")
    assert colours[min(scaled, key=lambda i: rows[i]["kl_divergence"])] == BEST
    page.select_option("#metric-select", "relative_rmse")
    screenshot(page.locator(".table-card"), tmp_path, "table.png")


# -- queue and cancel ------------------------------------------------------------------------------------------------
def test_queue_position_then_cancel_the_running_analysis(page: Page, server: Server) -> None:
    open_ui(page, server.url)
    page.fill("#analyse-text", LONG_TEXT)
    page.fill("#opt-k", "4")
    page.press("#analyse-text", "Control+Enter")
    page.wait_for_selector("#progress-text:has-text('Explaining')", timeout=120_000)
    text = page.inner_text("#progress-text")
    total = int(re.search(r"of (\d+) positions", text).group(1))  # type: ignore[union-attr]
    assert total > 40 and page.eval_on_selector("#progress progress", "e => e.max") == total
    long_id = job_id(page)

    # a second analysis waits behind it (the server runs one job at a time here) and says where it stands
    page.fill("#analyse-text", "Short.")
    page.fill("#opt-k", "2")
    page.press("#analyse-text", "Control+Enter")
    expect(page.locator("#progress-text")).to_contain_text("Waiting in the queue: position 1", timeout=30_000)
    short_id = job_id(page)
    assert short_id and short_id != long_id
    chips = page.locator("#runs-bar .chip")
    expect(chips).to_have_count(2)

    # back to the long one, and cancel it while it runs
    chips.nth(0).locator(".chip-main").click()
    expect(page.locator("#progress-text")).to_contain_text("Explaining")
    assert job_id(page) == long_id
    page.click("#cancel-run")
    expect(page.locator("#progress")).to_contain_text("Cancelled", timeout=30_000)
    assert server.status(str(long_id))["status"] == "cancelled"
    expect(page.locator(".result-card")).to_have_count(0)

    # the queued one then runs to the end
    chips.nth(1).locator(".chip-main").click()
    page.wait_for_selector(".result-card .strip .tok", timeout=120_000)
    assert job_id(page) == short_id
    assert server.status(str(short_id))["status"] == "completed"


# -- generate --------------------------------------------------------------------------------------------------------
def test_generate_streams_completions_then_analyse_one(page: Page, server: Server, tmp_path: Path) -> None:
    open_ui(page, server.url)
    page.click("#tab-generate")
    page.fill("#generate-text", "Once upon a time")
    page.fill("#gen-tokens", "8")
    page.fill("#gen-completions", "2")
    page.locator("#gen-completions").blur()
    screenshot(page, tmp_path, "generate-form.png")
    page.click("#generate-run")
    expect(page.locator("#generate-status")).to_contain_text("Done", timeout=120_000)
    completions = page.locator("#generate-completions .completion .generated")
    expect(completions).to_have_count(2)
    texts = completions.all_text_contents()
    assert all(texts), texts
    screenshot(page, tmp_path, "generate.png")
    page.locator("#generate-completions .analyse-this").first.click()
    expect(page.locator("#tab-analyse")).to_have_attribute("aria-selected", "true")
    assert page.input_value("#analyse-text") == "Once upon a time" + texts[0]
    page.wait_for_selector(".result-card .strip .tok", timeout=180_000)
    rows = server.status(str(job_id(page)))["result"]["tokens"]
    assert "".join(r["token"] for r in rows).startswith("Once upon a time") and len(rows) > 4


# -- history, reload, restart, permalinks ----------------------------------------------------------------------------
def test_history_survives_reload_and_restart_and_permalinks_open_results(
    page: Page, browser: BrowserContext, server: Server, tmp_path: Path
) -> None:
    open_ui(page, server.url)
    jid = analyse(page, "Paris is in France.")
    tokens = page.locator(".result-card .strip .tok").all_text_contents()

    # the address bar is the permalink: a reload reopens the result
    page.reload()
    page.wait_for_selector(".result-card .strip .tok", timeout=30_000)
    assert job_id(page) == jid
    assert page.locator(".result-card .strip .tok").all_text_contents() == tokens

    page.click("#tab-history")
    item = page.locator(f".history-item[data-request-id='{jid}']")
    expect(item).to_contain_text("Paris is in France.")
    expect(item).to_contain_text("done")
    screenshot(page, tmp_path, "history.png")

    # the server restarts: the page notices, reconnects on its own, and the history is still there
    server.stop()
    expect(page.locator("#conn")).not_to_have_attribute("data-state", "open", timeout=30_000)
    server.start(timeout=300)
    expect(page.locator("#conn")).to_have_attribute("data-state", "open", timeout=60_000)
    page.click("#history-refresh")
    expect(item).to_contain_text("Paris is in France.")
    page.click("#tab-analyse")
    page.click("#tab-history")
    item.get_by_role("button", name="Open").click()
    expect(page.locator("#tab-analyse")).to_have_attribute("aria-selected", "true")
    page.wait_for_selector(".result-card .strip .tok")
    assert page.locator(".result-card .strip .tok").all_text_contents() == tokens

    # a permalink opened elsewhere shows the stored result; an unknown id says so
    other = browser.new_page()
    other.goto(f"{server.url}/?job={jid}")
    other.wait_for_selector(".result-card .strip .tok", timeout=30_000)
    assert other.locator(".result-card .strip .tok").all_text_contents() == tokens
    expect(other.locator(".result-card .facts")).to_contain_text("stored")
    other.goto(f"{server.url}/?job=no-such-job")
    expect(other.locator(".toast.error")).to_contain_text("no stored analysis no-such-job")
    other.close()


# -- export and offline import ---------------------------------------------------------------------------------------
def test_export_jsonl_and_csv_then_import_them_offline(
    page: Page, browser: BrowserContext, server: Server, tmp_path: Path
) -> None:
    open_ui(page, server.url)
    jid = analyse(page, "Hi there, friend.")
    body = server.status(jid)
    rows = body["result"]["tokens"]

    with page.expect_download() as download:
        page.click("#export-jsonl")
    assert download.value.suggested_filename.endswith(".jsonl")
    jsonl = tmp_path / "export.jsonl"
    download.value.save_as(jsonl)
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["format"] == "talkative.analysis/1" and record["request_id"] == jid
    assert record["tokens"] == rows and record["metadata"] == body["result"]["metadata"]
    assert record["input"] == {"text": "Hi there, friend."}
    assert record["options"]["optimize_explanations_config"] == {"best_of_k": 2}

    with page.expect_download() as download:
        page.click("#export-csv")
    assert download.value.suggested_filename.endswith(".csv")
    csv_path = tmp_path / "export.csv"
    download.value.save_as(csv_path)
    # newline="" keeps a carriage return inside an explanation as written (read_text would make it a newline)
    with csv_path.open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["token"] for r in table] == [r["token"] for r in rows]
    assert [r["explanation"] for r in table] == [r["explanation"] for r in rows]
    for got, want in zip(table, rows, strict=True):
        assert float(got["relative_rmse"]) == pytest.approx(want["relative_rmse"])
        assert json.loads(got["token_salience"]) == pytest.approx(want["token_salience"])
        assert got["outlier"] == ("true" if want["outlier"] else "false")

    # offline: the files open in the browser alone
    browser.set_offline(True)
    try:
        page.click("#tab-history")
        page.set_input_files("#import-file", str(jsonl))
        expect(page.locator("#tab-analyse")).to_have_attribute("aria-selected", "true")
        page.wait_for_selector(".result-card .strip .tok")
        assert page.locator(".result-card .strip .tok").all_text_contents() == [
            shown(r["token"]) for r in rows
        ]
        expect(page.locator(".result-card .facts")).to_contain_text("from the file export.jsonl")
        page.click("#tab-history")
        page.set_input_files("#import-file", str(csv_path))
        expect(page.locator(".result-card .facts")).to_contain_text("from the file export.csv")
        assert page.locator(".result-card .strip .tok").count() == len(rows)
        page.hover("#tok-1")
        expect(page.locator("#token-tip")).to_contain_text(f"{rows[1]['relative_rmse']:.3f}")
        bad = tmp_path / "notes.json"
        bad.write_text('{"hello": "world"}')
        page.click("#tab-history")
        page.set_input_files("#import-file", str(bad))
        expect(page.locator(".toast.error")).to_contain_text("notes.json: No analysis found")
    finally:
        browser.set_offline(False)


# -- errors, phone, chat ---------------------------------------------------------------------------------------------
def test_form_checks_and_server_errors_are_shown(page: Page, server: Server) -> None:
    open_ui(page, server.url)
    # every control has a label a screen reader can read
    unlabelled = page.eval_on_selector_all(
        "input, select, textarea",
        "els => els.filter(e => !e.labels?.length && !e.getAttribute('aria-label')"
        " && !e.getAttribute('aria-labelledby')).map(e => e.outerHTML)",
    )
    assert unlabelled == []
    # the section tabs follow the arrow keys
    page.focus("#tab-analyse")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-generate")).to_be_focused()
    expect(page.locator("#panel-generate")).to_be_visible()
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#panel-analyse")).to_be_visible()

    page.fill("#analyse-text", "A short text.")
    page.fill("#opt-k", "0")
    page.press("#analyse-text", "Control+Enter")
    expect(page.locator("#analyse-form .form-error")).to_have_text("Best of k: at least 1.")
    expect(page.locator("#opt-k")).to_have_attribute("aria-invalid", "true")
    page.fill("#opt-k", "2")

    # the server's own error message, as it sent it
    page.select_option("#analyse-model", "smollm2-135m-l10-untrained")
    page.click("details.advanced summary")
    page.fill("#opt-add", "one two three four five six seven eight nine ten eleven twelve")
    page.press("#analyse-text", "Control+Enter")
    alert = page.locator("#progress .alert.error")
    expect(alert).to_contain_text("The analysis failed", timeout=30_000)
    expect(alert).to_contain_text("explanations here are 8 tokens long")
    page.fill("#opt-add", "")


def test_chat_messages_on_a_phone(page: Page, server: Server, tmp_path: Path) -> None:
    page.set_viewport_size(PHONE)
    open_ui(page, server.url)
    page.check("input[name='analyse-mode'][value='chat']")
    editor = page.locator("#analyse-chat")
    editor.locator("textarea").first.fill("What is 2+2?")
    editor.get_by_role("button", name="+ Add message").click()
    expect(editor.locator("select").nth(1)).to_have_value("assistant")
    editor.locator("textarea").nth(1).fill("4.")
    editor.get_by_role("button", name="+ Add message").click()
    editor.locator("textarea").nth(2).fill("Be brief.")
    editor.locator("select").nth(2).select_option("system")
    editor.get_by_role("button", name="Move up message 3").click()
    editor.get_by_role("button", name="Move up message 2").click()
    assert [editor.locator("select").nth(i).input_value() for i in range(3)] == [
        "system",
        "user",
        "assistant",
    ]
    expect(editor.get_by_role("button", name="Move down message 1")).to_be_focused()
    page.fill("#opt-k", "2")
    page.locator("#analyse-chat textarea").nth(2).press("Control+Enter")
    page.wait_for_selector(".result-card .strip .tok", timeout=180_000)
    text = "".join(page.locator(".result-card .strip .tok").all_text_contents())
    assert "Be brief." in text and "What is 2+2?" in text and "<|im_start|>" in text

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways at phone width ({width}px)"
    page.locator(".result-card .strip .tok").nth(3).click()
    expect(page.locator("#detail-title")).to_contain_text("Token 4 of")
    page.keyboard.press("Escape")
    page.mouse.move(0, 0)
    expect(page.locator("#token-tip")).to_be_hidden()
    page.locator(".result-card").scroll_into_view_if_needed()
    screenshot(page, tmp_path, "phone.png")


# -- API key ---------------------------------------------------------------------------------------------------------
def test_api_key_is_asked_for_kept_and_used(page: Page, make_server: Any) -> None:
    srv = make_server(API_KEY="s3cret-key")
    page.goto(srv.url)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=30_000)
    expect(page.locator("#conn-text")).to_have_text("API key needed")
    page.fill("#key-input", "wrong")
    page.click("#key-form button[value='save']")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("refused", timeout=30_000)
    page.fill("#key-input", "s3cret-key")
    page.click("#key-form button[value='save']")
    expect(page.locator("#conn")).to_have_attribute("data-state", "open", timeout=30_000)
    expect(dialog).to_be_hidden()
    assert page.evaluate("localStorage.getItem('talkative.apiKey')") == json.dumps("s3cret-key")
    expect(page.locator("#analyse-model optgroup").first).to_have_attribute("label", "Tiny A")

    jid = analyse(page, "Tiny models, quick answers.", k=1)
    page.click("#tab-history")
    expect(page.locator(f".history-item[data-request-id='{jid}']")).to_be_visible()
    # a reload keeps the key: connected at once, no prompt
    page.reload()
    expect(page.locator("#conn")).to_have_attribute("data-state", "open", timeout=30_000)
    expect(dialog).to_be_hidden()
    assert httpx.get(f"{srv.url}/api/history", timeout=10).status_code == 401
