"""The engine over scripted agents: forks run concurrently, joins block only the organizer, T and η exact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.backends.base import FinishReason, GenerateRequest, GenerateResult
from shared.backends.scripted import CodePoints, ScriptedBackend
from shared.engine import Engine, EngineConfig, ListSink
from shared.messages import WorkerOutcome, WorkerTask
from shared.metrics import Decode, ForkStep, JoinStep, Timeline
from shared.tasks.base import Mode, Problem, Score


class EchoTask:
    """A task whose correct answer is the payload's ``answer``."""

    name = "echo"
    default_capacity = 2

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        return Problem("echo", problem_id or "p", payload)

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        return [Problem("echo", f"p{i}", {"answer": str(i)}) for i in range(n)]

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        return f"Q{problem.id}\n"

    def worker_prompt(self, query: str) -> str:
        return f"W {query}\n"

    def score(self, problem: Problem, answer: str | None) -> Score:
        ok = answer is not None and answer.strip() == problem.payload["answer"]
        return Score(1.0 if ok else 0.0, int(ok), 1)

    def aggregate(self, answers: list[str | None]) -> str | None:
        votes = [a for a in answers if a]
        return max(set(votes), key=votes.count) if votes else None


PROBLEM = Problem("echo", "p", {"answer": "42"})


def run(script: dict[str, str], config: EngineConfig | None = None, **kw: Any) -> Any:
    backend = ScriptedBackend(script)
    sink = ListSink()
    engine = Engine(backend, EchoTask(), config or EngineConfig(), sink=sink, **kw)
    result = asyncio.run(engine.run(PROBLEM, episode_id="ep"))
    return result, sink.events


def test_no_forks() -> None:
    result, events = run({"organizer": "abcd<ANSWER>42</ANSWER>"})
    assert result.status == "completed"
    assert result.answer == "42"
    assert result.latency == len("abcd<ANSWER>42</ANSWER>")
    assert result.eta == 1.0
    assert result.rewards.accuracy == 1.0
    assert [e.kind for e in events] == ["started", "answer", "finished"]


def test_fork_then_immediate_join() -> None:
    org = "ab<FORK-1>q</FORK-1><JOIN-1>ok<ANSWER>42</ANSWER>"
    worker = "thinking<RETURN>7</RETURN>"
    result, events = run({"organizer": org, "1": worker})
    assert result.status == "completed", result.format_errors
    pre = len("ab<FORK-1>q</FORK-1>")
    jump = pre + len(worker)  # the join waits for the whole worker
    post = len("<JOIN-1>") + len("ok<ANSWER>42</ANSWER>")
    # the clock: pre tokens, fork, "<JOIN-1>" decoded (t_j = pre + 8); jump to max(t_j, pre + L)
    assert result.latency == max(pre + len("<JOIN-1>"), jump) + len("ok<ANSWER>42</ANSWER>")
    assert result.timeline == Timeline.of(
        Decode(pre), ForkStep(1, Timeline.of(Decode(len(worker)))), Decode(len("<JOIN-1>")), JoinStep(1),
        Decode(len("ok<ANSWER>42</ANSWER>")),
    )
    org_seg = result.segments[0]
    assert org_seg.agent == "organizer"
    injected = "7</JOIN-1>"
    assert org_seg.text == org.replace("<JOIN-1>", "<JOIN-1>" + injected)
    # injected ids are masked out; everything else was generated
    assert sum(org_seg.completion_mask) == len(org)
    assert len(org_seg.completion_ids) == len(org) + len(injected)
    worker_seg = result.segments[1]
    assert (worker_seg.agent, worker_seg.fork_id, worker_seg.parent, worker_seg.query) == ("1", 1, "organizer", "q")
    assert worker_seg.returned == "7"
    assert worker_seg.prompt == "W q\n"
    assert worker_seg.clock_start == pre and worker_seg.clock_end == pre + len(worker)
    kinds = [e.kind for e in events]
    assert kinds.index("fork") < kinds.index("join") < kinds.index("worker_result") < kinds.index("answer")
    assert post > 0


class RunsPastJoin(ScriptedBackend):
    """Like the scripted backend, but the token that completes ``<JOIN-i>`` carries ``extra`` more
    characters of the script (a real tokenizer's last token may run past the stop text)."""

    def __init__(self, script: dict[str, str], extra: int) -> None:
        super().__init__(script)
        self.extra = extra

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await super().generate(request)
        if result.finish is FinishReason.STOP and (result.matched or "").startswith("<JOIN-"):
            key = (request.session, request.tag)
            start = self._cursor[key]
            more = self.script[request.tag][start : start + self.extra]  # type: ignore[index]
            self._cursor[key] = start + len(more)
            text = result.text + more
            return GenerateResult(self.encode(text), text, result.finish, result.matched)
        return result


