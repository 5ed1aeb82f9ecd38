"""One scenario suite, two setups: every scripted episode must come out the same embedded and distributed.

For each scenario the test submits the problem to the problems stream (as the gateway does, after
storing a pending episode), waits for the episode's ``finished`` event, and checks, from the store and
the event stream:

* status, answer, accuracy, ``T`` and ``η`` exactly as the README's Metrics section defines them (the expected values are derived
  from the scripts in :mod:`tests.scenarios.scripts`);
* the store already holds the finished episode when ``finished`` is published;
* every segment with its token ids and its mask: the organizer's ids are its script with each join's
  injected text in place, masked 0 exactly there; a worker's ids are its own script, all 1;
* the events of the organizer in order, each worker's ``segment`` event before its join's result, and
  the workers' own ``return`` events.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from shared.messages import ORGANIZER_GROUP, PROBLEMS_STREAM, EpisodeEvent, SubmitProblem
from shared.protocol import join_result
from shared.store import repository
from tests.scenarios.conftest import Setup
from tests.scenarios.scripts import SCENARIOS, Scenario


def expected_organizer(script: str, returned: dict[str, str]) -> tuple[str, list[int]]:
    """The organizer's completion text (script + injected join results) and its mask."""
    text: list[str] = []
    mask: list[int] = []
    pos = 0
    for m in re.finditer(r"<JOIN-(\d+)>", script):
        piece = script[pos : m.end()]
        text.append(piece)
        mask += [1] * len(piece)
        fork = m.group(1)
        if fork in returned:
            injected = join_result(int(fork), returned[fork])
            text.append(injected)
            mask += [0] * len(injected)
        pos = m.end()
    text.append(script[pos:])
    mask += [1] * len(script[pos:])
    return "".join(text), mask


def check_events(scenario: Scenario, events: list[EpisodeEvent]) -> None:
    organizer = [e for e in events if e.agent == "organizer"]
    assert [e.kind for e in organizer] == scenario.organizer_events
    seqs = [e.seq for e in organizer]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finished = organizer[-1]
    assert finished.data["status"] == scenario.status
    assert finished.data["latency"] == scenario.latency
    assert finished.data["eta"] == pytest.approx(scenario.eta)
    kinds = [(e.kind, e.agent) for e in events]
    for agent in scenario.returned:
        seg_at = kinds.index(("segment", agent))
        result_at = next(
            i for i, e in enumerate(events)
            if e.kind == "worker_result" and e.agent == "organizer" and e.data.get("fork_id") == int(agent)
        )
        assert seg_at < result_at, f"segment of {agent} after its join result"
        assert events[result_at].data["returned"] == scenario.returned[agent]
    for agent in scenario.worker_returns:
        assert ("return", agent) in kinds, f"no return event of worker {agent}"
    for agent in scenario.script:
        if agent.startswith("trace-"):
            assert ("answer", agent) in kinds


def check_store(scenario: Scenario, setup: Setup, episode_id: str) -> None:
    with setup.session_factory() as session:
        episode = repository.get_episode(session, episode_id)
        assert episode is not None
        segments = {s.agent: s for s in repository.episode_segments(session, episode_id)}
        # read everything while the session is open
        status, answer, accuracy = episode.status, episode.answer, episode.accuracy
        latency, eta, format_errors = episode.latency, episode.eta, list(episode.format_errors or [])
    assert status == scenario.status, format_errors
    assert answer == scenario.answer
    assert accuracy == pytest.approx(scenario.accuracy)
    assert latency == scenario.latency
    assert eta == pytest.approx(scenario.eta)
    assert [e["kind"] for e in format_errors] == scenario.format_error_kinds
    workers = set(scenario.returned)
    assert set(segments) == set(scenario.script) | workers
    for agent, text in scenario.script.items():
        seg = segments[agent]
        if agent == "organizer" and scenario.mode == "asyncthink":
            full, mask = expected_organizer(text, scenario.returned)
        elif agent in scenario.worker_errors:
            continue  # a timed-out worker's trace never came back
        else:
            full, mask = text, [1] * len(text)
        if agent == "organizer" and scenario.status == "format_error":
            full = full[: scenario.latency]  # decoding stopped at the first error
            mask = mask[: scenario.latency]
        assert seg.completion_ids == [ord(c) for c in full], agent
        assert seg.completion_mask == mask, agent
        assert seg.text == full
        assert seg.generated_tokens == sum(mask)
        assert seg.prompt_ids == [ord(c) for c in seg.prompt] and seg.prompt
    for agent, returned in scenario.returned.items():
        seg = segments[agent]
        assert seg.role == "worker" and seg.fork_id == int(agent) and seg.parent == "organizer"
        assert seg.endpoint == scenario.endpoints.get(agent)
        assert seg.error == scenario.worker_errors.get(agent)
        if agent not in scenario.worker_errors:
            assert seg.returned == returned


async def _idle(setup: Setup, timeout_s: float = 5.0) -> None:
    """Wait until the organizer has no submission in progress."""
    for _ in range(int(timeout_s / 0.02)):
        if not setup.service.in_progress:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the organizer is still busy")


async def _backlog(setup: Setup) -> int:
    """Submissions not yet read, plus those read and not yet acked, in the organizers' group."""
    return (await setup.bus.backlog(PROBLEMS_STREAM, ORGANIZER_GROUP)).total


async def _until_consumed(setup: Setup, backlog: int, timeout_s: float = 10.0) -> None:
    """Wait until the organizers' backlog is back to ``backlog``: what was published since is read and acked."""
    for _ in range(int(timeout_s / 0.02)):
        if await _backlog(setup) <= backlog:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the organizer did not consume the submission in {timeout_s} s")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_scenario(setup: Setup, scenario: Scenario) -> None:
    episode_id = f"{scenario.name}--{uuid.uuid4().hex[:12]}"
    submission = SubmitProblem(episode_id=episode_id, **scenario.submission_fields())
    if scenario.name != "sequential":  # as the gateway does; the sequential one exercises "create if missing"
        from shared.tasks import get_task

        task = get_task("countdown")
        with setup.session_factory() as session:
            repository.create_episode(
                session,
                episode_id=episode_id,
                problem=task.problem_from_payload(submission.payload, submission.problem_id),
                mode=submission.settings.mode,
                capacity=submission.settings.resolved_capacity(task.default_capacity),
                model_id="scripted-scenarios",
                config=submission.stored_config(),
            )
    await setup.submit(submission)
    events = await setup.events_until_finished(episode_id)
    check_store(scenario, setup, episode_id)  # stored before "finished" was published
    check_events(scenario, events)


async def test_redelivered_submission_is_not_run_again(setup: Setup) -> None:
    """At-least-once: the same submission delivered again after it finished is acked, not re-run."""
    scenario = SCENARIOS[0]
    episode_id = f"{scenario.name}--{uuid.uuid4().hex[:12]}"
    submission = SubmitProblem(episode_id=episode_id, **scenario.submission_fields())
    await setup.submit(submission)
    first = await setup.events_until_finished(episode_id)
    await _idle(setup)
    done_before = setup.service.episodes_done
    backlog = await _backlog(setup)
    await setup.submit(submission)  # a duplicate delivery
    assert await _backlog(setup) == backlog + 1  # waiting, or read and not yet acked
    assert await setup.service.handle(submission) is None  # and a direct re-run: skipped
    await _until_consumed(setup, backlog)  # the organizer has read the duplicate and acked it: handled
    await _idle(setup)
    assert setup.service.episodes_done == done_before
    again = await setup.events_until_finished(episode_id)
    assert [e.kind for e in again] == [e.kind for e in first]  # no second run's events
