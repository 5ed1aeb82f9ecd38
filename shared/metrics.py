"""Critical-path latency T and thinking concurrency η (defined in the README's Metrics section), as pure functions of a timeline.

A :class:`Timeline` is what one agent did, in order: decode some tokens, fork a child (whose own
timeline is nested), join a child. Time is counted in decoded tokens:

* the organizer's clock advances by one per token it decodes;
* a worker forked at organizer time ``t_f`` that decodes ``L`` tokens finishes at ``t_f + L``
  (a worker that itself forks runs the same rules on its own clock, starting at ``t_f``);
* at ``<JOIN-i>`` (time ``t_j``) the clock jumps to ``max(t_j, end of worker i)``; injected text is
  prefill and does not advance the clock;
* ``T`` is the organizer's clock at the end.

``η = (1/T) Σ_t a_t`` with ``a_t`` the agents decoding at step ``t`` (the organizer counts unless it is
blocked in a Join). Every decoded token occupies one step of its agent, so ``Σ_t a_t`` is the number of
tokens decoded before ``T``; a worker still running at ``T`` (never joined) counts only up to ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decode:
    tokens: int  # tokens decoded in one stretch, >= 0

    def __post_init__(self) -> None:
        # Checked here, so that no path (schedule, tokens_decoded, from_json) can see a negative count.
        if self.tokens < 0:
            raise ValueError(f"a decode step cannot have a negative token count (got {self.tokens})")


@dataclass(frozen=True)
class ForkStep:
    fork_id: int
    child: Timeline


@dataclass(frozen=True)
class JoinStep:
    fork_id: int


Step = Decode | ForkStep | JoinStep


@dataclass(frozen=True)
class Timeline:
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @staticmethod
    def of(*steps: Step) -> Timeline:
        return Timeline(tuple(steps))

    def to_json(self) -> list[object]:
        out: list[object] = []
        for s in self.steps:
            if isinstance(s, Decode):
                out.append(["decode", s.tokens])
            elif isinstance(s, ForkStep):
                out.append(["fork", s.fork_id, s.child.to_json()])
            else:
                out.append(["join", s.fork_id])
        return out

    @staticmethod
    def from_json(data: list[object]) -> Timeline:
        steps: list[Step] = []
        for item in data:
            assert isinstance(item, list)
            kind = item[0]
            if kind == "decode":
                steps.append(Decode(int(item[1])))
            elif kind == "fork":
                steps.append(ForkStep(int(item[1]), Timeline.from_json(item[2])))
            elif kind == "join":
                steps.append(JoinStep(int(item[1])))
            else:
                raise ValueError(f"unknown timeline step {kind!r}")
        return Timeline(tuple(steps))


@dataclass(frozen=True)
class Interval:
    """``[start, end)`` on the organizer clock during which one agent decoded (one token per step)."""

    agent: str  # "organizer", "1", "1.2" (worker 2 forked by worker 1), ...
    start: int
    end: int


@dataclass(frozen=True)
class Schedule:
    end: int  # when this agent finished (for the organizer: T)
    intervals: tuple[Interval, ...]  # every decoding interval of this agent and its descendants
    spans: tuple[Interval, ...] = ()  # [start, end) of this agent and each descendant, waits included


def schedule(timeline: Timeline, start: int = 0, agent: str = "organizer") -> Schedule:
    """Place every decoded token of an agent (and of the workers it forks) on the organizer clock."""
    clock = start
    intervals: list[Interval] = []
    spans: list[Interval] = []
    children: dict[int, Schedule] = {}
    for step in timeline.steps:
        if isinstance(step, Decode):
            if step.tokens:
                intervals.append(Interval(agent, clock, clock + step.tokens))
            clock += step.tokens
        elif isinstance(step, ForkStep):
            name = str(step.fork_id) if agent == "organizer" else f"{agent}.{step.fork_id}"
            child = schedule(step.child, clock, name)
            children[step.fork_id] = child
            intervals.extend(child.intervals)
            spans.extend(child.spans)
        else:
            if step.fork_id not in children:
                raise ValueError(f"join of fork {step.fork_id}, which was not forked before")
            clock = max(clock, children[step.fork_id].end)
    return Schedule(clock, tuple(intervals), (Interval(agent, start, clock), *spans))


def critical_path(timeline: Timeline) -> int:
    """``T``: the organizer's clock at the end of the episode, in decoded tokens."""
    return schedule(timeline).end


def concurrency(timeline: Timeline) -> float:
    """``η``: mean number of agents decoding per step over ``[0, T)``; 0 for an empty episode."""
    sched = schedule(timeline)
    total = sched.end
    if total == 0:
        return 0.0
    busy = sum(max(0, min(iv.end, total) - iv.start) for iv in sched.intervals)
    return busy / total


def parallel_metrics(lengths: list[int]) -> tuple[int, float]:
    """``(T, η)`` for parallel thinking: k independent traces; latency is the longest trace."""
    total = max(lengths, default=0)
    return total, (sum(lengths) / total if total else 0.0)


def tokens_decoded(timeline: Timeline) -> int:
    """All tokens decoded by the agent and its descendants (the compute cost, not the latency)."""
    n = 0
    for step in timeline.steps:
        if isinstance(step, Decode):
            n += step.tokens
        elif isinstance(step, ForkStep):
            n += tokens_decoded(step.child)
    return n