def test_an_answer_in_the_text_past_a_join_ends_the_episode() -> None:
    org = "ab<FORK-1>q</FORK-1><JOIN-1><ANSWER>42</ANSWER>never decoded"
    backend = RunsPastJoin({"organizer": org, "1": "<RETURN>7</RETURN>"}, extra=len("<ANSWER>42</ANSWER>"))
    sink = ListSink()
    result = asyncio.run(Engine(backend, EchoTask(), EngineConfig(), sink=sink).run(PROBLEM, episode_id="ep"))
    assert result.status == "completed", result.format_errors
    assert result.answer == "42" and result.rewards.accuracy == 1.0
    seg = result.segments[0]
    # the overflow token comes before the injected ids; injected ids are masked out
    assert seg.text == "ab<FORK-1>q</FORK-1><JOIN-1><ANSWER>42</ANSWER>7</JOIN-1>"
    assert sum(seg.completion_mask) == len("ab<FORK-1>q</FORK-1><JOIN-1><ANSWER>42</ANSWER>")
    assert backend.calls == 3  # organizer twice (up to </FORK-1>, up to <JOIN-1> and past it), worker once
    kinds = [e.kind for e in sink.events]
    assert kinds.index("join") < kinds.index("worker_result") < kinds.index("answer") < kinds.index("finished")


def test_text_past_a_join_is_parsed_with_stored_offsets() -> None:
    org = "<FORK-1>q</FORK-1><JOIN-1>\n<JOIN-1>"
    backend = RunsPastJoin({"organizer": org, "1": "<RETURN>7</RETURN>"}, extra=len("\n<JOIN-1>"))
    result = asyncio.run(Engine(backend, EchoTask(), EngineConfig()).run(PROBLEM, episode_id="ep"))
    assert result.status == "format_error"
    (err,) = result.format_errors
    assert err["kind"] == "join_repeated"
    assert err["offset"] == result.segments[0].text.index("\n<JOIN-1>") + 1


def test_two_overlapping_workers_capacity_three() -> None:
    org = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2>x<JOIN-2><JOIN-1><ANSWER>42</ANSWER>"
    result, _ = run({"organizer": org, "1": "w" * 100 + "<RETURN>1</RETURN>", "2": "<RETURN>2</RETURN>"},
                    EngineConfig(capacity=3))
    assert result.status == "completed", result.format_errors
    f1 = len("<FORK-1>a</FORK-1>")
    f2 = f1 + len("<FORK-2>b</FORK-2>")
    end1 = f1 + 100 + len("<RETURN>1</RETURN>")
    assert result.latency == end1 + len("<ANSWER>42</ANSWER>")
    org_tokens = len(org)
    busy = org_tokens + (100 + len("<RETURN>1</RETURN>")) + len("<RETURN>2</RETURN>")
    assert result.eta == pytest.approx(busy / result.latency)
    assert f2 < end1


def test_capacity_exceeded_is_a_format_error() -> None:
    org = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1><JOIN-2><ANSWER>42</ANSWER>"
    result, events = run({"organizer": org, "1": "<RETURN>1</RETURN>", "2": "<RETURN>2</RETURN>"})
    assert result.status == "format_error"
    assert result.format_errors[0]["kind"] == "capacity_exceeded"
    assert result.rewards.total == EngineConfig().rewards.format_error_reward
    assert "format_error" in [e.kind for e in events]


def test_sequential_mode_rejects_forks() -> None:
    result, _ = run({"organizer": "<FORK-1>a</FORK-1>"}, EngineConfig(mode=Mode.SEQUENTIAL))
    assert result.status == "format_error"
    assert result.format_errors[0]["kind"] == "fork_not_allowed"


def test_parallel_mode_votes_and_takes_the_longest_trace() -> None:
    script = {
        "trace-1": "<ANSWER>42</ANSWER>",
        "trace-2": "hmmmmmm<ANSWER>42</ANSWER>",
        "trace-3": "<ANSWER>41</ANSWER>",
    }
    result, _ = run(script, EngineConfig(mode=Mode.PARALLEL, parallel_k=3))
    assert result.answer == "42"
    assert result.latency == len(script["trace-2"])
    assert result.eta == pytest.approx(sum(map(len, script.values())) / len(script["trace-2"]))
    assert [s.agent for s in result.segments] == ["trace-1", "trace-2", "trace-3"]


