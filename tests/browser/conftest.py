"""Browser tests: real headless Chromium (Debian's, installed by `./dev setup`) through Playwright.

They run against a real server on SQLite and the embedded broker, like the functional
`stack`, and write a screenshot of each page they check to `artifacts/screenshots/`.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Playwright, sync_playwright

from roompay.services.auth import Role, create_user
from roompay.store.db import transaction
from tests.support.server import Stack

CHROMIUM = Path("/usr/bin/chromium")
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
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
PASSWORD = "correct horse"
PHONE = {"width": 390, "height": 844}
DESK = {"width": 1280, "height": 900}


BROWSER_MARKER = "browser: drives real headless Chromium through Playwright (tests/browser)"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker here too, so the folder also runs on its own."""
    config.addinivalue_line("markers", BROWSER_MARKER)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder as a browser test."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture
def backend() -> str:
    """Browser tests run on SQLite and the embedded broker only."""
    return "embedded"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """The Playwright driver for the session."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run ./dev setup (it installs Debian's chromium)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Headless Chromium, shared by the session."""
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


class Contexts:
    """Opens browser contexts for one test against its server; closes them before it stops."""

    def __init__(self, browser: Browser, stack: Stack) -> None:
        self._browser = browser
        self._stack = stack
        self._open: list[BrowserContext] = []

    def new(self, user_agent: str | None = None, *, phone: bool = True) -> BrowserContext:
        """A fresh browser profile (no cookies) on the test's server."""
        options: dict[str, object] = {
            "base_url": self._stack.base_url,
            "viewport": PHONE if phone else DESK,
            "locale": "zh-CN",
        }
        if user_agent is not None:
            options["user_agent"] = user_agent
        context = self._browser.new_context(**options)  # type: ignore[arg-type]
        context.set_default_timeout(15_000)
        self._open.append(context)
        return context

    def close(self) -> None:
        """Close every context (their event streams end with them)."""
        for context in self._open:
            context.close()


@pytest.fixture
def contexts(browser: Browser, stack: Stack) -> Iterator[Contexts]:
    """Browser contexts for this test; closed before the server stops."""
    opened = Contexts(browser, stack)
    yield opened
    opened.close()


def screenshot(page_name: str, page: object) -> Path:
    """Write a full-page screenshot to artifacts/screenshots/<page_name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{page_name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path


def add_user(stack: Stack, username: str, role: Role, hotel_id: int | None) -> None:
    """A staff account with the test password."""
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, PASSWORD, role, hotel_id, stack.runtime.clock.now())
