"""Helpers of the browser tests: Debian's chromium driven by Playwright (never a downloaded browser), and the
steps every test repeats (open the UI, run an analysis, read the permalink).

Screenshots go to the test's tmp directory, and also to `$SCREENSHOT_DIR` when it is set:
`SCREENSHOT_DIR=docs/img pytest tests/e2e/test_browser.py` refreshes the README's images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import BrowserContext, Locator, Page, Playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 375, "height": 800}


def chromium_path() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed: run `make chromium` (or `apt-get install -y chromium`)"
        )
    return path


def launch(playwright: Playwright, profile: Path, **options: object) -> BrowserContext:
    """A fresh browser profile (empty storage), downloads allowed."""
    return playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=chromium_path(),
        args=CHROMIUM_ARGS,
        headless=True,
        viewport=DESKTOP,
        accept_downloads=True,
        **options,  # type: ignore[arg-type]
    )


def open_ui(page: Page, url: str) -> None:
    """Load the UI and wait until it is connected and knows the models."""
    page.goto(url)
    page.wait_for_selector("#conn[data-state='open']", timeout=30_000)
    page.wait_for_selector("#analyse-model option[value]:not([value=''])", state="attached", timeout=30_000)


def analyse(page: Page, text: str, *, k: int = 2, lens: bool = False, timeout: float = 180_000) -> str:
    """Run an analysis from the form (Ctrl+Enter in the text box) and wait for its token strip; returns its id."""
    page.click("#tab-analyse")
    page.check("input[name='analyse-mode'][value='text']")
    page.fill("#analyse-text", text)
    page.fill("#opt-k", str(k))
    page.set_checked("#opt-lens", lens)
    before = job_id(page)
    page.press("#analyse-text", "Control+Enter")
    page.wait_for_function(
        "before => new URLSearchParams(location.search).get('job') && "
        "new URLSearchParams(location.search).get('job') !== before",
        arg=before,
        timeout=30_000,
    )
    page.wait_for_selector(".result-card .strip .tok", timeout=timeout)
    return str(job_id(page))


def job_id(page: Page) -> str | None:
    values = parse_qs(urlparse(page.url).query).get("job")
    return values[0] if values else None


def screenshot(subject: Page | Locator, tmp_path: Path, name: str, **options: object) -> Path:
    path = tmp_path / name
    subject.screenshot(path=str(path), **options)  # type: ignore[arg-type]
    target = os.environ.get("SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path
