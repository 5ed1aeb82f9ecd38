"""The Fork/Join executor: runs one episode over interfaces only.

The engine talks to a :class:`~shared.backends.base.ModelBackend` (the organizer's model), to worker
endpoints (:class:`WorkerEndpoint`: the model itself by default, a Celery dispatcher in the
distributed setup, tools or humans by ``<FORK-i@endpoint>``) and to an :class:`EventSink`. It does no
I/O of its own, so the same code runs embedded (in-process bus, SQLite) and distributed (Redis,
Celery, Postgres).

How an agent runs (organizer, or a worker that may itself fork):

1. decode from its prefix until the backend stops at a protocol tag (``</FORK-i>``, ``<JOIN-i>``,
   ``</ANSWER>`` or ``</RETURN>``), EOS or the token budget;
2. feed the text to the incremental :class:`~shared.protocol.ProtocolParser`;
3. a Fork starts the worker at once (an asyncio task) and decoding resumes from the same prefix;
   a Join blocks only this agent until the worker is done, appends the worker's takeaway and
   ``</JOIN-i>`` as injected ids (masked out of training), and resumes; an Answer/Return ends it;
4. the first format error ends the episode (it gets the format-error reward whatever follows).

Every decoded token is recorded as ids with a mask (generated = 1, injected = 0) and as a
:class:`~shared.metrics.Timeline`, from which ``T`` and ``η`` are computed by the pure functions of
:mod:`shared.metrics`. Wall-clock time is recorded beside them.

Limits: a worker that times out returns an error text and is charged its whole token budget on the
clock (its real length is unknown); workers still running when the organizer answers are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.backends.base import FinishReason, GenerateRequest, ModelBackend, SamplingParams
from shared.messages import EpisodeEvent, SegmentRecord, WorkerOutcome, WorkerTask
from shared.metrics import (
    Decode,
    ForkStep,
    JoinStep,
    Schedule,
    Step,
    Timeline,
    concurrency,
    parallel_metrics,
    schedule,
)
from shared.protocol import (
    ORGANIZER_STOP_REGEX,
    RECURSIVE_WORKER_STOP_REGEX,
    WORKER_STOP_REGEX,
    Answer,
    Fork,
    FormatError,
    Join,
    ProtocolParser,
    Return,
    Role,
    join_result,
)
from shared.rewards import RewardConfig, RewardParts, total_reward
from shared.tasks.base import Mode, Problem, Score, Task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- interfaces
class WorkerEndpoint(Protocol):
    """Runs one forked sub-query and returns its takeaway (model, tool, human, remote queue...)."""

    async def run(self, task: WorkerTask) -> WorkerOutcome: ...


class EventSink(Protocol):
    async def emit(self, event: EpisodeEvent) -> None: ...


class NullSink:
    async def emit(self, event: EpisodeEvent) -> None:
        return None


class ListSink:
    """Keeps every event in memory (tests, the CLI's live trace)."""

    def __init__(self) -> None:
        self.events: list[EpisodeEvent] = []

    async def emit(self, event: EpisodeEvent) -> None:
        self.events.append(event)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class EngineConfig:
    mode: Mode = Mode.ASYNCTHINK  # asyncthink | sequential | parallel
    capacity: int | None = None  # agent pool size c; None = the task's default (2 countdown/sudoku, 4 math)
    organizer_budget: int = 1024  # max tokens the organizer (or each parallel trace) may decode
    worker_budget: int = 512  # max tokens each worker may decode
    worker_timeout_s: float = 300.0  # a worker slower than this returns an error text; the episode goes on
    parallel_k: int = 4  # traces for parallel thinking
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling seed; each agent derives its own from it
    recursive: bool = False  # extension: workers may fork their own workers
    max_depth: int = 2  # recursion depth limit when ``recursive``
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 (the organizer counts), got {self.capacity}")
        for name in ("organizer_budget", "worker_budget", "parallel_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")

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
    status: str  # "completed" | "format_error" | "failed"
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


@dataclass
class _AgentRun:
    segment: SegmentRecord
    timeline: Timeline
    final: str | None  # the Answer or Return text
    errors: list[dict[str, object]]
    children: list[SegmentRecord]


class _Emitter:
    def __init__(self, episode_id: str, sink: EventSink) -> None:
        self.episode_id = episode_id
        self.sink = sink
        self.seq = 0

    async def __call__(self, kind: str, agent: str = "organizer", clock: int = 0, **data: object) -> None:
        self.seq += 1
        event = EpisodeEvent(
            episode_id=self.episode_id, seq=self.seq, kind=kind, agent=agent, clock=clock, data=data
        )
        try:
            await self.sink.emit(event)
        except Exception:  # an observer must never break an episode
            log.exception("event sink failed on %s", kind)


def _error_dict(err: FormatError, agent: str) -> dict[str, object]:
    return {"kind": err.kind.value, "offset": err.offset, "message": err.message, "agent": agent}


# ----------------------------------------------------------------------------- the agent loop
class AgentRunner:
    """Runs one agent (organizer or worker) to its Answer/Return, forking and joining on the way."""

    def __init__(
        self,
        backend: ModelBackend,
        task: Task,
        *,
        endpoints: Mapping[str | None, WorkerEndpoint] | None = None,
        sink: EventSink | None = None,
    ) -> None:
        self.backend = backend
        self.task = task
        self.endpoints: dict[str | None, WorkerEndpoint] = dict(endpoints or {})
        self.endpoints.setdefault(None, ModelWorker(self))
        self.sink: EventSink = sink or NullSink()
        self._emitters: dict[str, _Emitter] = {}

    def emitter(self, episode_id: str) -> _Emitter:
        """The episode's event emitter, shared by its organizer and in-process workers (one ``seq``)."""
        if episode_id not in self._emitters:
            self._emitters[episode_id] = _Emitter(episode_id, self.sink)
        return self._emitters[episode_id]

    def forget(self, episode_id: str) -> None:
        self._emitters.pop(episode_id, None)

    async def run_agent(
        self,
        *,
        episode_id: str,
        agent: str,
        role: Role,
        prompt: str,
        budget: int,
        capacity: int,
        allow_fork: bool,
        sampling: SamplingParams,
        worker_budget: int,
        worker_timeout_s: float,
        depth: int,
        emit: _Emitter,
        max_depth: int = 2,
    ) -> _AgentRun:
        prompt_ids = self.backend.encode(prompt)
        ids: list[int] = []
        mask: list[int] = []
        steps: list[Step | tuple[str, int]] = []  # ("fork", id) placeholders resolved at the end
        parser = ProtocolParser(role, capacity=capacity, allow_fork=allow_fork)
        children: dict[int, asyncio.Task[WorkerOutcome]] = {}
        outcomes: dict[int, WorkerOutcome] = {}
        child_agents: dict[int, str] = {}
        if role is Role.ORGANIZER:
            stop = ORGANIZER_STOP_REGEX
        else:
            stop = RECURSIVE_WORKER_STOP_REGEX if allow_fork else WORKER_STOP_REGEX
        wall_start = time.time()
        generated = 0
        clock = 0  # this agent's own clock (for live events only; T comes from the timeline)
        version = self.backend.weight_version
        error: str | None = None
        try:
            while not parser.done:
                remaining = budget - generated
                if remaining <= 0:
                    parser.close(budget_exhausted=True)
                    break
                result = await self.backend.generate(
                    GenerateRequest(
                        input_ids=prompt_ids + ids,
                        max_new_tokens=remaining,
                        stop_regex=stop,
                        sampling=sampling,
                        session=episode_id,
                        tag=agent,
                    )
                )
                if result.weight_version:
                    version = result.weight_version
                n = len(result.output_ids)
                ids += result.output_ids
                mask += [1] * n
                generated += n
                clock += n
                if n:
                    steps.append(Decode(n))
                pending = parser.feed(result.text)  # a Join's inject() may complete more events: appended
                while pending:
                    ev = pending.pop(0)
                    if isinstance(ev, FormatError):
                        await emit("format_error", agent, clock, error=ev.kind.value, offset=ev.offset, message=ev.message)
                    elif isinstance(ev, Fork):
                        name = str(ev.fork_id) if role is Role.ORGANIZER else f"{agent}.{ev.fork_id}"
                        child_agents[ev.fork_id] = name
                        worker_task = WorkerTask(
                            episode_id=episode_id,
                            agent=name,
                            fork_id=ev.fork_id,
                            parent=agent,
                            query=ev.query,
                            endpoint=ev.endpoint,
                            task=self.task.name,
                            budget=worker_budget,
                            depth=depth + 1,
                            temperature=sampling.temperature,
                            top_p=sampling.top_p,
                            seed=None if sampling.seed is None else sampling.seed + 7919 * ev.fork_id,
                            capacity=capacity,
                            allow_fork=allow_fork and depth + 1 < max_depth,
                        )
                        children[ev.fork_id] = asyncio.create_task(
                            self._run_worker(worker_task, worker_timeout_s, emit, clock)
                        )
                        steps.append(("fork", ev.fork_id))
                        await emit("fork", agent, clock, fork_id=ev.fork_id, query=ev.query, endpoint=ev.endpoint)
                    elif isinstance(ev, Join):
                        await emit("join", agent, clock, fork_id=ev.fork_id)
                        outcome = await children[ev.fork_id]
                        outcomes[ev.fork_id] = outcome
                        steps.append(JoinStep(ev.fork_id))
                        injected = join_result(ev.fork_id, outcome.returned)
                        inj_ids = self.backend.encode(injected)
                        ids += inj_ids
                        mask += [0] * len(inj_ids)
                        pending += parser.inject(injected)  # parses any text the model wrote past <JOIN-i>
                        await emit("worker_result", agent, clock, fork_id=ev.fork_id, returned=outcome.returned)
                    elif isinstance(ev, Answer | Return):
                        kind = "answer" if isinstance(ev, Answer) else "return"
                        await emit(kind, agent, clock, text=ev.text)
                if parser.errors:
                    break
                if not parser.done and result.finish is FinishReason.ABORT:
                    error = "backend aborted the request"
                    break
                if not parser.done and result.finish is not FinishReason.STOP:
                    parser.close(budget_exhausted=result.finish is FinishReason.LENGTH)
                    break
            if not parser.done and not parser.errors and error is None:
                parser.close()
        finally:
            # Workers never joined are not waited for: cancel the running ones.
            for fid, t in children.items():
                if fid in outcomes:
                    continue
                if t.done() and not t.cancelled() and t.exception() is None:
                    outcomes[fid] = t.result()
                else:
                    t.cancel()
        errors = [_error_dict(e, agent) for e in parser.errors]
        resolved: list[Step] = []
        child_segments: list[SegmentRecord] = []
        for s in steps:
            if isinstance(s, tuple):
                fid = s[1]
                done = outcomes.get(fid)
                child_tl = Timeline.from_json(done.timeline) if done else Timeline()
                resolved.append(ForkStep(fid, child_tl))
                if done is not None:
                    child_segments.extend(done.segments)
                    errors.extend(done.format_errors)
                else:
                    child_segments.append(
                        SegmentRecord(
                            agent=child_agents[fid], role="worker", fork_id=fid, parent=agent, error="cancelled"
                        )
                    )
            else:
                resolved.append(s)
        text = self.backend.decode(ids)
        final = parser.final.text if parser.final is not None else None
        segment = SegmentRecord(
            agent=agent,
            role=role.value,
            prompt=prompt,
            prompt_ids=prompt_ids,
            completion_ids=ids,
            completion_mask=mask,
            text=text,
            returned=final if role is Role.WORKER else None,
            generated_tokens=generated,
            wall_start=wall_start,
            wall_end=time.time(),
            error=error or (errors[0]["kind"] if errors else None),  # type: ignore[arg-type]
            model_version=version,
        )
        return _AgentRun(segment, Timeline(tuple(resolved)), final, errors, child_segments)

    async def _run_worker(
        self, task: WorkerTask, timeout_s: float, emit: _Emitter, clock: int
    ) -> WorkerOutcome:
        endpoint = self.endpoints.get(task.endpoint)
        if endpoint is None:
            known = ", ".join(sorted(str(k) for k in self.endpoints if k)) or "none"
            outcome = WorkerOutcome(
                returned=f"[no worker endpoint '{task.endpoint}'; known: {known}]",
                timeline=[],
                segments=[_failed_segment(task, "unknown_endpoint")],
                error="unknown_endpoint",
            )
        else:
            try:
                outcome = await asyncio.wait_for(endpoint.run(task), timeout_s)
            except TimeoutError:
                outcome = WorkerOutcome(
                    returned=f"[worker {task.fork_id} timed out after {timeout_s:g}s]",
                    timeline=Timeline.of(Decode(task.budget)).to_json(),
                    segments=[_failed_segment(task, "timeout")],
                    error="timeout",
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken worker must not take the episode down
                log.exception("worker %s of episode %s failed", task.agent, task.episode_id)
                outcome = WorkerOutcome(
                    returned=f"[worker {task.fork_id} failed: {exc}]",
                    timeline=[],
                    segments=[_failed_segment(task, f"failed: {exc}")],
                    error=f"failed: {exc}",
                )
        for seg in outcome.segments:
            await emit("segment", seg.agent, clock, segment=seg.model_dump(exclude={"prompt_ids", "completion_ids", "completion_mask"}))
        return outcome


def worker_segment(task: WorkerTask, **fields: Any) -> SegmentRecord:
    """A worker's segment with the identity fields of its task (agent, fork id, parent, endpoint, query)
    filled in; ``fields`` adds the rest. Wall start and end default to now."""
    now = time.time()
    fields.setdefault("wall_start", now)
    fields.setdefault("wall_end", now)
    return SegmentRecord(
        agent=task.agent,
        role="worker",
        fork_id=task.fork_id,
        parent=task.parent,
        endpoint=task.endpoint,
        query=task.query,
        **fields,
    )


def _failed_segment(task: WorkerTask, error: str) -> SegmentRecord:
    return worker_segment(task, error=error)


class ModelWorker:
    """The default worker endpoint: the same model thinks about the sub-query alone and returns."""

    def __init__(self, runner: AgentRunner) -> None:
        self.runner = runner

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        owns_emitter = task.episode_id not in self.runner._emitters  # a remote worker process: no organizer here
        emit = self.runner.emitter(task.episode_id)
        try:
            run = await self._run(task, emit)
        finally:
            if owns_emitter:
                self.runner.forget(task.episode_id)
        seg = run.segment.model_copy(
            update={"fork_id": task.fork_id, "parent": task.parent, "endpoint": task.endpoint, "query": task.query}
        )
        returned = run.final if run.final is not None else seg.text
        return WorkerOutcome(
            returned=returned,
            timeline=run.timeline.to_json(),
            segments=[seg, *run.children],
            format_errors=run.errors,
        )

    async def _run(self, task: WorkerTask, emit: _Emitter) -> _AgentRun:
        return await self.runner.run_agent(
            episode_id=task.episode_id,
            agent=task.agent,
            role=Role.WORKER,
            prompt=self.runner.task.worker_prompt(task.query),
            budget=task.budget,
            capacity=task.capacity,
            allow_fork=task.allow_fork,
            sampling=SamplingParams(temperature=task.temperature, top_p=task.top_p, seed=task.seed),
            worker_budget=task.budget,
            worker_timeout_s=3600.0,
            depth=task.depth,
            emit=emit,
        )


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
    ) -> None:
        self.backend = backend
        self.task = task
        self.config = config or EngineConfig()
        self.runner = AgentRunner(backend, task, endpoints=endpoints, sink=sink)

    @property
    def capacity(self) -> int:
        """c: the organizer plus its workers; for parallel thinking, the k traces that decode at once."""
        if self.config.mode is Mode.PARALLEL:
            return self.config.parallel_k
        return self.config.capacity or self.task.default_capacity

    async def run(self, problem: Problem, *, episode_id: str | None = None) -> EpisodeResult:
        episode_id = episode_id or uuid.uuid4().hex
        emit = self.runner.emitter(episode_id)
        cfg = self.config
        await emit("started", task=self.task.name, problem_id=problem.id, mode=cfg.mode.value, capacity=self.capacity)
        t0 = time.monotonic()
        try:
            if cfg.mode is Mode.PARALLEL:
                result = await self._run_parallel(problem, episode_id, emit)
            else:
                result = await self._run_organizer(problem, episode_id, emit)
        except Exception as exc:
            log.exception("episode %s failed", episode_id)
            await emit("failed", error=str(exc))
            result = self._finish(problem, episode_id, None, [], Timeline(), [], 0, 0.0, error=str(exc))
        result.wall_time_s = time.monotonic() - t0
        await emit(
            "finished",
            clock=result.latency,
            status=result.status,
            answer=result.answer,
            accuracy=result.rewards.accuracy,
            reward=result.rewards.total,
            latency=result.latency,
            eta=result.eta,
        )
        self.runner.forget(episode_id)
        return result

    async def _run_organizer(self, problem: Problem, episode_id: str, emit: _Emitter) -> EpisodeResult:
        cfg = self.config
        run = await self.runner.run_agent(
            episode_id=episode_id,
            agent="organizer",
            role=Role.ORGANIZER,
            prompt=self.task.organizer_prompt(problem, cfg.mode),
            budget=cfg.organizer_budget,
            capacity=self.capacity,
            allow_fork=cfg.mode is Mode.ASYNCTHINK,
            sampling=cfg.sampling(),
            worker_budget=cfg.worker_budget,
            worker_timeout_s=cfg.worker_timeout_s,
            depth=0,
            emit=emit,
            max_depth=cfg.max_depth if cfg.recursive else 1,
        )
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

    async def _run_parallel(self, problem: Problem, episode_id: str, emit: _Emitter) -> EpisodeResult:
        cfg = self.config
        prompt = self.task.organizer_prompt(problem, Mode.PARALLEL)

        async def one(k: int) -> _AgentRun:
            return await self.runner.run_agent(
                episode_id=episode_id,
                agent=f"trace-{k + 1}",
                role=Role.ORGANIZER,
                prompt=prompt,
                budget=cfg.organizer_budget,
                capacity=1,
                allow_fork=False,
                sampling=cfg.sampling(salt=k + 1),
                worker_budget=cfg.worker_budget,
                worker_timeout_s=cfg.worker_timeout_s,
                depth=0,
                emit=emit,
            )

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
        status = "failed" if error else ("format_error" if format_error else "completed")
        return EpisodeResult(
            episode_id=episode_id,
            problem=problem,
            mode=cfg.mode,
            capacity=self.capacity,
            model_id=self.backend.model_id,
            model_version=self.backend.weight_version,
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
