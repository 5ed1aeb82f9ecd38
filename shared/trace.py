"""An episode as a timeline: lanes, fork and join arrows, the critical path, in token time and wall time.

What the web page (SVG) and ``asyncthink trace ID --png`` draw, computed here once:

* **token time** (the organizer clock of docs/design.md, "Measures", as :func:`shared.metrics.schedule` places it): each
  agent is a lane; its decoded tokens are bars; a fork is an arrow from the parent's lane to the child's at
  the fork's clock, a join an arrow from the child's end back to the parent where it resumes;
* **the critical path** (:func:`critical_intervals`): the decode intervals whose lengths add up to ``T``,
  found by walking back from the end: where a join jumped the clock to a worker's end, the path runs
  through that worker from its fork; otherwise through the organizer's own tokens;
* **wall time**: each lane from its start to its end in seconds (a person's answer takes wall time and no
  tokens, like a tool's);
* **live** (:class:`LiveTrace`): the same picture rebuilt from an episode's events as they arrive (fork,
  join, text, segment, finished), so a running episode is drawn before anything is stored. Event clocks
  are each agent's own decoded tokens; a streamed text piece counts as at least one token, so a live
  lane may lag a little behind until the agent's next tag. A finished episode is drawn from its stored
  timeline, exactly.

Pure: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.messages import EpisodeEvent, EventKind
from shared.metrics import Decode, ForkStep, Interval, JoinStep, Step, Timeline, schedule


def child_name(parent: str, fork_id: int) -> str:
    """The agent a fork of ``parent`` starts: ``3`` for the organizer's fork 3, ``3.1`` for its worker's."""
    return str(fork_id) if parent == "organizer" else f"{parent}.{fork_id}"


@dataclass(frozen=True)
class Arrow:
    kind: Literal["fork", "join"]
    parent: str  # the agent that forked / joined
    child: str  # the worker
    at: int  # fork: the parent's clock at the fork; join: where the parent resumes (max(t_j, child end))
    child_at: int  # fork: where the child starts (= at); join: the child's end
    reached: int = 0  # join: the parent's clock when it reached <JOIN-i> (t_j); fork: = at


@dataclass
class Lane:
    agent: str  # "organizer", "1", "1.2", "trace-1"
    parent: str | None = None
    fork_id: int | None = None
    query: str | None = None  # a worker's sub-query
    endpoint: str | None = None  # None: the model
    author: str | None = None  # "human" for a person
    returned: str | None = None
    error: str | None = None
    start: int = 0  # token time: [start, end) of the lane, waits included
    end: int = 0
    tokens: int = 0  # decoded tokens
    wall_start: float | None = None  # unix time
    wall_end: float | None = None  # None while it runs
    running: bool = False

    @property
    def kind(self) -> str:
        if self.agent == "organizer" or self.agent.startswith("trace-"):
            return "human organizer" if self.author == "human" else "organizer"
        if self.author == "human" or (self.endpoint or "").split(":")[0] == "human":
            return "human"
        return "model" if self.endpoint is None else "tool"


@dataclass
class TraceLayout:
    latency: int  # T
    lanes: list[Lane]  # organizer first, then each worker after its parent, in fork order
    bars: list[Interval]  # decode intervals on the organizer clock
    arrows: list[Arrow]
    critical: list[Interval]  # the critical path's intervals, in time order; their lengths add up to T
    live: bool = False
    now: float = field(default_factory=time.time)  # the wall time a running lane is drawn up to

    def lane(self, agent: str) -> Lane | None:
        return next((lane for lane in self.lanes if lane.agent == agent), None)

    @property
    def wall_origin(self) -> float | None:
        starts = [lane.wall_start for lane in self.lanes if lane.wall_start]
        return min(starts) if starts else None

    @property
    def wall_end(self) -> float | None:
        ends = [lane.wall_end if lane.wall_end else self.now for lane in self.lanes if lane.wall_start]
        return max(ends) if ends else None


# ----------------------------------------------------------------------------- token time
def _walk(
    timeline: Timeline, start: int, agent: str, bars: list[Interval], arrows: list[Arrow],
    spans: dict[str, tuple[int, int, int]], order: list[str],
) -> int:
    clock = start
    tokens = 0
    children: dict[int, tuple[str, int]] = {}
    order.append(agent)
    for step in timeline.steps:
        if isinstance(step, Decode):
            if step.tokens:
                bars.append(Interval(agent, clock, clock + step.tokens))
            clock += step.tokens
            tokens += step.tokens
        elif isinstance(step, ForkStep):
            name = child_name(agent, step.fork_id)
            arrows.append(Arrow("fork", agent, name, clock, clock, clock))
            children[step.fork_id] = (name, _walk(step.child, clock, name, bars, arrows, spans, order))
        else:
            if step.fork_id not in children:
                raise ValueError(f"join of fork {step.fork_id}, which was not forked before")
            name, end = children[step.fork_id]
            resumed = max(clock, end)
            arrows.append(Arrow("join", agent, name, resumed, end, clock))
            clock = resumed
    spans[agent] = (start, clock, tokens)
    return clock


def critical_intervals(timeline: Timeline, start: int = 0, agent: str = "organizer") -> list[Interval]:
    """The decode intervals on the critical path, in time order (see the module docstring)."""
    records: list[tuple[str, int, int, int, bool]] = []  # kind, start, end, fork id, jumped (joins)
    forks: dict[int, tuple[int, int, Timeline, str, int]] = {}  # id -> record index, t_f, child, name, end
    clock = start
    for step in timeline.steps:
        if isinstance(step, Decode):
            records.append(("decode", clock, clock + step.tokens, 0, False))
            clock += step.tokens
        elif isinstance(step, ForkStep):
            name = child_name(agent, step.fork_id)
            forks[step.fork_id] = (len(records), clock, step.child, name, schedule(step.child, clock, name).end)
            records.append(("fork", clock, clock, step.fork_id, False))
        else:
            end = forks[step.fork_id][4]
            records.append(("join", clock, max(clock, end), step.fork_id, end > clock))
            clock = max(clock, end)
    path: list[Interval] = []
    i = len(records) - 1
    while i >= 0:
        kind, s, e, fid, jumped = records[i]
        if kind == "join" and jumped:
            index, t_f, child, name, _ = forks[fid]
            path = critical_intervals(child, t_f, name) + path
            i = index - 1
            continue
        if kind == "decode" and e > s:
            path.insert(0, Interval(agent, s, e))
        i -= 1
    return path


def layout(timeline: Timeline, lanes: Mapping[str, Lane] | None = None, *, live: bool = False) -> TraceLayout:
    """Place ``timeline`` on the organizer clock; ``lanes`` adds what is known of each agent (query,
    endpoint, wall times...), keyed by agent name."""
    known = dict(lanes or {})
    bars: list[Interval] = []
    arrows: list[Arrow] = []
    spans: dict[str, tuple[int, int, int]] = {}
    order: list[str] = []
    end = _walk(timeline, 0, "organizer", bars, arrows, spans, order)
    out: list[Lane] = []
    for agent in order:
        lane = known.pop(agent, None) or Lane(agent)
        lane.start, lane.end, lane.tokens = spans[agent]
        out.append(lane)
    out += [lane for lane in known.values() if lane.agent != "organizer"]  # started, nothing on the clock yet
    return TraceLayout(end, out, bars, arrows, critical_intervals(timeline), live=live)


def parallel_layout(lanes: Iterable[Lane]) -> TraceLayout:
    """k independent traces (parallel thinking): each a lane from 0; T is the longest."""
    out = list(lanes)
    for lane in out:
        lane.start, lane.end = 0, lane.tokens
    bars = [Interval(lane.agent, 0, lane.tokens) for lane in out if lane.tokens]
    longest = max(out, key=lambda lane: lane.tokens, default=None)
    critical = [Interval(longest.agent, 0, longest.tokens)] if longest and longest.tokens else []
    return TraceLayout(longest.tokens if longest else 0, out, bars, [], critical)


def stored_layout(timeline_json: list[Any] | None, segments: Iterable[Any], *, mode: str = "asyncthink") -> TraceLayout:
    """A finished episode's layout from what the store keeps: its timeline and its segments (rows or
    records with ``agent``, ``parent``, ``fork_id``, ``query``, ``endpoint``, ``returned``, ``error``,
    ``generated_tokens``, ``wall_start``, ``wall_end`` and, where present, ``author``)."""
    lanes = {}
    for seg in segments:
        lanes[seg.agent] = Lane(
            agent=seg.agent, parent=seg.parent, fork_id=seg.fork_id, query=seg.query, endpoint=seg.endpoint,
            author=getattr(seg, "author", None), returned=seg.returned, error=seg.error,
            tokens=seg.generated_tokens or 0, wall_start=seg.wall_start or None, wall_end=seg.wall_end or None,
        )
    if mode == "parallel":
        return parallel_layout(lanes.values())
    return layout(Timeline.from_json(timeline_json or []), lanes)


# ----------------------------------------------------------------------------- live, from events
@dataclass
class _AgentEvents:
    steps: list[tuple[str, int, int]] = field(default_factory=list)  # ("fork"|"join", clock, fork id)
    clock: int = 0  # decoded tokens so far (see the module docstring)


class LiveTrace:
    """Rebuilds an episode's timeline from its events, one event at a time (see the module docstring)."""

    def __init__(self) -> None:
        self.agents: dict[str, _AgentEvents] = {"organizer": _AgentEvents()}
        self.lanes: dict[str, Lane] = {"organizer": Lane("organizer", running=True)}
        self.finished = False
        self.parallel = False
        self.status: str | None = None
        self.answer: str | None = None
        self.events = 0

    def _agent(self, name: str) -> _AgentEvents:
        return self.agents.setdefault(name, _AgentEvents())

    def add(self, event: EpisodeEvent) -> None:
        self.events += 1
        kind, agent, data = event.kind, event.agent, event.data
        state = self._agent(agent)
        if kind is EventKind.STARTED:
            self.parallel = data.get("mode") == "parallel"
            self.lanes["organizer"].wall_start = event.ts
            return
        if kind is EventKind.FINISHED:
            self.finished = True
            self.status = str(data.get("status"))
            self.answer = data.get("answer")
            for lane in self.lanes.values():
                lane.running = False
                if lane.wall_start and not lane.wall_end:
                    lane.wall_end = event.ts
            return
        if kind is EventKind.TEXT and not data.get("injected") and data.get("text"):
            state.clock = max(state.clock + 1, event.clock)
        elif kind is not EventKind.SEGMENT:  # a segment event carries its parent's clock at the fork
            state.clock = max(state.clock, event.clock)
        if agent not in self.lanes:
            self.lanes[agent] = Lane(agent, running=True, wall_start=event.ts)
        if kind is EventKind.FORK:
            fid = int(data["fork_id"])
            state.steps.append(("fork", event.clock, fid))
            name = child_name(agent, fid)
            self.lanes[name] = Lane(
                name, parent=agent, fork_id=fid, query=data.get("query"), endpoint=data.get("endpoint"),
                running=True, wall_start=event.ts,
            )
        elif kind is EventKind.JOIN:
            state.steps.append(("join", event.clock, int(data["fork_id"])))
        elif kind is EventKind.SEGMENT:
            seg = data.get("segment") or {}
            name = str(seg.get("agent", agent))
            child = self.lanes.setdefault(name, Lane(name))
            child.running = False
            child.returned = seg.get("returned")
            child.error = seg.get("error")
            child.author = seg.get("author") or child.author
            child.endpoint = seg.get("endpoint", child.endpoint)
            child.wall_start = seg.get("wall_start") or child.wall_start
            child.wall_end = seg.get("wall_end") or event.ts
            tokens = int(seg.get("generated_tokens") or 0)
            self._agent(name).clock = max(self._agent(name).clock, tokens)
        elif kind in (EventKind.ANSWER, EventKind.RETURN) and agent == "organizer":
            self.answer = data.get("text")

    def _timeline(self, agent: str, seen: set[str]) -> Timeline:
        seen.add(agent)
        state = self.agents.get(agent) or _AgentEvents()
        steps: list[Step] = []
        last = 0
        joined: set[int] = set()
        forked: set[int] = set()
        for kind, clock, fid in state.steps:
            if clock > last:
                steps.append(Decode(clock - last))
                last = clock
            name = child_name(agent, fid)
            if kind == "fork" and fid not in forked and name not in seen:
                forked.add(fid)
                steps.append(ForkStep(fid, self._timeline(name, seen)))
            elif kind == "join" and fid in forked and fid not in joined:
                joined.add(fid)
                steps.append(JoinStep(fid))
        if state.clock > last:
            steps.append(Decode(state.clock - last))
        return Timeline(tuple(steps))

    def timeline(self) -> Timeline:
        return self._timeline("organizer", set())

    def layout(self) -> TraceLayout:
        lanes = {name: Lane(**vars(lane)) for name, lane in self.lanes.items()}
        if self.parallel:
            traces = [lane for name, lane in lanes.items() if name.startswith("trace-")]
            for lane in traces:
                lane.tokens = self.agents.get(lane.agent, _AgentEvents()).clock
            out = parallel_layout(traces)
            out.live = not self.finished
            return out
        return layout(self.timeline(), lanes, live=not self.finished)
