"""The human worker endpoint inside the engine (embedded: SQLite and the in-process bus): a fork to @human
waits for a person's answer like any worker, exactly once, and a missed deadline takes the fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from services.human.endpoint import HumanQueueConfig, HumanWorkerEndpoint, fallback_query, pool_of
from services.human.planner import LocalModelWorker
from shared.backends.scripted import ScriptedBackend
from shared.bus.inprocess import InProcessBus
from shared.engine import Engine, EngineConfig, EpisodeResult
from shared.messages import EpisodeStatus
from shared.store import people
from shared.store.people import Actor, QueueConflict
from shared.tasks import get_task

ANN = Actor("aaaaaaaaaaaa", "Ann")
PROBLEM = get_task("chat").problem_from_payload({"prompt": "What is 6*7, and why?"})
ORGANIZER = "<FORK-1@human>What is 6*7?</FORK-1>Meanwhile I think.<JOIN-1>So.<ANSWER>done</ANSWER>"


async def task_of(sessions: Callable[[], Any], episode_id: str, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as s:
            rows = people.list_tasks(s, episode_ids=[episode_id])
        if rows:
            return rows[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no human task for {episode_id}")


def engine(backend: ScriptedBackend, endpoint: HumanWorkerEndpoint, **config: Any) -> Engine:
    return Engine(backend, get_task("chat"), EngineConfig(**config), endpoints=endpoint.endpoints())


def organizer_text(result: EpisodeResult) -> str:
    return next(s.text for s in result.segments if s.role == "organizer")


def test_pool_names() -> None:
    assert pool_of("human") == "default" and pool_of("human:experts") == "experts"
    assert HumanQueueConfig(pools=("experts",)).endpoint_names() == ["human", "human:experts"]
    assert fallback_query("q", "") == "q" and "half done" in fallback_query("q", "half done")


async def test_the_join_receives_the_persons_answer_once(sessions: Callable[[], Any]) -> None:
    endpoint = HumanWorkerEndpoint(sessions, InProcessBus(), HumanQueueConfig(undo_s=0.3, poll_s=0.05))
    run = asyncio.create_task(engine(ScriptedBackend({"organizer": ORGANIZER}), endpoint).run(PROBLEM, episode_id="e1"))
    row = await task_of(sessions, "e1")
    assert (row.pool, row.query, row.status, row.agent) == ("default", "What is 6*7?", "open", "1")
    with sessions() as s:
        people.claim(s, task_id=row.id, actor=ANN, lease_s=30)
        people.submit(s, task_id=row.id, actor=ANN, answer="42", undo_s=0.3)
        with pytest.raises(QueueConflict):
            people.submit(s, task_id=row.id, actor=ANN, answer="42", undo_s=0.3)
    result = await asyncio.wait_for(run, 10)
    assert result.status is EpisodeStatus.COMPLETED, result.error
    assert "<JOIN-1>42</JOIN-1>" in organizer_text(result)
    assert organizer_text(result).count("</JOIN-1>") == 1
    worker = next(s for s in result.segments if s.agent == "1")
    assert (worker.author, worker.returned, worker.endpoint) == ("human", "42", "human")
    with sessions() as s:
        assert [a.action for a in people.audit(s, task_id=row.id)] == ["created", "claim", "submit", "consumed"]


async def test_a_named_pool(sessions: Callable[[], Any]) -> None:
    endpoint = HumanWorkerEndpoint(sessions, InProcessBus(), HumanQueueConfig(pools=("experts",), undo_s=0, poll_s=0.05))
    script = {"organizer": "<FORK-1@human:experts>Check this.</FORK-1><JOIN-1><ANSWER>ok</ANSWER>"}
    run = asyncio.create_task(engine(ScriptedBackend(script), endpoint).run(PROBLEM, episode_id="e2"))
    row = await task_of(sessions, "e2")
    assert row.pool == "experts"
    with sessions() as s:
        people.claim(s, task_id=row.id, actor=ANN, lease_s=30)
        people.submit(s, task_id=row.id, actor=ANN, answer="checked", undo_s=0)
    result = await asyncio.wait_for(run, 10)
    assert "<JOIN-1>checked</JOIN-1>" in organizer_text(result)


async def test_deadline_fallback_to_the_model_with_the_partial_answer(sessions: Callable[[], Any]) -> None:
    prompts: list[str] = []

    def script(agent: str, prompt: str) -> str:
        if agent == "organizer":
            return ORGANIZER
        prompts.append(prompt)
        return "<RETURN>42, finished by the model</RETURN>"

    backend = ScriptedBackend(script)
    config = HumanQueueConfig(deadline_s=0.6, poll_s=0.05, fallback="model")
    endpoint = HumanWorkerEndpoint(sessions, InProcessBus(), config, model=LocalModelWorker(backend))
    run = asyncio.create_task(engine(backend, endpoint).run(PROBLEM, episode_id="e3"))
    row = await task_of(sessions, "e3")
    with sessions() as s:
        people.claim(s, task_id=row.id, actor=ANN, lease_s=30)
        people.renew(s, task_id=row.id, actor=ANN, lease_s=30, draft="6*7 = 6*5 + 6*2 = 30 + ")
    result = await asyncio.wait_for(run, 10)
    assert "<JOIN-1>42, finished by the model</JOIN-1>" in organizer_text(result)
    assert len(prompts) == 1 and "6*7 = 6*5 + 6*2 = 30 +" in prompts[0] and "What is 6*7?" in prompts[0]
    worker = next(s for s in result.segments if s.agent == "1")
    assert worker.endpoint == "human" and worker.author is None and worker.generated_tokens > 0
    with sessions() as s:
        trail = people.audit(s, task_id=row.id)
        assert [a.action for a in trail] == ["created", "claim", "deadline", "fallback"]
        assert trail[-1].detail["resolution"] == "model" and people.get_task(s, row.id).resolution == "model"  # type: ignore[union-attr]


@pytest.mark.parametrize("fallback", ["default", "error"])
async def test_deadline_fallback_default_and_error(sessions: Callable[[], Any], fallback: str) -> None:
    config = HumanQueueConfig(deadline_s=0.3, poll_s=0.05, fallback=fallback, fallback_text="[nobody came]")
    endpoint = HumanWorkerEndpoint(sessions, InProcessBus(), config)
    result = await asyncio.wait_for(
        engine(ScriptedBackend({"organizer": ORGANIZER}), endpoint).run(PROBLEM, episode_id=f"e-{fallback}"), 10
    )
    text = organizer_text(result)
    if fallback == "default":
        assert "<JOIN-1>[nobody came]</JOIN-1>" in text
    else:
        assert "<JOIN-1>[worker 1 failed: no answer from a person by the deadline]</JOIN-1>" in text
    assert result.status is EpisodeStatus.COMPLETED


async def test_the_deadline_stays_inside_the_worker_timeout(sessions: Callable[[], Any]) -> None:
    config = HumanQueueConfig(deadline_s=600, poll_s=0.05, fallback="default", fallback_text="[late]")
    endpoint = HumanWorkerEndpoint(sessions, InProcessBus(), config)
    result = await asyncio.wait_for(
        engine(ScriptedBackend({"organizer": ORGANIZER}), endpoint, worker_timeout_s=2.5).run(PROBLEM, episode_id="e4"),
        10,
    )
    assert "<JOIN-1>[late]</JOIN-1>" in organizer_text(result)


async def test_an_episode_that_answers_without_joining_cancels_the_task(sessions: Callable[[], Any]) -> None:
    endpoint = HumanWorkerEndpoint(sessions, InProcessBus(), HumanQueueConfig(poll_s=0.05))
    script = {"organizer": "<FORK-1@human>Anything?</FORK-1><ANSWER>no need</ANSWER>"}
    await engine(ScriptedBackend(script), endpoint).run(PROBLEM, episode_id="e5")
    row = await task_of(sessions, "e5")
    for _ in range(500):  # polled every 20 ms, 10 s at most
        with sessions() as s:
            if people.get_task(s, row.id).status == "cancelled":  # type: ignore[union-attr]
                break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the task was never cancelled")
    with sessions() as s:
        assert [a.action for a in people.audit(s, task_id=row.id)] == ["created", "cancelled"]
