"""The Fork/Join executor: runs whole episodes of a task over interfaces only.

:class:`Engine` runs one episode in one of three modes (DESIGN: AsyncThink, sequential, parallel) on a
:class:`~shared.backends.base.ModelBackend`, with worker endpoints (:class:`~shared.agents.WorkerEndpoint`)
and an event sink (:class:`~shared.agents.EventSink`). The agent loop itself (decode, parse, fork, join)
is :class:`~shared.agents.AgentRunner`; this module adds what belongs to a whole episode: the organizer's
prompt and limits, the k traces of parallel thinking and their vote, the critical-path latency ``T`` and
the concurrency ``η`` (pure functions of :mod:`shared.metrics` over the recorded timeline), the task's
score and the reward (:mod:`shared.rewards`). It does no I/O of its own, so the same code runs embedded
(in-process bus, SQLite) and distributed (Redis, Celery, Postgres). Wall-clock time is recorded beside
``T``, never instead of it.

Its settings are :class:`EngineConfig`: the episode settings declared once in
:class:`~shared.episode.EpisodeSettings`, plus the reward settings.

An interrupted episode can continue: ``run(..., resume_from=checkpoint)`` starts the organizer from its
checkpoint (a partial organizer segment handed to the engine's :class:`~shared.agents.Checkpointer`
by an earlier run) instead of from its prompt, and yields the result an uninterrupted run would have.
The ``started`` event then says how many organizer tokens came back (``resumed_tokens``). Parallel
thinking always runs from the start.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import Field

from shared.agents import (
    PRIORITY_ORGANIZER,
    AgentRun,
    AgentRunner,
    AgentSpec,
    Checkpointer,
    Emitter,
    EventSink,
    ListSink,
    NullSink,
    SegmentRecorder,
    WorkerEndpoint,
)
from shared.backends.base import ModelBackend, SamplingParams, version_label
from shared.episode import EpisodeSettings
from shared.messages import EpisodeStatus, EventKind, SegmentRecord
from shared.metrics import Schedule, Timeline, concurrency, parallel_metrics, schedule
from shared.protocol import Role
from shared.rewards import RewardConfig, RewardParts, total_reward
from shared.tasks.base import Mode, Problem, Score, Task
from shared.tasks.prompts import for_model

__all__ = [
    "Checkpointer",
    "Engine",
    "EngineConfig",
    "EpisodeResult",
    "EventSink",
    "ListSink",
    "NullSink",
    "SegmentRecorder",
    "WorkerEndpoint",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configuration
class EngineConfig(EpisodeSettings):
    """The episode settings (:class:`~shared.episode.EpisodeSettings`) plus the rewards to score with."""

    rewards: RewardConfig = Field(default_factory=RewardConfig, description="R_FE, λ and τ")

    @classmethod
    def of(cls, settings: EpisodeSettings, rewards: RewardConfig | None = None) -> EngineConfig:
        """An engine configuration for ``settings`` (the episode settings of a request or a config)."""
        fields = settings.episode_settings().model_dump()
        return cls(**fields, rewards=rewards or RewardConfig())

    def sampling(self, salt: int = 0) -> SamplingParams:
        seed = None if self.seed is None else self.seed * 1_000_003 + salt
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=seed)


# ----------------------------------------------------------------------------- results
@dataclass
class EpisodeResult:
    episode_id: str
    problem: Problem
    mode: Mode
    capacity: int
    model_id: str
    model_version: str
    status: EpisodeStatus
    answer: str | None
    score: Score | None
    rewards: RewardParts
    latency: int  # T, critical-path latency in decoded tokens
    eta: float  # thinking concurrency η
    wall_time_s: float
    format_errors: list[dict[str, object]]
    timeline: Timeline
    segments: list[SegmentRecord]
    error: str | None = None

    @property
    def forks(self) -> int:
        return sum(1 for s in self.segments if s.role == "worker")

    @property
    def eta_over_c(self) -> float:
        return self.eta / self.capacity if self.capacity else 0.0


# ----------------------------------------------------------------------------- episodes
class Engine:
    """Runs whole episodes of a task in one of the three modes."""

    def __init__(
        self,
        backend: ModelBackend,
        task: Task,
        config: EngineConfig | None = None,
        *,
        endpoints: Mapping[str | None, WorkerEndpoint] | None = None,
        sink: EventSink | None = None,
        checkpointer: Checkpointer | None = None,
        recorder: SegmentRecorder | None = None,
    ) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        # prompted as the model needs: the task's trained prompts, or a system message teaching the protocol
        self.task = for_model(task, backend, self.config.resolved_capacity(task.default_capacity))
        self.runner = AgentRunner(
            backend, self.task, endpoints=endpoints, sink=sink, checkpointer=checkpointer, recorder=recorder
        )

    @property
    def capacity(self) -> int:
        """c: the organizer plus its workers; for parallel thinking, the k traces that decode at once."""
        return self.config.resolved_capacity(self.task.default_capacity)

    async def run(
        self, problem: Problem, *, episode_id: str | None = None, resume_from: SegmentRecord | None = None
    ) -> EpisodeResult:
        """Run one episode. ``resume_from``: the organizer's checkpoint of an interrupted run of this
        episode (a partial organizer segment, see :class:`~shared.agents.Checkpointer`); the organizer
        continues from it instead of from its prompt (organizer modes only; a checkpoint that does not
        fit this episode's prompt is ignored with a warning and the episode runs from the start)."""
        episode_id = episode_id or uuid.uuid4().hex
        with self.runner.episode_scope(episode_id) as emit:
            return await self._run(problem, episode_id, emit, self._usable(problem, resume_from, episode_id))

    def _usable(self, problem: Problem, resume: SegmentRecord | None, episode_id: str) -> SegmentRecord | None:
        if resume is None or not resume.completion_ids:
            return None
        why = ""
        if self.config.mode is Mode.PARALLEL:
            why = "parallel thinking runs again from the start"
        elif resume.prompt_ids and resume.prompt_ids != self.backend.encode(
            self.task.organizer_prompt(problem, self.config.mode)
        ):
            why = "its prompt is not this episode's"
        elif len(resume.completion_ids) != len(resume.completion_mask):
            why = "its ids and mask differ in length"
        if why:
            log.warning("episode %s: not resuming from the checkpoint (%s)", episode_id, why)
            return None
        return resume

    async def _run(
        self, problem: Problem, episode_id: str, emit: Emitter, resume: SegmentRecord | None = None
    ) -> EpisodeResult:
        cfg = self.config
        if resume is None:
            await emit(
                EventKind.STARTED, task=self.task.name, problem_id=problem.id, mode=cfg.mode.value,
                capacity=self.capacity,
            )
        else:  # the organizer's generated tokens so far come back without being decoded again
            await emit(
                EventKind.STARTED, task=self.task.name, problem_id=problem.id, mode=cfg.mode.value,
                capacity=self.capacity, resumed_tokens=sum(resume.completion_mask),
            )
        t0 = time.monotonic()
        try:
            if cfg.mode is Mode.PARALLEL:
                result = await self._run_parallel(problem, episode_id, emit)
            else:
                result = await self._run_organizer(problem, episode_id, emit, resume)
        except Exception as exc:
            log.exception("episode %s failed", episode_id)
            await emit(EventKind.FAILED, error=str(exc))
            result = self._finish(problem, episode_id, None, [], Timeline(), [], 0, 0.0, error=str(exc))
        result.wall_time_s = time.monotonic() - t0
        await emit(
            EventKind.FINISHED,
            clock=result.latency,
            status=result.status,
            answer=result.answer,
            accuracy=result.rewards.accuracy,
            reward=result.rewards.total,
            latency=result.latency,
            eta=result.eta,
        )
        return result

    def _spec(self, episode_id: str, agent: str, prompt: str, *, salt: int = 0) -> AgentSpec:
        """The organizer's limits (or those of one parallel trace, which may not fork)."""
        cfg = self.config
        organizer = cfg.mode is not Mode.PARALLEL
        return AgentSpec(
            episode_id=episode_id,
            agent=agent,
            role=Role.ORGANIZER,
            prompt=prompt,
            budget=cfg.organizer_budget,
            capacity=self.capacity if organizer else 1,
            allow_fork=cfg.mode is Mode.ASYNCTHINK,
            sampling=cfg.sampling(salt),
            worker_budget=cfg.worker_budget,
            worker_timeout_s=cfg.worker_timeout_s,
            max_depth=cfg.max_depth if cfg.recursive else 1,
            stream_text=cfg.stream_text,
            priority=PRIORITY_ORGANIZER,
        )

    async def _run_organizer(
        self, problem: Problem, episode_id: str, emit: Emitter, resume: SegmentRecord | None = None
    ) -> EpisodeResult:
        prompt = self.task.organizer_prompt(problem, self.config.mode)
        run = await self.runner.run_agent(self._spec(episode_id, "organizer", prompt), emit, resume=resume)
        sched = schedule(run.timeline)
        spans = _agent_spans(sched)
        segments = [run.segment, *run.children]
        for seg in segments:
            seg.clock_start, seg.clock_end = spans.get(seg.agent, (0, 0))
        error = run.segment.error if run.segment.error and not run.errors else None
        return self._finish(
            problem, episode_id, run.final, run.errors, run.timeline, segments, sched.end,
            concurrency(run.timeline), error=error,
        )

    async def _run_parallel(self, problem: Problem, episode_id: str, emit: Emitter) -> EpisodeResult:
        cfg = self.config
        prompt = self.task.organizer_prompt(problem, Mode.PARALLEL)

        async def one(k: int) -> AgentRun:
            return await self.runner.run_agent(self._spec(episode_id, f"trace-{k + 1}", prompt, salt=k + 1), emit)

        runs = await asyncio.gather(*(one(k) for k in range(cfg.parallel_k)))
        lengths = [r.segment.generated_tokens for r in runs]
        for r in runs:
            r.segment.clock_start, r.segment.clock_end = 0, r.segment.generated_tokens
        answers = [r.final for r in runs if not r.errors]
        answer = self.task.aggregate(answers) if answers else None
        errors = [] if answer is not None else [e for r in runs for e in r.errors]
        latency, eta = parallel_metrics(lengths)
        longest = max(runs, key=lambda r: r.segment.generated_tokens)
        return self._finish(
            problem, episode_id, answer, errors, longest.timeline, [r.segment for r in runs], latency, eta
        )

    def _finish(
        self,
        problem: Problem,
        episode_id: str,
        answer: str | None,
        errors: list[dict[str, object]],
        timeline: Timeline,
        segments: list[SegmentRecord],
        latency: int,
        eta: float,
        *,
        error: str | None = None,
    ) -> EpisodeResult:
        cfg = self.config
        format_error = bool(errors)
        score = None if format_error or error else self.task.score(problem, answer)
        rewards = total_reward(
            accuracy=score.accuracy if score else 0.0,
            eta=eta,
            capacity=self.capacity,
            format_error=format_error,
            config=cfg.rewards,
        )
        if error:
            status = EpisodeStatus.FAILED
        elif format_error:
            status = EpisodeStatus.FORMAT_ERROR
        else:
            status = EpisodeStatus.COMPLETED
        return EpisodeResult(
            episode_id=episode_id,
            problem=problem,
            mode=cfg.mode,
            capacity=self.capacity,
            model_id=self.backend.model_id,
            # the weights that produced the episode's tokens (a+b when a swap happened during it)
            model_version=version_label(s.model_version for s in segments) or self.backend.weight_version,
            status=status,
            answer=answer,
            score=score,
            rewards=rewards,
            latency=latency,
            eta=eta,
            wall_time_s=0.0,
            format_errors=errors,
            timeline=timeline,
            segments=segments,
            error=error,
        )


def _agent_spans(sched: Schedule) -> dict[str, tuple[int, int]]:
    """When each agent started and finished on the organizer clock (a worker starts at its fork)."""
    return {span.agent: (span.start, span.end) for span in sched.spans}
