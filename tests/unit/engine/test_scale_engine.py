"""Issue 19 in the engine: no cost per fork that grows with the episode, and the hooks scheduling needs.

* every generate call gets the agent's own growing sequence (no copy of the prefix per call), holding
  exactly the prefix at the time of the call;
* the scripted backend decodes a prompt once, not the whole input at every call;
* checkpoints are lazy: a lazy checkpointer gets snapshots that copy nothing until asked, and an
  eager one still gets whole segments;
* a join that waits for a worker still running tells its endpoint (``awaited``), one whose worker is
  done does not; request priorities: organizer 2, workers 0 (1 once awaited);
* an endpoint that times its workers itself (``manages_timeout``) is not cut off by the engine's clock;
* the parser's capacity check is O(1): thousands of active workers at once parse quickly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shared.agents import PRIORITY_ORGANIZER, PRIORITY_WORKER, Snapshot, failed_outcome
from shared.backends.base import GenerateRequest, GenerateResult
from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine, EngineConfig
from shared.messages import SegmentRecord, WorkerOutcome, WorkerTask
from shared.protocol import ProtocolParser, Role
from tests.unit.engine.test_engine import PROBLEM, EchoTask

SCRIPT = {
    "organizer": "plan <FORK-1>a</FORK-1> more <FORK-2>b</FORK-2> wait <JOIN-1> then <JOIN-2> <ANSWER>42</ANSWER>",
    "1": "work one <RETURN>x</RETURN>",
    "2": "work two <RETURN>y</RETURN>",
}


class Recording(ScriptedBackend):
    def __init__(self, script: dict[str, str], **kw: Any) -> None:
        super().__init__(script, **kw)
        self.inputs: dict[str, list[tuple[int, list[int]]]] = {}
        self.priorities: dict[str, set[int | None]] = {}
        self.decoded = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.inputs.setdefault(request.tag, []).append((id(request.input_ids), list(request.input_ids)))
        self.priorities.setdefault(request.tag, set()).add(request.priority)
        return await super().generate(request)

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return super().decode(ids)


async def test_generate_calls_share_the_agents_growing_sequence() -> None:
    backend = Recording(SCRIPT)
    result = await Engine(backend, EchoTask(), EngineConfig(capacity=3)).run(PROBLEM)
    assert result.answer == "42"
    calls = backend.inputs["organizer"]
    assert len(calls) >= 4 and len({list_id for list_id, _ in calls}) == 1  # one list, never copied
    for (_, before), (_, after) in zip(calls, calls[1:], strict=False):
        assert after[: len(before)] == before and len(after) > len(before)  # each call saw its own prefix
    organizer = result.segments[0]
    assert calls[-1][1] == organizer.prompt_ids + organizer.completion_ids[: len(calls[-1][1]) - len(organizer.prompt_ids)]
    assert backend.priorities["organizer"] == {PRIORITY_ORGANIZER}
    assert backend.priorities["1"] == {PRIORITY_WORKER}


async def test_the_scripted_backend_decodes_a_prompt_once() -> None:
    n = 200
    script = {
        "organizer": "".join(f"<FORK-{i}>q</FORK-{i}>" for i in range(1, n + 1))
        + "".join(f"<JOIN-{i}>" for i in range(1, n + 1))
        + "<ANSWER>42</ANSWER>",
        **{str(i): "<RETURN>r</RETURN>" for i in range(1, n + 1)},
    }
    backend = Recording(script)
    result = await Engine(backend, EchoTask(), EngineConfig(capacity=n + 1, organizer_budget=20_000)).run(PROBLEM)
    assert result.forks == n and result.answer == "42"
    length = len(result.segments[0].completion_ids)
    # decoding the whole input at each of the ~2n organizer calls would be ~n * length ids
    assert backend.decoded < 8 * length


class Lazy:
    lazy = True

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    async def checkpoint(self, episode_id: str, segment: Any) -> None:
        self.snapshots.append(segment)


class Eager:
    def __init__(self) -> None:
        self.segments: list[SegmentRecord] = []

    async def checkpoint(self, episode_id: str, segment: SegmentRecord) -> None:
        self.segments.append(segment)


async def test_checkpoints_are_snapshots_for_a_lazy_checkpointer() -> None:
    lazy, eager = Lazy(), Eager()
    await Engine(ScriptedBackend(SCRIPT), EchoTask(), EngineConfig(capacity=3), checkpointer=lazy).run(PROBLEM)
    await Engine(ScriptedBackend(SCRIPT), EchoTask(), EngineConfig(capacity=3), checkpointer=eager).run(PROBLEM)
    assert all(isinstance(s, Snapshot) for s in lazy.snapshots) and len(lazy.snapshots) == len(eager.segments)
    for snap, seg in zip(lazy.snapshots, eager.segments, strict=True):
        assert snap.segment().completion_ids == seg.completion_ids  # the sequence as it was then
        assert snap.segment().text == seg.text and snap.generated_tokens == seg.generated_tokens
        ids, mask, text = snap.tail(2)
        assert ids == seg.completion_ids[2:] and mask == seg.completion_mask[2:] and text == seg.text[2:]


class Endpoint:
    """Workers that finish after ``delay_s``; records which ones a join waited for."""

    def __init__(self, delay_s: dict[str, float], *, manages_timeout: bool = False) -> None:
        self.delay_s = delay_s
        self.awaited_agents: list[str] = []
        self.manages_timeout = manages_timeout

    def awaited(self, task: WorkerTask) -> None:
        self.awaited_agents.append(task.agent)

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        await asyncio.sleep(self.delay_s.get(task.agent, 0.0))
        outcome = failed_outcome(task, "none", returned=f"r{task.agent}")
        return outcome.model_copy(update={"error": None})


async def test_a_join_that_waits_tells_the_endpoint() -> None:
    endpoint = Endpoint({"1": 0.3, "2": 0.0})
    config = EngineConfig(capacity=3)
    result = await Engine(ScriptedBackend(SCRIPT), EchoTask(), config, endpoints={None: endpoint}).run(PROBLEM)
    assert result.answer == "42"
    assert endpoint.awaited_agents == ["1"]  # worker 2 was done by its join


async def test_an_endpoint_that_times_its_workers_is_not_cut_off_by_the_engine() -> None:
    script = {"organizer": "<FORK-1>a</FORK-1><JOIN-1><ANSWER>42</ANSWER>", "1": ""}
    config = EngineConfig(capacity=2, worker_timeout_s=0.1)
    slow = Endpoint({"1": 0.3}, manages_timeout=True)  # e.g. queued 0.3 s before it started
    result = await Engine(ScriptedBackend(script), EchoTask(), config, endpoints={None: slow}).run(PROBLEM)
    assert "<JOIN-1>r1</JOIN-1>" in result.segments[0].text
    cut = Endpoint({"1": 0.3})
    result = await Engine(ScriptedBackend(script), EchoTask(), config, endpoints={None: cut}).run(PROBLEM)
    assert [s.error for s in result.segments if s.role == "worker"] == ["timeout"]


def test_the_capacity_check_does_not_grow_with_the_active_workers() -> None:
    n = 20_000
    parser = ProtocolParser(Role.ORGANIZER, capacity=n + 1)
    text = "".join(f"<FORK-{i}>q</FORK-{i}>" for i in range(1, n + 1))
    t0 = time.process_time()
    events = parser.feed(text)
    took = time.process_time() - t0
    assert len(events) == n and not parser.errors and len(parser.active) == n
    assert took < 5.0  # quadratic (a set difference per fork) took minutes at this size
    assert parser.feed("<FORK-20001>q</FORK-20001>")[0].kind.value == "capacity_exceeded"  # type: ignore[union-attr]
