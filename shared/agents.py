"""One agent's run: decode, parse, fork, join, answer — over interfaces only.

An agent is the organizer, one trace of parallel thinking, or a worker (which may itself fork when
recursive organization is on). :class:`AgentRunner` runs one from its :class:`AgentSpec`:

1. decode from the agent's prefix until the backend stops at a protocol tag (``</FORK-i>``, ``<JOIN-i>``,
   ``</ANSWER>`` or ``</RETURN>``), EOS or the token budget;
2. feed the text to the incremental :class:`~shared.protocol.ProtocolParser` and handle each event it
   completes, one handler per kind: a Fork starts the worker at once (an asyncio task) and decoding
   resumes from the same prefix; a Join blocks only this agent until the worker is done, appends the
   worker's takeaway and ``</JOIN-i>`` as injected ids (masked out of training) and parses whatever
   generated text the backend returned past the join; an Answer/Return ends the agent;
3. the first format error ends the agent (the episode then gets the format-error reward).

Every decoded token is recorded as ids with a mask (generated = 1, injected = 0) and as a
:class:`~shared.metrics.Timeline` of decode, fork and join steps, from which the engine computes ``T``
and ``η``. The runner does no I/O of its own: the model is a
:class:`~shared.backends.base.ModelBackend`, workers are :class:`WorkerEndpoint` s (the model itself by
default, a Celery dispatcher in the distributed setup, tools by ``<FORK-i@endpoint>``), events go to an
:class:`EventSink`.

Aborted calls. A backend may end a call with finish ABORT (SGLang's ``abort`` pause for a weight swap,
a server that cancelled the request): the partial output is dropped (never parsed, never recorded) and
the call is sent again from the same prefix, up to ``abort_retries`` times. When the retries run out the
agent ends with an error; a worker's outcome then carries that error and an error text for its join, so
a cut-off worker is never joined as if it had finished. Each segment records the weight versions that
produced its tokens (``model_version``; ``a+b`` when a swap happened during it).

Checkpoints and resuming: with a :class:`Checkpointer`, the organizer's sequence so far (ids and mask)
is handed out after each fork and around each join; ``run_agent(..., resume=checkpoint)`` rebuilds a fresh
agent from such a checkpoint (:meth:`AgentRunner.restore`: the parser replayed run by run, the timeline
rebuilt, the prefix's forks dispatched again) and decodes on from there. The runner still does no I/O:
storing checkpoints is the caller's (the organizer service's store).

Limits: a worker that times out returns an error text and is charged its whole token budget on the
clock (its real length is unknown); workers still running when their parent finishes are cancelled. A
resumed organizer's timeline places each fork at the token that closes its tag; where a generate call
ran past ``</FORK-i>``, the live run placed the fork at the end of that call, so the prefix's ``T``
could differ by the tokens in between (a backend that stops at the tag, as the stop regex asks, gives
the same timeline). A joined worker whose outcome comes back different on resume (a
done-marker expired) keeps the joined text, marked ``replaced`` (or ``timeout``) on its segment. Text
a streaming backend already sent as text events before an abort is not taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    ModelBackend,
    SamplingParams,
    version_label,
)
from shared.messages import EpisodeEvent, EventKind, SegmentRecord, WorkerOutcome, WorkerTask
from shared.metrics import Decode, ForkStep, JoinStep, Step, Timeline
from shared.protocol import (
    ORGANIZER_STOP_REGEX,
    RECURSIVE_WORKER_STOP_REGEX,
    WORKER_STOP_REGEX,
    Answer,
    Event,
    Fork,
    FormatError,
    Join,
    ProtocolParser,
    Return,
    Role,
    join_result,
)
from shared.tasks.base import Task

log = logging.getLogger(__name__)

ABORT_RETRIES = 2  # a call the backend aborted (finish ABORT) is sent again this many times
ABORT_BACKOFF_S = 0.05  # before each resend (a paused server holds the resend until it continues)

# Request priorities (GenerateRequest.priority; a larger value is served first, as SGLang orders them):
# the critical path first. An organizer is always on it; a worker whose join is already waiting is on it
# now; other workers are served in the order they were forked (first come, first served within a level).
PRIORITY_ORGANIZER = 2
PRIORITY_AWAITED = 1
PRIORITY_WORKER = 0


# ----------------------------------------------------------------------------- interfaces
class WorkerEndpoint(Protocol):
    """Runs one forked sub-query and returns its takeaway (model, tool, human, remote queue...)."""

    async def run(self, task: WorkerTask) -> WorkerOutcome: ...


class EventSink(Protocol):
    async def emit(self, event: EpisodeEvent) -> None: ...


class Checkpointer(Protocol):
    """Keeps an organizer's sequence so far (a partial segment, ``wall_end`` 0) so that an interrupted
    episode can resume from it (``resume_from``). Called after each fork is dispatched, when a join
    starts waiting and after its result is injected; only the latest call matters.

    A checkpointer whose ``lazy`` attribute is true gets a :class:`Snapshot` instead of a segment: the
    sequence at that moment, materialized only if and when the checkpointer writes it (most checkpoints
    are superseded before they are written, and building a segment copies and decodes the whole
    sequence, which at every fork and join would cost time quadratic in the episode's length)."""

    async def checkpoint(self, episode_id: str, segment: SegmentRecord) -> None: ...


class Snapshot:
    """An agent's sequence at one moment, without copying it: its ids and mask lists only grow, so the
    first ``length`` entries stay what they were. :meth:`segment` builds the partial segment;
    :meth:`tail` the part after a given length (for a writer that appends)."""

    def __init__(
        self, spec: AgentSpec, state: _AgentState, decode: Any, *, prompt_ids: list[int] | None = None
    ) -> None:
        self.agent = spec.agent
        self.role = spec.role.value
        self.prompt = spec.prompt
        self.prompt_ids = state.prompt_ids if prompt_ids is None else prompt_ids
        self._ids = state.ids
        self._mask = state.mask
        self.length = len(state.ids)
        self.generated_tokens = state.generated
        self.wall_start = state.wall_start
        self.model_version = state.version
        self._decode = decode

    def tail(self, start: int) -> tuple[list[int], list[int], str]:
        """The ids, mask and text after the first ``start`` ids (the text decoded from those ids alone)."""
        ids = self._ids[start : self.length]
        return ids, self._mask[start : self.length], self._decode(ids)

    def segment(self) -> SegmentRecord:
        ids = self._ids[: self.length]
        return SegmentRecord(
            agent=self.agent,
            role=self.role,
            prompt=self.prompt,
            prompt_ids=list(self.prompt_ids),
            completion_ids=ids,
            completion_mask=self._mask[: self.length],
            text=self._decode(ids),
            generated_tokens=self.generated_tokens,
            wall_start=self.wall_start,
            wall_end=0.0,  # partial: the final segment has its end
            model_version=self.model_version,
        )


class SegmentRecorder(Protocol):
    """Takes each worker's complete segment (token ids included) the moment its outcome arrives, for a
    store that writes segments as they complete (the ``segment`` event carries no ids). Called without
    waiting, for the organizer's own workers (each outcome carries its descendants' segments)."""

    def record(self, episode_id: str, segment: SegmentRecord) -> None: ...


class NullSink:
    async def emit(self, event: EpisodeEvent) -> None:
        return None


class ListSink:
    """Keeps every event in memory (tests, the CLI's live trace)."""

    def __init__(self) -> None:
        self.events: list[EpisodeEvent] = []

    async def emit(self, event: EpisodeEvent) -> None:
        self.events.append(event)


class Emitter:
    """Numbers an episode's events (one ``seq`` for its organizer and its in-process workers) and sends
    them to the sink; a failing sink is logged, never raised (an observer must not break an episode)."""

    def __init__(self, episode_id: str, sink: EventSink) -> None:
        self.episode_id = episode_id
        self.sink = sink
        self.seq = 0
        self._pending: set[asyncio.Task[None]] = set()  # events sent by soon() still on their way

    async def __call__(self, kind: EventKind, agent: str = "organizer", clock: int = 0, **data: object) -> None:
        self.seq += 1
        event = EpisodeEvent(
            episode_id=self.episode_id, seq=self.seq, kind=kind, agent=agent, clock=clock, data=data
        )
        await self._send(event)

    def soon(self, kind: EventKind, agent: str, clock: int, **data: object) -> None:
        """Emit from a synchronous callback on the event loop: numbered now, sent by a task. Tasks run in
        the order they are made, so events keep their order at the sink."""
        self.seq += 1
        event = EpisodeEvent(
            episode_id=self.episode_id, seq=self.seq, kind=kind, agent=agent, clock=clock, data=data
        )
        task = asyncio.get_running_loop().create_task(self._send(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, event: EpisodeEvent) -> None:
        try:
            await self.sink.emit(event)
        except Exception:
            log.exception("event sink failed on %s", event.kind)


# ----------------------------------------------------------------------------- one agent
@dataclass(frozen=True)
class AgentSpec:
    """What one agent runs and under which limits."""

    episode_id: str
    agent: str  # "organizer", "trace-2" (parallel), "1" (worker 1), "1.2" (worker 2 of worker 1)
    role: Role
    prompt: str
    budget: int  # tokens this agent may decode
    capacity: int  # pool size c for the parser's capacity rule
    allow_fork: bool
    sampling: SamplingParams
    worker_budget: int  # tokens each worker it forks may decode
    worker_timeout_s: float
    depth: int = 0  # 0 for the organizer, 1 for its workers, ...
    max_depth: int = 1  # agents at this depth may not fork (recursive organization)
    stream_text: bool = False  # emit text events as this agent decodes (and its joins' results)
    priority: int | None = None  # its generate calls' priority (see PRIORITY_*); None: the backend's default

    @property
    def stop_regex(self) -> str:
        if self.role is Role.ORGANIZER:
            return ORGANIZER_STOP_REGEX
        return RECURSIVE_WORKER_STOP_REGEX if self.allow_fork else WORKER_STOP_REGEX

    def child_name(self, fork_id: int) -> str:
        return str(fork_id) if self.role is Role.ORGANIZER else f"{self.agent}.{fork_id}"

    def worker_task(self, fork: Fork, task_name: str) -> WorkerTask:
        """The task a Fork of this agent dispatches."""
        seed = self.sampling.seed
        return WorkerTask(
            episode_id=self.episode_id,
            agent=self.child_name(fork.fork_id),
            fork_id=fork.fork_id,
            parent=self.agent,
            query=fork.query,
            endpoint=fork.endpoint,
            task=task_name,
            budget=self.worker_budget,
            depth=self.depth + 1,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            seed=None if seed is None else seed + 7919 * fork.fork_id,
            capacity=self.capacity,
            allow_fork=self.allow_fork and self.depth + 1 < self.max_depth,
            max_depth=self.max_depth,
            worker_timeout_s=self.worker_timeout_s,
            priority=PRIORITY_WORKER,
        )


@dataclass
class AgentRun:
    """What one agent's run produced."""

    segment: SegmentRecord
    timeline: Timeline
    final: str | None  # the Answer or Return text
    errors: list[dict[str, object]]  # format errors, this agent's and its workers'
    children: list[SegmentRecord]  # the segments of every worker it forked (recursively)
    failure: str | None = None  # the agent could not run to its end (backend error, aborted calls)


@dataclass
class _PendingFork:
    """A fork in the step list whose child timeline is known only when the agent ends."""

    fork_id: int


@dataclass
class _AgentState:
    """Everything one agent's run accumulates."""

    parser: ProtocolParser
    prompt_ids: list[int]
    version: str  # the backend's version when the agent started (the label if it generates nothing)
    versions: list[str] = field(default_factory=list)  # the versions that produced its tokens, in order
    aborted_calls: int = 0  # generate calls the backend aborted (retried or not)
    wall_start: float = field(default_factory=time.time)
    ids: list[int] = field(default_factory=list)  # every id after the prompt
    mask: list[int] = field(default_factory=list)  # 1 = generated here, 0 = injected by a join
    # prompt_ids + ids, kept as both grow: handed to every generate call as is (no copy per call)
    full: list[int] = field(default_factory=list)
    steps: list[Step | _PendingFork] = field(default_factory=list)
    generated: int = 0
    children: dict[int, asyncio.Task[WorkerOutcome]] = field(default_factory=dict)
    child_agents: dict[int, str] = field(default_factory=dict)
    outcomes: dict[int, WorkerOutcome] = field(default_factory=dict)
    error: str | None = None  # a backend failure (not a format error)
    rejoin: dict[int, str] = field(default_factory=dict)  # resumed: fork id -> the result joined before
    tasks: dict[int, WorkerTask] = field(default_factory=dict)  # fork id -> the task it dispatched

    def __post_init__(self) -> None:
        self.full = list(self.prompt_ids)

    @property
    def clock(self) -> int:
        """This agent's own clock (for live events; T comes from the timeline)."""
        return self.generated

    def add_generated(self, result: GenerateResult) -> None:
        n = len(result.output_ids)
        self.ids += result.output_ids
        self.full += result.output_ids
        self.mask += [1] * n
        self.generated += n
        if n:
            self.steps.append(Decode(n))
        for v in result.versions:  # each result's own label (spans when a swap happened during it)
            if v not in self.versions:
                self.versions.append(v)

    @property
    def label(self) -> str | None:
        return version_label(self.versions) or self.version

    def add_injected(self, ids: list[int]) -> None:
        self.ids += ids
        self.full += ids
        self.mask += [0] * len(ids)

    def add_replayed(self, ids: list[int]) -> None:
        """Generated ids of a checkpoint (restoring): in the sequence, not yet in the timeline."""
        self.ids += ids
        self.full += ids
        self.mask += [1] * len(ids)
        self.generated += len(ids)

    def settle_children(self) -> None:
        """Keep the outcome of workers that finished without a join; cancel the running ones."""
        for fid, task in self.children.items():
            if fid in self.outcomes:
                continue
            if task.done() and not task.cancelled() and task.exception() is None:
                self.outcomes[fid] = task.result()
            else:
                task.cancel()


class AgentRunner:
    """Runs agents of one task on one backend (see the module docstring)."""

    def __init__(
        self,
        backend: ModelBackend,
        task: Task,
        *,
        endpoints: Mapping[str | None, WorkerEndpoint] | None = None,
        sink: EventSink | None = None,
        abort_retries: int = ABORT_RETRIES,
        checkpointer: Checkpointer | None = None,
        recorder: SegmentRecorder | None = None,
    ) -> None:
        if abort_retries < 0:
            raise ValueError(f"abort_retries must be >= 0, got {abort_retries}")
        self.backend = backend
        self.task = task
        self.abort_retries = abort_retries
        self.endpoints: dict[str | None, WorkerEndpoint] = dict(endpoints or {})
        self.endpoints.setdefault(None, ModelWorker(self))
        self.sink: EventSink = sink or NullSink()
        self.checkpointer = checkpointer
        self.recorder = recorder
        self._emitters: dict[str, Emitter] = {}

    def emitter(self, episode_id: str) -> Emitter:
        """The episode's emitter, shared by its organizer and in-process workers (one ``seq``)."""
        if episode_id not in self._emitters:
            self._emitters[episode_id] = Emitter(episode_id, self.sink)
        return self._emitters[episode_id]

    @contextlib.contextmanager
    def episode_scope(self, episode_id: str) -> Iterator[Emitter]:
        """The episode's emitter for the duration of a block; forgotten at its end unless it existed
        before (a worker inside its organizer's process shares the organizer's numbering)."""
        owned = episode_id not in self._emitters
        emit = self.emitter(episode_id)
        try:
            yield emit
        finally:
            if owned:
                self._emitters.pop(episode_id, None)

    # ------------------------------------------------------------------------------- the loop
    async def run_agent(self, spec: AgentSpec, emit: Emitter, *, resume: SegmentRecord | None = None) -> AgentRun:
        """Run one agent to its end; with ``resume`` (a checkpoint of this agent, see :meth:`restore`),
        continue from that sequence instead of from the prompt."""
        state = _AgentState(
            parser=ProtocolParser(spec.role, capacity=spec.capacity, allow_fork=spec.allow_fork),
            prompt_ids=self.backend.encode(spec.prompt),
            version=self.backend.weight_version,
        )
        try:
            pending: deque[Event] = deque()
            if resume is not None:
                pending.extend(self.restore(spec, state, resume, emit))
            while pending and not state.parser.errors:  # a join the checkpoint was waiting on
                pending.extend(await self._handle(pending.popleft(), spec, state, emit))
            while not state.parser.done and not state.parser.errors:
                result = await self._decode(spec, state, emit)
                if result is None:
                    break
                if result.finish is FinishReason.ABORT:  # retries exhausted: nothing to parse
                    self._goes_on(result, state)
                    break
                pending.extend(state.parser.feed(result.text))
                while pending:
                    pending.extend(await self._handle(pending.popleft(), spec, state, emit))
                if state.parser.errors or not self._goes_on(result, state):
                    break
            if not state.parser.done and not state.parser.errors and state.error is None:
                state.parser.close()
            await self._rejoin(spec, state)
        finally:
            state.settle_children()
        return self._collect(spec, state)

    # ------------------------------------------------------------------------------- resuming
    def restore(self, spec: AgentSpec, state: _AgentState, seg: SegmentRecord, emit: Emitter) -> list[Event]:
        """Rebuild a fresh agent's state from a checkpoint of it (its ids and mask after the prompt).

        The sequence is replayed through the parser exactly as it was built live: each run of generated
        ids (mask 1) is fed, each run of injected ids (mask 0) is injected, so the parser's state (forks,
        joins, capacity, an open tag, text held after a ``<JOIN-i>``) is the one the live agent had. The
        timeline is rebuilt on the way: a fork's step at the token that closes its ``</FORK-i>``, a
        join's after the generated run that ends with its ``<JOIN-i>`` (a backend that stops at the tags
        makes these the live positions). Every fork in the prefix is dispatched again through its
        endpoint (idempotent endpoints hand back a stored outcome); those already joined are only
        awaited at the end, for their segments and timelines. Returns the events still to handle: a
        trailing ``<JOIN-i>`` whose result was not injected yet."""
        ids, mask = list(seg.completion_ids), list(seg.completion_mask)
        if len(ids) != len(mask) or any(m not in (0, 1) for m in mask):
            raise ValueError("a checkpoint needs one mask value (0 or 1) per completion id")
        if seg.prompt_ids and list(seg.prompt_ids) != state.prompt_ids:
            raise ValueError("the checkpoint's prompt is not this agent's prompt")
        state.wall_start = seg.wall_start or state.wall_start
        state.version = seg.model_version or state.version
        leftover: list[Event] = []
        counted = 0  # generated tokens already in Decode steps
        awaiting: Join | None = None  # a join whose result comes next
        i = 0
        while i < len(ids):
            j = i
            while j < len(ids) and mask[j] == mask[i]:
                j += 1
            run = ids[i:j]
            if mask[i] == 1:
                start = state.parser.offset
                text = self.backend.decode(run)
                run_start = state.generated
                state.add_replayed(run)
                for ev in state.parser.feed(text):
                    if isinstance(ev, Fork):
                        close = f"</FORK-{ev.fork_id}>"
                        at = text.find(close, max(ev.offset - start, 0))
                        end = run_start + _tokens_for(self.backend, run, at + len(close) if at >= 0 else len(text))
                        counted = _decode_step(state, counted, end)
                        self._redispatch(ev, spec, state, emit)
                    elif isinstance(ev, Join):
                        counted = _decode_step(state, counted, state.generated)
                        awaiting = ev
                    else:
                        leftover.append(ev)
                counted = _decode_step(state, counted, state.generated) if awaiting is None else counted
            else:
                k = 0
                while k < len(run):  # one injected result per join (a run may hold two back to back)
                    if awaiting is None:
                        raise ValueError("the checkpoint has injected text where no join waits for it")
                    piece_text = self.backend.decode(run[k:])
                    close = f"</JOIN-{awaiting.fork_id}>"
                    at = piece_text.find(close)
                    n = _tokens_for(self.backend, run[k:], at + len(close)) if at >= 0 else len(run) - k
                    piece = run[k : k + n]
                    injected = self.backend.decode(piece)
                    state.steps.append(JoinStep(awaiting.fork_id))
                    state.rejoin[awaiting.fork_id] = injected[: -len(close)] if injected.endswith(close) else injected
                    state.add_injected(piece)
                    awaiting = None
                    for ev in state.parser.inject(injected):
                        if isinstance(ev, Fork):
                            self._redispatch(ev, spec, state, emit)
                        elif isinstance(ev, Join):
                            awaiting = ev
                        else:
                            leftover.append(ev)
                    k += n
            i = j
        if awaiting is not None:
            leftover.append(awaiting)  # the checkpoint was waiting on this join: do it now
        return leftover

    def _redispatch(self, ev: Fork, spec: AgentSpec, state: _AgentState, emit: Emitter) -> None:
        """Dispatch a fork found in a checkpoint again (no fork event: it was published the first time)."""
        task = spec.worker_task(ev, self.task.name)
        state.tasks[ev.fork_id] = task
        state.child_agents[ev.fork_id] = task.agent
        state.children[ev.fork_id] = asyncio.create_task(
            self._run_worker(task, spec.worker_timeout_s, emit, state.clock)
        )
        state.steps.append(_PendingFork(ev.fork_id))

    async def _rejoin(self, spec: AgentSpec, state: _AgentState) -> None:
        """The outcomes of workers joined before a resume: awaited for their segments and timelines. An
        outcome that is not what was joined (its done-marker expired, a worker that had timed out) is
        replaced by the joined text, charged its whole budget like a timed-out worker."""
        for fid, joined in state.rejoin.items():
            outcome = await state.children[fid]
            if outcome.returned != joined:
                agent = state.child_agents[fid]
                log.warning(
                    "resumed agent %s: worker %s returned %r now but %r was joined before; keeping the joined text",
                    spec.agent, agent, outcome.returned[:80], joined[:80],
                )
                outcome = failed_outcome(
                    state.tasks[fid], "timeout" if "timed out" in joined else "replaced", returned=joined
                )
                outcome.timeline = Timeline.of(Decode(spec.worker_budget)).to_json()
            state.outcomes[fid] = outcome

    async def _checkpoint(self, spec: AgentSpec, state: _AgentState) -> None:
        """Hand the organizer's sequence so far to the checkpointer (the organizer of an episode only)."""
        if self.checkpointer is None or spec.role is not Role.ORGANIZER or spec.depth != 0:
            return
        snapshot = Snapshot(spec, state, self.backend.decode)
        try:
            if getattr(self.checkpointer, "lazy", False):
                await self.checkpointer.checkpoint(spec.episode_id, snapshot)  # type: ignore[arg-type]
            else:
                await self.checkpointer.checkpoint(spec.episode_id, snapshot.segment())
        except Exception:
            log.exception("checkpoint of %s in episode %s failed", spec.agent, spec.episode_id)

    async def _decode(self, spec: AgentSpec, state: _AgentState, emit: Emitter) -> GenerateResult | None:
        """One generate call from the current prefix; None (and the budget error) when no budget is left.

        With ``stream_text`` the decoded text goes out as text events: piece by piece where the backend
        streams, otherwise (and for whatever a stream left out) all at once when the call returns."""
        remaining = spec.budget - state.generated
        if remaining <= 0:
            state.parser.close(budget_exhausted=True)
            return None
        streamed: list[str] = []

        def on_text(piece: str) -> None:
            streamed.append(piece)
            emit.soon(EventKind.TEXT, spec.agent, state.clock, text=piece, injected=False)

        request = GenerateRequest(
            input_ids=state.full,  # the agent's own list: only appended to after the call returns
            max_new_tokens=remaining,
            stop_regex=spec.stop_regex,
            sampling=spec.sampling,
            session=spec.episode_id,
            tag=spec.agent,
            on_text=on_text if spec.stream_text else None,
            priority=spec.priority,
        )
        result = await self.backend.generate(request)
        for attempt in range(self.abort_retries):
            if result.finish is not FinishReason.ABORT:
                break
            state.aborted_calls += 1
            log.warning(
                "episode %s agent %s: the backend aborted a call after %d tokens (weights %s); sending it "
                "again (%d/%d)", spec.episode_id, spec.agent, len(result.output_ids), result.weight_version,
                attempt + 1, self.abort_retries,
            )  # fmt: skip
            await asyncio.sleep(ABORT_BACKOFF_S)
            streamed.clear()
            result = await self.backend.generate(request)
        if result.finish is FinishReason.ABORT:  # out of retries: the partial output is dropped
            state.aborted_calls += 1
            return result
        state.add_generated(result)
        if spec.stream_text:
            sent = "".join(streamed)
            rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
            if rest:
                await emit(EventKind.TEXT, spec.agent, state.clock, text=rest, injected=False)
        return result

    @staticmethod
    def _goes_on(result: GenerateResult, state: _AgentState) -> bool:
        """Whether to decode again after a call that did not finish the agent."""
        if state.parser.done:
            return False
        if result.finish is FinishReason.ABORT:
            state.error = f"backend aborted the request ({state.aborted_calls} attempts)"
            return False
        if result.finish is not FinishReason.STOP:  # EOS or the budget, with no final tag
            state.parser.close(budget_exhausted=result.finish is FinishReason.LENGTH)
            return False
        return True

    async def _handle(self, ev: Event, spec: AgentSpec, state: _AgentState, emit: Emitter) -> list[Event]:
        """Act on one parser event; returns events that the join's overflow text completed."""
        if isinstance(ev, FormatError):
            await emit(
                EventKind.FORMAT_ERROR, spec.agent, state.clock,
                error=ev.kind.value, offset=ev.offset, message=ev.message,
            )
        elif isinstance(ev, Fork):
            await self._on_fork(ev, spec, state, emit)
        elif isinstance(ev, Join):
            return await self._on_join(ev, spec, state, emit)
        elif isinstance(ev, Answer | Return):
            kind = EventKind.ANSWER if isinstance(ev, Answer) else EventKind.RETURN
            await emit(kind, spec.agent, state.clock, text=ev.text)
        return []

    async def _on_fork(self, ev: Fork, spec: AgentSpec, state: _AgentState, emit: Emitter) -> None:
        task = spec.worker_task(ev, self.task.name)
        state.tasks[ev.fork_id] = task
        state.child_agents[ev.fork_id] = task.agent
        state.children[ev.fork_id] = asyncio.create_task(
            self._run_worker(task, spec.worker_timeout_s, emit, state.clock)
        )
        state.steps.append(_PendingFork(ev.fork_id))
        await emit(EventKind.FORK, spec.agent, state.clock, fork_id=ev.fork_id, query=ev.query, endpoint=ev.endpoint)
        await self._checkpoint(spec, state)

    async def _on_join(self, ev: Join, spec: AgentSpec, state: _AgentState, emit: Emitter) -> list[Event]:
        await emit(EventKind.JOIN, spec.agent, state.clock, fork_id=ev.fork_id)
        if not state.children[ev.fork_id].done():
            self._awaited(state.tasks.get(ev.fork_id))
        await self._checkpoint(spec, state)
        outcome = await state.children[ev.fork_id]
        state.outcomes[ev.fork_id] = outcome
        state.steps.append(JoinStep(ev.fork_id))
        injected = join_result(ev.fork_id, outcome.returned)
        state.add_injected(self.backend.encode(injected))
        overflow = state.parser.inject(injected)  # generated text the backend returned past the join
        await emit(EventKind.WORKER_RESULT, spec.agent, state.clock, fork_id=ev.fork_id, returned=outcome.returned)
        if spec.stream_text:
            await emit(EventKind.TEXT, spec.agent, state.clock, text=injected, injected=True)
        await self._checkpoint(spec, state)
        return overflow

    def _awaited(self, task: WorkerTask | None) -> None:
        """Tell the worker's endpoint that a join now waits for it (an endpoint with an ``awaited(task)``
        method may then serve it first: the critical path); never raises, never waits."""
        if task is None:
            return
        awaited = getattr(self.endpoints.get(task.endpoint), "awaited", None)
        if awaited is None:
            return
        try:
            awaited(task)
        except Exception:
            log.exception("endpoint hook for worker %s of episode %s failed", task.agent, task.episode_id)

    def _collect(self, spec: AgentSpec, state: _AgentState) -> AgentRun:
        """The agent's segment, timeline and errors, with its workers' segments and errors folded in."""
        errors = [_error_dict(e, spec.agent) for e in state.parser.errors]
        resolved: list[Step] = []
        child_segments: list[SegmentRecord] = []
        for step in state.steps:
            if not isinstance(step, _PendingFork):
                resolved.append(step)
                continue
            fid = step.fork_id
            done = state.outcomes.get(fid)
            resolved.append(ForkStep(fid, Timeline.from_json(done.timeline) if done else Timeline()))
            if done is not None:
                child_segments.extend(done.segments)
                errors.extend(done.format_errors)
            else:
                child_segments.append(
                    SegmentRecord(
                        agent=state.child_agents[fid], role="worker", fork_id=fid, parent=spec.agent,
                        error="cancelled",
                    )
                )
        final = state.parser.final.text if state.parser.final is not None else None
        segment = SegmentRecord(
            agent=spec.agent,
            role=spec.role.value,
            prompt=spec.prompt,
            prompt_ids=state.prompt_ids,
            completion_ids=state.ids,
            completion_mask=state.mask,
            text=self.backend.decode(state.ids),
            returned=final if spec.role is Role.WORKER else None,
            generated_tokens=state.generated,
            wall_start=state.wall_start,
            wall_end=time.time(),
            error=state.error or (str(errors[0]["kind"]) if errors else None),
            model_version=state.label,
        )
        return AgentRun(segment, Timeline(tuple(resolved)), final, errors, child_segments, failure=state.error)

    # ------------------------------------------------------------------------------- workers
    async def _run_worker(self, task: WorkerTask, timeout_s: float, emit: Emitter, clock: int) -> WorkerOutcome:
        endpoint = self.endpoints.get(task.endpoint)
        if endpoint is None:
            known = ", ".join(sorted(str(k) for k in self.endpoints if k)) or "none"
            outcome = failed_outcome(
                task, "unknown_endpoint", returned=f"[no worker endpoint '{task.endpoint}'; known: {known}]"
            )
        else:
            try:
                if getattr(endpoint, "manages_timeout", False):  # e.g. from the worker's start, not the send
                    outcome = await endpoint.run(task)
                else:
                    outcome = await asyncio.wait_for(endpoint.run(task), timeout_s)
            except TimeoutError:
                outcome = failed_outcome(
                    task, "timeout", returned=f"[worker {task.fork_id} timed out after {timeout_s:g}s]"
                )
                outcome.timeline = Timeline.of(Decode(task.budget)).to_json()  # charged its whole budget
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken worker must not take the episode down
                log.exception("worker %s of episode %s failed", task.agent, task.episode_id)
                outcome = failed_outcome(task, f"failed: {exc}", returned=f"[worker {task.fork_id} failed: {exc}]")
        if self.recorder is not None and task.depth == 1:
            for seg in outcome.segments:
                try:
                    self.recorder.record(task.episode_id, seg)
                except Exception:
                    log.exception("recording segment %s of episode %s failed", seg.agent, task.episode_id)
        for seg in outcome.segments:
            await emit(
                EventKind.SEGMENT, seg.agent, clock,
                segment=seg.model_dump(exclude={"prompt_ids", "completion_ids", "completion_mask"}),
            )
        return outcome


def _tokens_for(backend: ModelBackend, run: list[int], chars: int) -> int:
    """The fewest leading ids of ``run`` whose text is at least ``chars`` characters long."""
    lo, hi = 0, len(run)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(backend.decode(run[:mid])) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _decode_step(state: _AgentState, counted: int, upto: int) -> int:
    """Append the Decode step of the generated tokens ``counted..upto``; returns the new count."""
    if upto > counted:
        state.steps.append(Decode(upto - counted))
    return max(counted, upto)


def _error_dict(err: FormatError, agent: str) -> dict[str, object]:
    return {"kind": err.kind.value, "offset": err.offset, "message": err.message, "agent": agent}


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


def failed_outcome(task: WorkerTask, error: str, *, returned: str | None = None) -> WorkerOutcome:
    """The outcome of a worker that could not run: an error text for the join, a segment saying why."""
    return WorkerOutcome(
        returned=returned if returned is not None else f"[worker {task.fork_id} failed: {error}]",
        segments=[worker_segment(task, error=error)],
        error=error,
    )


class ModelWorker:
    """The default worker endpoint: the same model thinks about the sub-query alone and returns."""

    def __init__(self, runner: AgentRunner) -> None:
        self.runner = runner

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        spec = AgentSpec(
            episode_id=task.episode_id,
            agent=task.agent,
            role=Role.WORKER,
            prompt=self.runner.task.worker_prompt(task.query),
            budget=task.budget,
            capacity=task.capacity,
            allow_fork=task.allow_fork,
            sampling=SamplingParams(temperature=task.temperature, top_p=task.top_p, seed=task.seed),
            worker_budget=task.budget,
            worker_timeout_s=task.worker_timeout_s,
            depth=task.depth,
            max_depth=task.max_depth,
            priority=task.priority,
        )
        with self.runner.episode_scope(task.episode_id) as emit:
            run = await self.runner.run_agent(spec, emit)
        seg = run.segment.model_copy(
            update={"fork_id": task.fork_id, "parent": task.parent, "endpoint": task.endpoint, "query": task.query}
        )
        if run.failure is not None:  # cut off (aborted calls, a backend error): an error, never a result
            return WorkerOutcome(
                returned=f"[worker {task.fork_id} failed: {run.failure}]",
                timeline=run.timeline.to_json(),
                segments=[seg, *run.children],
                format_errors=run.errors,
                error=run.failure,
            )
        return WorkerOutcome(
            returned=run.final if run.final is not None else seg.text,
            timeline=run.timeline.to_json(),
            segments=[seg, *run.children],
            format_errors=run.errors,
        )