def test_budget_exceeded() -> None:
    result, _ = run({"organizer": "x" * 50}, EngineConfig(organizer_budget=10))
    assert result.status == "format_error"
    assert result.format_errors[0]["kind"] == "budget_exceeded"
    assert result.latency == 10


def test_missing_answer_at_eos() -> None:
    result, _ = run({"organizer": "no answer here"})
    assert result.format_errors[0]["kind"] == "missing_answer"


class SlowEndpoint:
    async def run(self, task: WorkerTask) -> WorkerOutcome:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")


def test_worker_timeout_returns_error_text_and_the_episode_goes_on() -> None:
    org = "<FORK-1>a</FORK-1><JOIN-1><ANSWER>42</ANSWER>"
    result, _ = run({"organizer": org}, EngineConfig(worker_timeout_s=0.05, worker_budget=30),
                    endpoints={None: SlowEndpoint()})
    assert result.status == "completed"
    assert "timed out" in result.segments[0].text
    assert result.segments[1].error == "timeout"
    # a timed-out worker is charged its whole budget on the clock: the join waits until 18 + 30
    assert result.latency == len("<FORK-1>a</FORK-1>") + 30 + len("<ANSWER>42</ANSWER>")


class EchoTool:
    async def run(self, task: WorkerTask) -> WorkerOutcome:
        return WorkerOutcome(returned=f"tool saw {task.query}", timeline=Timeline.of(Decode(0)).to_json())


def test_endpoint_extension_routes_to_a_named_worker() -> None:
    org = "<FORK-1@python>6*7</FORK-1><JOIN-1><ANSWER>42</ANSWER>"
    result, _ = run({"organizer": org}, endpoints={"python": EchoTool()})
    assert "tool saw 6*7</JOIN-1>" in result.segments[0].text
    unknown, _ = run({"organizer": "<FORK-1@nope>x</FORK-1><JOIN-1><ANSWER>42</ANSWER>"})
    assert "no worker endpoint 'nope'" in unknown.segments[0].text


def test_recursive_worker_forks_its_own_worker() -> None:
    org = "<FORK-1>a</FORK-1><JOIN-1><ANSWER>42</ANSWER>"
    w1 = "<FORK-1>sub</FORK-1><JOIN-1><RETURN>done</RETURN>"
    result, _ = run({"organizer": org, "1": w1, "1.1": "<RETURN>s</RETURN>"}, EngineConfig(recursive=True))
    assert result.status == "completed", result.format_errors
    assert {s.agent for s in result.segments} == {"organizer", "1", "1.1"}
    assert next(s for s in result.segments if s.agent == "1.1").parent == "1"


class ConcurrencyProbe(CodePoints):
    """Records how many generate calls are in flight at once."""

    def __init__(self, inner: ScriptedBackend) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.in_flight = 0
        self.peak = 0

    @property
    def weight_version(self) -> str:
        return "probe"

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            result = await self.inner.generate(request)
            await asyncio.sleep(0.01)
            return result
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        return None


def test_worker_decodes_while_the_organizer_keeps_thinking() -> None:
    probe = ConcurrencyProbe(ScriptedBackend({
        "organizer": "<FORK-1>a</FORK-1>" + "think " * 5 + "<JOIN-1><ANSWER>42</ANSWER>",
        "1": "w<RETURN>r</RETURN>",
    }))
    engine = Engine(probe, EchoTask(), EngineConfig())
    result = asyncio.run(engine.run(PROBLEM))
    assert result.status == "completed"
    assert probe.peak == 2


def test_backend_failure_marks_the_episode_failed() -> None:
    class Broken(ScriptedBackend):
        async def generate(self, request: GenerateRequest) -> GenerateResult:
            raise ConnectionError("server down")

    engine = Engine(Broken({}), EchoTask())
    result = asyncio.run(engine.run(PROBLEM))
    assert result.status == "failed"
    assert "server down" in (result.error or "")


def test_abort_finish_is_reported() -> None:
    class Aborting(ScriptedBackend):
        async def generate(self, request: GenerateRequest) -> GenerateResult:
            return GenerateResult([], "", FinishReason.ABORT)

    result = asyncio.run(Engine(Aborting({}), EchoTask()).run(PROBLEM))
    assert result.status == "failed"
