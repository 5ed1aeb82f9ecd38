"""Browser tests of the pages for people: Playwright for Python driving Debian's chromium (headless, never
``playwright install``), against the distributed stack of :mod:`tests.e2e.stack` on PostgreSQL and Redis.

Without chromium, Playwright, PostgreSQL or Redis the tests are skipped, except in CI (``CI`` set), where
each of those is a failure. One stack serves the module (a fresh database, a unique Redis prefix).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.stack import Stack, start_stack
from tests.helpers import REDIS_HINT
from tests.missing import missing
from tests.unit.gateway.conftest import free_port

CHROMIUM = os.environ.get("ASYNCTHINK_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium tries to reach the network at start, which a closed
# network refuses (and which would slow every launch).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]
REDIS_URL = os.environ.get("ASYNCTHINK_E2E_REDIS_URL", "redis://127.0.0.1:6379/0")


BROWSER_HINT = "pip install -e '.[test]' (playwright) and apt-get install chromium, or set ASYNCTHINK_CHROMIUM"


def _missing(what: str, install: str = BROWSER_HINT) -> None:
    missing(what, install)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium for one module: Playwright's sync API holds an event loop in this thread while it runs, so
    it must be stopped before the asyncio tests of other modules run."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        _missing(f"no chromium at {CHROMIUM}")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except Exception as exc:
        pw.stop()
        _missing(f"chromium did not start: {exc}")
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture(scope="module")
def stack(postgres_url: str) -> Iterator[Stack]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _missing(f"Redis at {REDIS_URL} is unreachable: {exc}", REDIS_HINT)
    finally:
        client.close()
    running, stop = start_stack(postgres_url, REDIS_URL, free_port())
    yield running
    stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    from shared.store.db import StoreUnavailable, check_connection, normalize_url
    from tests.integration.conftest import POSTGRES_ADMIN_URL

    try:
        check_connection(POSTGRES_ADMIN_URL, connect_timeout=3)
    except StoreUnavailable as exc:
        _missing(f"PostgreSQL is unreachable: {exc}", "start it, or point ASYNCTHINK_TEST_POSTGRES_URL at a server")
    import secrets

    from sqlalchemy import create_engine, text

    admin = normalize_url(POSTGRES_ADMIN_URL)
    name = f"asyncthink_e2e_{secrets.token_hex(5)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def sign_in(browser: Any, stack: Stack, key: str, *, viewport: dict[str, int] | None = None) -> tuple[Any, Any]:
    """A new browser context signed in with ``key``; its (context, page) on the inbox."""
    context = browser.new_context(viewport=viewport or {"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{stack.url}/ui/inbox")
    assert "/ui/login" in page.url
    page.fill("#key", key)
    page.click("#sign-in")
    page.wait_for_url("**/ui/inbox")
    return context, page
