"""Timelines as the pages and the CLI draw them: lanes, arrows, the critical path, live from events."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.agents import ListSink
from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine, EngineConfig
from shared.metrics import Decode, ForkStep, Interval, JoinStep, Timeline, critical_path, schedule
from shared.tasks import get_task
from shared.trace import LiveTrace, critical_intervals, layout, stored_layout

# The worked example of docs/design.md ("Measures"): 10 tokens, fork worker 1 (30 tokens), 5 more, join, 6 answer tokens: T = 46.
EXAMPLE = Timeline.of(Decode(10), ForkStep(1, Timeline.of(Decode(30))), Decode(5), JoinStep(1), Decode(6))


def test_the_worked_example() -> None:
    assert critical_intervals(EXAMPLE) == [Interval("organizer", 0, 10), Interval("1", 10, 40), Interval("organizer", 40, 46)]
    view = layout(EXAMPLE)
    assert view.latency == 46
    assert [(lane.agent, lane.start, lane.end, lane.tokens) for lane in view.lanes] == [("organizer", 0, 46, 21), ("1", 10, 40, 30)]
    fork, join = view.arrows
    assert (fork.kind, fork.at, join.kind, join.reached, join.child_at, join.at) == ("fork", 10, "join", 15, 40, 40)


def test_a_join_that_does_not_wait_keeps_the_organizer_on_the_path() -> None:
    fast = Timeline.of(Decode(10), ForkStep(1, Timeline.of(Decode(3))), Decode(5), JoinStep(1), Decode(6))
    assert critical_intervals(fast) == [Interval("organizer", 0, 10), Interval("organizer", 10, 15), Interval("organizer", 15, 21)]


def test_a_worker_that_forks_puts_its_child_on_the_path() -> None:
    child = Timeline.of(Decode(2), ForkStep(1, Timeline.of(Decode(20))), JoinStep(1), Decode(1))
    tl = Timeline.of(Decode(4), ForkStep(1, child), JoinStep(1), Decode(2))
    path = critical_intervals(tl)
    assert [iv.agent for iv in path] == ["organizer", "1", "1.1", "1", "organizer"]
    assert sum(iv.end - iv.start for iv in path) == critical_path(tl) == 29


@st.composite
def timelines(draw: st.DrawFn, depth: int = 0) -> Timeline:
    steps: list = []
    open_: list[int] = []
    next_id = 1
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 2))
        if choice == 0 or depth >= 2:
            steps.append(Decode(draw(st.integers(0, 30))))
        elif choice == 1:
            steps.append(ForkStep(next_id, draw(timelines(depth + 1))))
            open_.append(next_id)
            next_id += 1
        elif open_:
            steps.append(JoinStep(open_.pop(draw(st.integers(0, len(open_) - 1)))))
    return Timeline(tuple(steps))


@settings(max_examples=300, deadline=None)
@given(timelines())
def test_the_critical_path_adds_up_to_t_and_lies_on_decoded_tokens(tl: Timeline) -> None:
    path = critical_intervals(tl)
    assert sum(iv.end - iv.start for iv in path) == critical_path(tl)
    decoded = {(iv.agent, t) for iv in schedule(tl).intervals for t in range(iv.start, iv.end)}
    on_path = [(iv.agent, t) for iv in path for t in range(iv.start, iv.end)]
    assert set(on_path) <= decoded and len(on_path) == len(set(on_path))
    assert sorted(t for _, t in on_path) == list(range(critical_path(tl)))  # one agent per step, no gaps
    assert layout(tl).latency == critical_path(tl)


def test_live_events_rebuild_the_stored_timeline() -> None:
    organizer = "<FORK-1>a</FORK-1><FORK-2@python>6*7</FORK-2>thinking<JOIN-1>more<JOIN-2><ANSWER>x</ANSWER>"
    backend = ScriptedBackend({"organizer": organizer, "1": "<RETURN>a long think of a worker</RETURN>"})
    sink = ListSink()
    from services.workers.tools import local_endpoints

    engine = Engine(backend, get_task("chat"), EngineConfig(capacity=3), endpoints=local_endpoints(), sink=sink)
    problem = get_task("chat").problem_from_payload({"prompt": "hi"})
    result = asyncio.run(engine.run(problem, episode_id="e"))
    live = LiveTrace()
    for event in sink.events:
        live.add(event)
    assert live.finished and live.timeline() == result.timeline
    drawn = live.layout()
    stored = stored_layout(result.timeline.to_json(), result.segments)
    assert (drawn.latency, drawn.critical, drawn.bars) == (stored.latency, stored.critical, stored.bars)
    assert {lane.agent for lane in stored.lanes} == {"organizer", "1", "2"}
    assert stored.lane("2").kind == "tool" and stored.lane("1").kind == "model"  # type: ignore[union-attr]


def test_a_live_trace_grows_while_a_worker_streams() -> None:
    from shared.messages import EpisodeEvent, EventKind

    live = LiveTrace()

    def ev(kind: EventKind, agent: str, clock: int, **data: object) -> EpisodeEvent:
        return EpisodeEvent(episode_id="e", kind=kind, agent=agent, clock=clock, data=data)

    live.add(ev(EventKind.STARTED, "organizer", 0, mode="asyncthink"))
    live.add(ev(EventKind.FORK, "organizer", 5, fork_id=1, query="q", endpoint=None))
    for _ in range(7):
        live.add(ev(EventKind.TEXT, "1", 0, text="tok", injected=False))
    live.add(ev(EventKind.JOIN, "organizer", 8, fork_id=1))
    view = live.layout()
    assert view.live and view.latency == 12 and view.lane("1").running  # type: ignore[union-attr]


def test_the_png(tmp_path: Path) -> None:
    from shared.trace_plot import plot_trace

    out = plot_trace(layout(EXAMPLE), tmp_path / "t.png", title="example")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
