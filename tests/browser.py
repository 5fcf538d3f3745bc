"""Headless Chromium for page tests: Debian's browser (`apt-get install chromium`) driven by
Playwright (its own browser download cannot be reached here, so it is pointed at that one).

Where there is no Chromium the page tests skip, unless ``FEDTIDE_REQUIRE_BROWSER=1`` (set by
``.ci/run``, which installs Chromium first): there a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# as root Chromium needs --no-sandbox; this machine's network is closed, so no background calls
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    explicit = os.environ.get("FEDTIDE_CHROMIUM")
    if explicit:
        return explicit
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@contextmanager
def browser_page(profile: Path) -> Iterator[Any]:
    """A fresh page of headless Chromium (a new profile in ``profile``)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        if os.environ.get("FEDTIDE_REQUIRE_BROWSER") == "1":
            pytest.fail("no Chromium or no Playwright: .ci/run installs Debian's chromium and the test extra")
        pytest.skip("page tests need Chromium: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=FLAGS, viewport={"width": 1280, "height": 800},
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()
