"""The README's screenshots of the pages for people, taken in the browser against the e2e stack.

A marked test (``screenshots``), skipped unless ``ASYNCTHINK_SCREENSHOTS`` names the directory to write to:

    ASYNCTHINK_SCREENSHOTS=docs/images PYTHONPATH=. pytest -q tests/e2e/test_screenshots.py

It writes ``inbox.png``, ``organizer.png``, ``planning.png``, ``timeline.png`` (the episode page) and
``trace.png`` (what ``asyncthink trace ID --png`` draws for the same episode).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from shared.trace import stored_layout
from shared.trace_plot import plot_trace
from tests.e2e.conftest import sign_in
from tests.e2e.stack import Stack

OUT = os.environ.get("ASYNCTHINK_SCREENSHOTS")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.screenshots,
    pytest.mark.skipif(not OUT, reason="set ASYNCTHINK_SCREENSHOTS=DIR to take the README's screenshots"),
]


def test_screenshots(browser: Any, stack: Stack) -> None:
    out = Path(str(OUT))
    out.mkdir(parents=True, exist_ok=True)
    view = {"width": 1360, "height": 860}

    # the inbox: an episode with a model, a tool and a person working side by side
    context, page = sign_in(browser, stack, stack.key("Ann Lee"), viewport=view)
    eid = stack.submit("team: numbers 3 7 25 50, target 75", capacity=4)
    page.wait_for_selector(f"article[data-episode='{eid}'] .task[data-state='open']", timeout=15_000)
    page.keyboard.press("n")
    page.wait_for_selector("#answer")
    page.fill("#answer", "25+50 and 50+25 are the same solution; 3*25 is a second one")
    page.wait_for_timeout(600)
    page.screenshot(path=str(out / "inbox.png"))
    page.keyboard.press("Control+Enter")
    stack.episode(eid)

    # the episode's timeline
    page.goto(f"{stack.url}/ui/episodes/{eid}")
    page.wait_for_selector("#tl-tokens svg")
    page.screenshot(path=str(out / "timeline.png"), full_page=True)
    with stack.sessions() as s:
        from shared.store import repository

        row = repository.get_episode(s, eid)
        plot_trace(stored_layout(row.timeline, repository.episode_segments(s, eid)), out / "trace.png",
                   title=f"episode {eid[:12]} · chat · {row.status}")

    # the organizer page, mid-episode
    page.goto(f"{stack.url}/ui/organize")
    page.select_option("#task", "chat")
    page.fill("#prompt", "What is 17*23, and is 391 prime?")
    page.fill("#capacity", "3")
    page.click("#start")
    page.wait_for_url("**/ui/organize/*")
    page.fill("#thought", "17*23 = 17*20 + 17*3, and for 391 I only need to try primes up to 19. ")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#transcript")).to_contain_text("primes up to 19")
    page.fill("#fork-query", "17*20; 17*3; 391/17; 391/19")
    page.select_option("#fork-endpoint", "python")
    page.click("#fork")
    page.wait_for_selector("[data-agent='1']")
    page.fill("#fork-query", "Is 391 a prime number? Explain briefly.")
    page.select_option("#fork-endpoint", "")
    page.click("#fork")
    page.wait_for_selector("[data-agent='1'] .returned:not([hidden])")
    page.wait_for_selector("[data-agent='2'] .returned:not([hidden])")
    page.click("#join")
    page.wait_for_selector("[data-agent='1'][data-state='joined']")
    page.fill("#answer", "391 = 17*23, so it is not prime")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "organizer.png"), full_page=True)

    # the planning page, edited
    page.goto(f"{stack.url}/ui/plan")
    page.select_option("#task", "chat")
    page.fill("#prompt", "plan me: find two ways to make 75 from 3 7 25 50")
    page.fill("#capacity", "3")
    page.click("#propose")
    page.wait_for_url("**/ui/plans/*")
    steps = page.locator("#steps li")
    steps.nth(0).locator("input.q").fill("What is 25+50? Show the sum.")
    steps.nth(1).locator("select.ep").select_option("python")
    steps.nth(1).locator("button.up").click()
    page.click("#add-fork")
    page.locator("#steps li").nth(4).locator("input.q").fill("Would a teacher count 25+50 and 50+25 as two?")
    page.locator("#steps li").nth(4).locator("select.ep").select_option("human")
    page.click("#add-join")
    expect(page.locator("#diff li.d-added")).not_to_have_count(0)
    page.wait_for_timeout(400)
    page.screenshot(path=str(out / "planning.png"), full_page=True)
    context.close()
