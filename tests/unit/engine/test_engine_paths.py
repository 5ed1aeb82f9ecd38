"""The engine's episode plumbing that the reward and scenario tests do not pin: the sampling each agent
gets, parallel thinking's traces (their clocks, the trace the timeline comes from, format errors when
no trace answers), the spans of workers that never decoded, and the configuration helpers."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.backends.base import GenerateRequest, GenerateResult, SamplingParams
from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine, EngineConfig, EpisodeResult
from shared.episode import EpisodeSettings
from shared.messages import EpisodeStatus, WorkerOutcome, WorkerTask
from shared.metrics import Decode, Timeline
from shared.rewards import RewardConfig
from shared.tasks import get_task
from shared.tasks.base import Mode

PAYLOAD = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 2}
ANSWER = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"  # 31 tokens


class Recording(ScriptedBackend):
    """The scripted backend, keeping every request."""

    def __init__(self, script: dict[str, str]) -> None:
        super().__init__(script)
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.requests.append(request)
        return await super().generate(request)


def run(backend: Any, **settings: Any) -> EpisodeResult:
    task = get_task("countdown")
    problem = task.problem_from_payload(PAYLOAD, "p")
    endpoints = settings.pop("endpoints", None)
    engine = Engine(backend, task, EngineConfig(worker_budget=64, **settings), endpoints=endpoints)
    return asyncio.run(engine.run(problem, episode_id="ep"))


def test_sampling_seed_is_derived_from_the_episode_seed_and_a_salt() -> None:
    config = EngineConfig(temperature=0.7, top_p=0.9, seed=3)
    assert config.sampling(5) == SamplingParams(temperature=0.7, top_p=0.9, seed=3 * 1_000_003 + 5)
    assert config.sampling() == SamplingParams(temperature=0.7, top_p=0.9, seed=3_000_009)
    assert EngineConfig(temperature=0.7).sampling(5) == SamplingParams(temperature=0.7, top_p=1.0, seed=None)


def test_engine_config_of_episode_settings() -> None:
    settings = EpisodeSettings(mode=Mode.SEQUENTIAL, capacity=3, worker_budget=77, seed=9)
    rewards = RewardConfig(format_error_reward=-0.3)
    config = EngineConfig.of(settings, rewards)
    assert (config.mode, config.capacity, config.worker_budget, config.seed) == (Mode.SEQUENTIAL, 3, 77, 9)
    assert config.rewards == rewards
    assert EngineConfig.of(settings).rewards == RewardConfig()
    assert EngineConfig.of(settings).episode_settings() == settings


def test_parallel_traces_are_salted_one_to_k_and_share_the_episode() -> None:
    backend = Recording({"trace-1": ANSWER, "trace-2": "ab" + ANSWER})
    result = run(backend, mode=Mode.PARALLEL, parallel_k=2, seed=4, temperature=0.5)
    assert result.episode_id == "ep" and result.status is EpisodeStatus.COMPLETED
    by_seed = sorted(r.sampling.seed for r in backend.requests)
    assert by_seed == [4 * 1_000_003 + 1, 4 * 1_000_003 + 2]  # trace k: salt k
    assert {r.session for r in backend.requests} == {"ep"}
    assert {r.sampling.temperature for r in backend.requests} == {0.5}
    # each trace decodes from clock 0; the timeline is the longest trace's (33 tokens)
    assert [(s.agent, s.clock_start, s.clock_end) for s in result.segments] == [
        ("trace-1", 0, 31),
        ("trace-2", 0, 33),
    ]
    assert result.timeline == Timeline.of(Decode(33))
    assert result.format_errors == []


def test_organizer_sampling_uses_salt_zero() -> None:
    backend = Recording({"organizer": ANSWER})
    result = run(backend, mode=Mode.SEQUENTIAL, seed=4, temperature=0.5, top_p=0.8)
    assert result.episode_id == "ep"
    assert [r.sampling for r in backend.requests] == [
        SamplingParams(temperature=0.5, top_p=0.8, seed=4_000_012)
    ]


def test_parallel_thinking_with_no_answer_is_a_format_error() -> None:
    # neither trace closes an answer: no vote; the traces' format errors are the episode's
    result = run(
        ScriptedBackend({"trace-1": "abc", "trace-2": "<ANSWER>1+2"}), mode=Mode.PARALLEL, parallel_k=2
    )
    assert result.status is EpisodeStatus.FORMAT_ERROR and result.answer is None
    # trace 1: no answer; trace 2: an answer left open, and no closed answer
    assert [(e["agent"], e["kind"]) for e in result.format_errors] == [
        ("trace-1", "missing_answer"), ("trace-2", "unclosed_tag"), ("trace-2", "missing_answer"),
    ]  # fmt: skip
    assert result.rewards.total == -1.0


def test_parallel_thinking_ignores_a_broken_trace_when_another_answers() -> None:
    result = run(ScriptedBackend({"trace-1": "abc", "trace-2": ANSWER}), mode=Mode.PARALLEL, parallel_k=2)
    assert result.status is EpisodeStatus.COMPLETED and result.format_errors == []
    assert result.answer == "1+2+3+4; 2*3+4"


class Raising:
    async def run(self, task: WorkerTask) -> WorkerOutcome:
        raise RuntimeError("broken tool")


def test_a_worker_that_raises_has_an_empty_span_and_the_episode_goes_on() -> None:
    org = "<FORK-1>q</FORK-1><JOIN-1>" + ANSWER  # 18 + 8 + 31 tokens
    result = run(ScriptedBackend({"organizer": org}), endpoints={None: Raising()}, capacity=2)
    assert result.episode_id == "ep" and result.status is EpisodeStatus.COMPLETED
    organizer, worker = result.segments
    assert (organizer.clock_start, organizer.clock_end) == (0, 57)
    assert worker.error == "failed: broken tool"
    assert (worker.clock_start, worker.clock_end) == (18, 18)  # forked at 18, decoded nothing
    assert (result.latency, result.eta) == (57, 1.0)


def test_a_protocol_prompted_model_is_told_its_capacity() -> None:
    from shared.tasks.prompts import PromptStyle

    class Protocol(Recording):
        prompt_style = PromptStyle.PROTOCOL

    for capacity, workers in [(4, 3), (None, 1)]:  # c - 1 workers; countdown's default c = 2
        backend = Protocol({"organizer": ANSWER})
        run(backend, capacity=capacity)
        prompt = backend.decode(backend.requests[0].input_ids)
        assert f"At most {workers} worker(s) may be running" in prompt


class Segments:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str]] = []

    def record(self, episode_id: str, segment: Any) -> None:
        self.recorded.append((episode_id, segment.agent))


def test_the_recorder_gets_each_worker_segment_as_it_completes() -> None:
    recorder = Segments()
    task = get_task("countdown")
    backend = ScriptedBackend({"organizer": "<FORK-1>q</FORK-1><JOIN-1>" + ANSWER, "1": "<RETURN>7</RETURN>"})
    engine = Engine(backend, task, EngineConfig(), recorder=recorder)
    asyncio.run(engine.run(task.problem_from_payload(PAYLOAD, "p"), episode_id="ep"))
    assert recorder.recorded == [("ep", "1")]


def events_of(script: dict[str, str], resume: Any = None, **settings: Any) -> list[Any]:
    from shared.engine import ListSink

    sink = ListSink()
    task = get_task("countdown")
    backend = ScriptedBackend(script, resumable=resume is not None)
    engine = Engine(backend, task, EngineConfig(**settings), sink=sink)
    asyncio.run(engine.run(task.problem_from_payload(PAYLOAD, "p"), episode_id="ep", resume_from=resume))
    return sink.events


def test_started_and_finished_events_say_what_ran() -> None:
    events = events_of({"organizer": ANSWER}, mode=Mode.SEQUENTIAL, capacity=3)
    started, finished = events[0], events[-1]
    assert started.data == {"task": "countdown", "problem_id": "p", "mode": "sequential", "capacity": 3}
    # c = 3, η = 1: R_η = (1/3)/0.75 = 4/9; R = 1 + 0.2 · 4/9
    assert finished.clock == 31
    assert finished.data == {
        "status": "completed", "answer": "1+2+3+4; 2*3+4", "accuracy": 1.0,
        "reward": 1.0 + 0.2 * 4 / 9, "latency": 31, "eta": 1.0,
    }  # fmt: skip


def test_a_resumed_organizer_says_how_many_tokens_came_back() -> None:
    from shared.messages import SegmentRecord

    ids = [ord(c) for c in ANSWER[:10]]
    checkpoint = SegmentRecord(
        agent="organizer", role="organizer", completion_ids=ids, completion_mask=[1] * 10
    )
    (started, *_) = events_of({"organizer": ANSWER}, resume=checkpoint, mode=Mode.SEQUENTIAL)
    assert started.data == {
        "task": "countdown", "problem_id": "p", "mode": "sequential", "capacity": 2, "resumed_tokens": 10,
    }  # fmt: skip


def test_an_unusable_checkpoint_is_ignored_with_the_reason(caplog: Any) -> None:
    import logging

    from shared.messages import SegmentRecord

    caplog.set_level(logging.WARNING, "shared.engine")
    ids = [ord(c) for c in ANSWER[:10]]
    cases = [
        ({"mode": Mode.PARALLEL, "parallel_k": 1}, {}, "parallel thinking runs again from the start"),
        ({"mode": Mode.SEQUENTIAL}, {"prompt_ids": [1, 2, 3]}, "its prompt is not this episode's"),
        ({"mode": Mode.SEQUENTIAL}, {"completion_mask": [1] * 9}, "its ids and mask differ in length"),
    ]
    for settings, change, why in cases:
        caplog.clear()
        fields: dict[str, Any] = {"completion_ids": ids, "completion_mask": [1] * 10} | change
        checkpoint = SegmentRecord(agent="organizer", role="organizer", **fields)
        script = {"organizer": ANSWER, "trace-1": ANSWER}
        (started, *_) = events_of(script, resume=checkpoint, **settings)
        assert "resumed_tokens" not in started.data
        assert [r.getMessage() for r in caplog.records] == [
            f"episode ep: not resuming from the checkpoint ({why})"
        ]


def test_the_organizers_limits_by_mode() -> None:
    from shared.agents import PRIORITY_ORGANIZER, AgentSpec
    from shared.protocol import Role

    task = get_task("countdown")
    common = dict(organizer_budget=100, worker_budget=30, worker_timeout_s=7.0, seed=1, stream_text=True)

    def spec(**settings: Any) -> AgentSpec:
        engine = Engine(ScriptedBackend({}), task, EngineConfig(**common, **settings))
        return engine._spec("ep", "organizer", "P", salt=2)

    expected = AgentSpec(
        episode_id="ep", agent="organizer", role=Role.ORGANIZER, prompt="P", budget=100, capacity=3,
        allow_fork=True, sampling=EngineConfig(seed=1).sampling(2), worker_budget=30, worker_timeout_s=7.0,
        max_depth=1, stream_text=True, priority=PRIORITY_ORGANIZER,
    )  # fmt: skip
    assert spec(capacity=3) == expected
    assert spec(capacity=3, recursive=True, max_depth=3).max_depth == 3  # recursion: its own depth limit
    assert spec(capacity=3, max_depth=3).max_depth == 1  # without recursion only the organizer forks
    assert spec(capacity=3, mode=Mode.SEQUENTIAL).allow_fork is False
    parallel = spec(mode=Mode.PARALLEL, parallel_k=4)
    assert (parallel.capacity, parallel.allow_fork) == (1, False)  # a trace is alone and may not fork


class Broken(ScriptedBackend):
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        raise RuntimeError("the model server went away")


def test_a_failed_episode_reports_the_error(caplog: Any) -> None:
    import logging

    from shared.engine import ListSink

    caplog.set_level(logging.ERROR, "shared.engine")
    for mode in (Mode.ASYNCTHINK, Mode.PARALLEL):
        caplog.clear()
        sink = ListSink()
        task = get_task("countdown")
        problem = task.problem_from_payload(PAYLOAD, "p")
        engine = Engine(Broken({}), task, EngineConfig(mode=mode, parallel_k=2), sink=sink)
        result = asyncio.run(engine.run(problem, episode_id="ep"))
        assert (result.status, result.error, result.episode_id) == (
            EpisodeStatus.FAILED,
            "the model server went away",
            "ep",
        )
        assert result.problem == problem and result.format_errors == [] and result.timeline == Timeline()
        assert result.answer is None and result.score is None
        assert 0.0 <= result.wall_time_s < 60.0
        kinds = [e.kind for e in sink.events]
        assert kinds == ["started", "failed", "finished"]
        assert sink.events[1].data == {"error": "the model server went away"}
        assert sink.events[2].data["status"] == "failed"
        assert [r.getMessage() for r in caplog.records] == ["episode ep failed"]


class Swapping(ScriptedBackend):
    """The scripted backend whose weights change to ``v2`` after its first call (a hot swap mid-episode)."""

    def __init__(self, script: dict[str, str]) -> None:
        super().__init__(script, model_id="m-1")
        self.version = "v1"

    @property
    def weight_version(self) -> str:
        return self.version

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await super().generate(request)
        self.version = "v2"
        return result


def test_the_result_names_what_ran_and_the_weights_that_decoded_it() -> None:
    task = get_task("countdown")
    problem = task.problem_from_payload(PAYLOAD, "p")
    backend = Swapping({"organizer": ANSWER})
    result = asyncio.run(
        Engine(backend, task, EngineConfig(mode=Mode.SEQUENTIAL)).run(problem, episode_id="ep")
    )
    assert (result.episode_id, result.problem, result.mode, result.model_id) == (
        "ep",
        problem,
        Mode.SEQUENTIAL,
        "m-1",
    )
    # the segments' weights (v1), not the backend's now (v2)
    assert [s.model_version for s in result.segments] == ["v1"]
    assert result.model_version == "v1" and backend.weight_version == "v2"
    # no segment (the backend failed at once): the backend's version
    broken = asyncio.run(Engine(Broken({}), task, EngineConfig()).run(problem, episode_id="ep"))
    assert broken.model_version == "scripted"
