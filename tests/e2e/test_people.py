"""People in the loop, in a real browser against the real gateway, PostgreSQL and Redis.

Each test is one story from the issue: a fork to a person answered through the inbox (and a double submit
that gives one join); a claim whose page closes, lapses and is taken by another person; a deadline whose
model fallback finishes the person's partial answer; a person organizing an episode with the model and
the python tool; a plan proposed, edited, approved and followed; and the doors that stay shut without a
session or to a key that was not given an episode.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import sign_in
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SUBMIT_TWICE = """async ([id, answer]) => {
  const post = () => fetch(`/ui/tasks/${id}/submit`, {method: "POST", headers: {"X-CSRF-Token": AT.csrf(),
    "Content-Type": "application/x-www-form-urlencoded"}, body: new URLSearchParams({answer})}).then(r => r.status);
  return Promise.all([post(), post()]);
}"""


def task_id(page: Any) -> str:
    return str(page.get_attribute(".task[data-state='open']", "data-task"))


def test_a_fork_to_a_person_is_answered_in_the_inbox_and_joined_once(browser: Any, stack: Stack) -> None:
    context, page = sign_in(browser, stack, stack.key("Ann"))
    eid = stack.submit("human: Is 17*23 = 391?")
    page.wait_for_selector(f"article[data-episode='{eid}'] .task[data-state='open']", timeout=15_000)
    card = page.locator(f"article[data-episode='{eid}']")
    assert "Is 17*23 = 391?" in card.inner_text() and "I will ask a person." in card.inner_text()  # goal, text so far
    page.keyboard.press("n")  # claim the next open task
    page.wait_for_selector("#answer")
    page.fill("#answer", "Yes: 17*23 = 340 + 51 = 391")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#undo-bar")
    bench_task = page.get_attribute(".bench", "data-task")
    statuses = page.evaluate(SUBMIT_TWICE, [bench_task, "a second answer"])
    assert sorted(statuses) == [409, 409]  # already submitted: a double submit changes nothing
    row = stack.episode(eid)
    assert row.status == "completed" and row.answer == "checked"
    organizer = stack.segments(eid)["organizer"]
    assert organizer.text.count("</JOIN-1>") == 1 and "<JOIN-1>Yes: 17*23 = 340 + 51 = 391</JOIN-1>" in organizer.text
    assert stack.segments(eid)["1"].author == "human"
    assert [a for a, _ in stack.audit(eid)] == ["created", "claim", "submit", "consumed"]
    page.wait_for_selector(".bench[data-state='done']", timeout=10_000)
    context.close()


def test_the_lease_lapses_when_the_page_closes_and_another_person_claims(browser: Any, stack: Stack) -> None:
    ann_ctx, ann = sign_in(browser, stack, stack.key("Ann"))
    bob_ctx, bob = sign_in(browser, stack, stack.key("Bob"))
    eid = stack.submit("human: Which is larger, 2**10 or 10**3?")
    selector = f"article[data-episode='{eid}'] .task"
    ann.wait_for_selector(f"{selector}[data-state='open']", timeout=15_000)
    ann.keyboard.press("n")
    ann.wait_for_selector("#answer")
    with ann.expect_response(lambda r: "/renew" in r.url and r.ok):  # the draft is saved as it is typed
        ann.fill("#answer", "2**10 = 1024 is lar")
    bob.wait_for_selector(f"{selector}[data-state='taken']", timeout=10_000)
    assert "Ann is on it" in bob.inner_text(f"article[data-episode='{eid}']")
    ann_ctx.set_offline(True)  # the page dies without a word: only the lease can free the task
    ann.close()
    bob.wait_for_selector(f"{selector}[data-state='open']", timeout=15_000)
    bob.keyboard.press("n")
    bob.wait_for_selector("#answer")
    assert bob.input_value("#answer") == "2**10 = 1024 is lar"  # Ann's partial answer carried over
    bob.fill("#answer", "2**10 = 1024 is larger than 1000")
    bob.click("#submit")
    row = stack.episode(eid)
    assert "<JOIN-1>2**10 = 1024 is larger than 1000</JOIN-1>" in stack.segments(eid)["organizer"].text
    assert row.status == "completed"
    assert stack.audit(eid) == [
        ("created", "system"), ("claim", "Ann"), ("lease_expired", "Ann"), ("claim", "Bob"), ("submit", "Bob"),
        ("consumed", "system"),
    ]
    ann_ctx.close()
    bob_ctx.close()


def test_the_deadline_sends_the_partial_answer_to_a_model_worker(browser: Any, stack: Stack) -> None:
    context, page = sign_in(browser, stack, stack.key("Cy"))
    eid = stack.submit("human: Name three primes above 100.", worker_timeout_s=7)  # deadline: 5.6 s after the fork
    page.wait_for_selector(f"article[data-episode='{eid}'] .task[data-state='open']", timeout=15_000)
    page.keyboard.press("n")
    page.wait_for_selector("#answer")
    with page.expect_response(lambda r: "/renew" in r.url and r.ok):
        page.fill("#answer", "101, 103, and")
    row = stack.episode(eid, timeout_s=30)
    worker = stack.segments(eid)["1"]
    assert "101, 103, and" in worker.prompt and "Name three primes above 100." in worker.prompt
    assert worker.author is None and worker.endpoint == "human" and worker.generated_tokens > 0
    assert f"<JOIN-1>{worker.returned}</JOIN-1>" in stack.segments(eid)["organizer"].text
    assert row.status == "completed"
    trail = stack.audit(eid)
    assert [a for a, _ in trail] == ["created", "claim", "deadline", "fallback"]
    page.wait_for_selector(".bench[data-state='fallback']", timeout=10_000)
    context.close()


def test_a_person_organizes_an_episode_with_the_model_and_the_python_tool(browser: Any, stack: Stack) -> None:
    context, page = sign_in(browser, stack, stack.key("Org"))
    page.goto(f"{stack.url}/ui/organize")
    page.select_option("#task", "chat")
    page.fill("#prompt", "What is 17*23?")
    page.fill("#capacity", "3")
    page.click("#start")
    page.wait_for_url("**/ui/organize/*")
    eid = page.url.rsplit("/", 1)[1]
    page.fill("#thought", "17*23 = 17*20 + 17*3. ")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#transcript")).to_contain_text("17*20 + 17*3")  # back from the organizer, live
    page.fill("#fork-query", "17*20; 17*3")
    page.select_option("#fork-endpoint", "python")
    page.click("#fork")
    page.wait_for_selector("[data-agent='1']")
    page.fill("#fork-query", "Check that 340 + 51 = 391")
    page.select_option("#fork-endpoint", "")
    page.click("#fork")
    page.wait_for_selector("[data-agent='1'] .returned:not([hidden])")
    page.wait_for_selector("[data-agent='2'] .returned:not([hidden])")
    page.click("#join")  # fork 1
    page.wait_for_selector("[data-agent='1'][data-state='joined']")
    page.click("#join")  # fork 2
    page.wait_for_selector("[data-agent='2'][data-state='joined']")
    page.fill("#answer", "391")
    page.click("#send-answer")
    page.wait_for_selector("#ep-status.s-completed", timeout=15_000)
    assert "17*20 = 340; 17*3 = 51" in page.inner_text("#transcript")
    row = stack.episode(eid)
    segments = stack.segments(eid)
    assert row.answer == "391" and segments["organizer"].author == "human"
    assert segments["1"].endpoint == "python" and segments["2"].endpoint is None
    assert segments["2"].returned.startswith("the model says:")
    context.close()


def test_a_plan_is_proposed_edited_approved_and_followed(browser: Any, stack: Stack) -> None:
    context, page = sign_in(browser, stack, stack.key("Pat"))
    page.goto(f"{stack.url}/ui/plan")
    page.select_option("#task", "chat")
    page.fill("#prompt", "plan me: 25+50 and 3*25")
    page.fill("#capacity", "3")
    page.click("#propose")
    page.wait_for_url("**/ui/plans/*")
    steps = page.locator("#steps li")
    assert steps.count() == 4
    steps.nth(0).locator("input.q").fill("What is 25+50?")  # rewrite a sub-query
    steps.nth(1).locator("select.ep").select_option("python")  # move a branch to a tool
    steps.nth(1).locator("button.up").click()  # reorder: fork 2 first
    expect(page.locator("#diff li.d-changed")).to_have_count(2)
    expect(page.locator("#diff li.moved, #diff li.d-moved")).not_to_have_count(0)
    page.click("#approve")
    page.wait_for_url("**/ui/episodes/*")
    eid = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#followed", timeout=20_000)
    segments = stack.segments(eid)
    assert segments["2"].endpoint == "python" and segments["2"].returned == "3*25 = 75"
    assert segments["1"].query == "What is 25+50?"
    assert "Approved plan" in segments["organizer"].prompt
    assert page.locator("#tl-tokens svg .critical").count() >= 1
    context.close()


def test_nothing_without_a_session_and_nothing_not_given(browser: Any, stack: Stack) -> None:
    context = browser.new_context()
    page = context.new_page()
    for path in ("/ui/inbox", "/ui/organize", "/ui/plan", "/ui/episodes"):
        page.goto(stack.url + path)
        assert "/ui/login" in page.url, path
    assert page.request.post(f"{stack.url}/ui/tasks/abc/claim").status == 401
    assert page.request.get(f"{stack.url}/ui/stream?queue=1").status == 401
    context.close()
    key = stack.key("Eve", pools=["default"])
    eid = stack.submit("plan me: nothing for Eve", mode="sequential")  # no human task: not given to anyone
    stack.episode(eid)
    eve_ctx, eve = sign_in(browser, stack, key)
    response = eve.goto(f"{stack.url}/ui/episodes/{eid}")
    assert response is not None and response.status == 404
    r = httpx.get(f"{stack.url}/v1/episodes/{eid}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    eve_ctx.close()
