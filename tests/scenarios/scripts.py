"""The scenario suite's data: scripted episodes and what each must produce, written once for every setup.

Each :class:`Scenario` gives the text every agent generates (the scripted backend replays it, one
character per token) and the expected outcome: status, answer, ``T`` and ``η`` (as the README's Metrics section defines them, derived
below from the script pieces, so the arithmetic is visible), the workers' takeaways and the
organizer's events in order.

:class:`ScenarioBackend` serves every scenario from one backend: an episode id is
``<scenario name>--<random>``, and each request is routed by its ``session`` (the episode id) to that
scenario's script. The Celery worker processes of the distributed setup load the same scripts through
``ASYNCTHINK_BACKEND_FACTORY=tests.scenarios.scripts:backend_factory``, so organizer and workers agree
on every text without sharing memory.

Problem for all scenarios: countdown, numbers 1 2 3 4, target 10, two distinct solutions wanted
(``1+2+3+4``, ``2*3+4``, ``4*3-2``, ``(1+4)*2`` and ``2*4+3-1`` are all distinct and correct).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.backends.base import GenerateRequest
from shared.backends.scripted import ScriptedBackend, ScriptRouter
from shared.episode import EpisodeSettings

PAYLOAD: dict[str, Any] = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 2}
WORKER_BUDGET = 64  # tokens per worker; also what a timed-out worker is charged on the clock
WORKER_TIMEOUT_S = 1.5  # the setups' worker timeout; only the slow worker of "worker_timeout" hits it
SLOW_TOKENS_PER_S = 10.0  # the slow worker: 40 tokens take 4 s, far past the timeout


@dataclass(frozen=True)
class Scenario:
    name: str
    script: dict[str, str]  # agent -> the text it generates (injected join results excluded)
    status: str  # completed | format_error | failed
    answer: str | None
    accuracy: float
    latency: int  # T
    eta: float  # η
    organizer_events: list[str]  # kinds of the events about the organizer (or the traces), in order
    returned: dict[str, str] = field(default_factory=dict)  # worker agent -> its takeaway (what Join injects)
    worker_errors: dict[str, str] = field(default_factory=dict)  # worker agent -> segment error
    worker_returns: list[str] = field(default_factory=list)  # workers that emit their own "return" event
    endpoints: dict[str, str | None] = field(default_factory=dict)  # worker agent -> endpoint
    format_error_kinds: list[str] = field(default_factory=list)
    mode: str = "asyncthink"
    capacity: int | None = None
    parallel_k: int = 4
    slow_agents: tuple[str, ...] = ()  # agents decoding at SLOW_TOKENS_PER_S

    def submission_fields(self) -> dict[str, Any]:
        return {
            "task": "countdown",
            "problem_id": f"scenario-{self.name}",
            "payload": PAYLOAD,
            "settings": EpisodeSettings(
                mode=self.mode,
                capacity=self.capacity,
                worker_budget=WORKER_BUDGET,
                parallel_k=self.parallel_k,
                temperature=0.0,
            ),
        }


def _n(*parts: str) -> int:
    return sum(len(p) for p in parts)


SCENARIOS: list[Scenario] = []

# 1. Fork, think, then join a worker that is still running: the clock jumps to the worker's end.
_O1 = "Two ways.<FORK-1>find a product route</FORK-1>"
_O2 = "Sum all: 1+2+3+4.<JOIN-1>"
_O3 = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"
_W1 = "2*3 is 6 and 6+4 is 10, done.<RETURN>2*3+4</RETURN>"
assert len(_W1) > len(_O2)  # the join waits
SCENARIOS.append(
    Scenario(
        name="fork_join",
        script={"organizer": _O1 + _O2 + _O3, "1": _W1},
        status="completed",
        answer="1+2+3+4; 2*3+4",
        accuracy=1.0,
        latency=_n(_O1) + max(_n(_O2), _n(_W1)) + _n(_O3),
        eta=_n(_O1, _O2, _W1, _O3) / (_n(_O1) + _n(_W1) + _n(_O3)),
        organizer_events=["started", "fork", "join", "worker_result", "answer", "finished"],
        returned={"1": "2*3+4"},
        worker_returns=["1"],
    )
)

# 2. Two overlapping workers with capacity 3 (organizer + 2 workers), joined in order.
_O1 = "<FORK-1>products</FORK-1>"
_O2 = "<FORK-2>sums with a product</FORK-2>"
_O3 = "wait.<JOIN-1>"
_O4 = "<JOIN-2>"
_O5 = "<ANSWER>(1+4)*2; 4*3-2</ANSWER>"
_W1 = "(1+4)*2 works<RETURN>(1+4)*2</RETURN>"
_W2 = "4*3 is 12, minus 2 gives 10, checked twice<RETURN>4*3-2</RETURN>"
_c1 = max(_n(_O1, _O2, _O3), _n(_O1) + _n(_W1))  # clock after JOIN-1
_c2 = max(_c1 + _n(_O4), _n(_O1, _O2) + _n(_W2))  # clock after JOIN-2
SCENARIOS.append(
    Scenario(
        name="overlap_capacity_3",
        script={"organizer": _O1 + _O2 + _O3 + _O4 + _O5, "1": _W1, "2": _W2},
        status="completed",
        answer="(1+4)*2; 4*3-2",
        accuracy=1.0,
        latency=_c2 + _n(_O5),
        eta=_n(_O1, _O2, _O3, _O4, _O5, _W1, _W2) / (_c2 + _n(_O5)),
        organizer_events=[
            "started", "fork", "fork", "join", "worker_result", "join", "worker_result", "answer", "finished",
        ],
        returned={"1": "(1+4)*2", "2": "4*3-2"},
        worker_returns=["1", "2"],
        capacity=3,
    )
)

# 3. Join a worker that finished long before: no clock jump.
_O1 = "<FORK-1>q</FORK-1>"
_O2 = "Meanwhile I check 1+2+3+4 = 10 by hand, step by step.<JOIN-1>"
_O3 = "<ANSWER>2*4+3-1; 1+2+3+4</ANSWER>"
_W1 = "ok<RETURN>2*4+3-1</RETURN>"
assert len(_W1) < len(_O2)
SCENARIOS.append(
    Scenario(
        name="join_finished_worker",
        script={"organizer": _O1 + _O2 + _O3, "1": _W1},
        status="completed",
        answer="2*4+3-1; 1+2+3+4",
        accuracy=1.0,
        latency=_n(_O1, _O2, _O3),
        eta=_n(_O1, _O2, _O3, _W1) / _n(_O1, _O2, _O3),
        organizer_events=["started", "fork", "join", "worker_result", "answer", "finished"],
        returned={"1": "2*4+3-1"},
        worker_returns=["1"],
    )
)

# 4. Sequential thinking: one trace, T = its length, η = 1. The answer repeats one solution: 1/2.
_S = "Only sums here. <ANSWER>1+2+3+4; 4+3+2+1</ANSWER>"
SCENARIOS.append(
    Scenario(
        name="sequential",
        script={"organizer": _S},
        status="completed",
        answer="1+2+3+4; 4+3+2+1",
        accuracy=0.5,
        latency=len(_S),
        eta=1.0,
        organizer_events=["started", "answer", "finished"],
        mode="sequential",
    )
)

# 5. Parallel thinking: 3 independent traces, vote; T = the longest trace, η = total / longest.
_P = {
    "trace-1": "a<ANSWER>1+2+3+4; 2*3+4</ANSWER>",
    "trace-2": "the longest of the three traces<ANSWER>2*3+4; 4*3-2</ANSWER>",
    "trace-3": "<ANSWER>2*3+4</ANSWER>",
}
_longest = max(len(t) for t in _P.values())
SCENARIOS.append(
    Scenario(
        name="parallel",
        script=dict(_P),
        status="completed",
        answer="2*3+4; 1+2+3+4; 4*3-2",  # by votes (3, 1, 1); ties keep the first seen
        accuracy=1.0,
        latency=_longest,
        eta=sum(len(t) for t in _P.values()) / _longest,
        organizer_events=["started", "finished"],
        mode="parallel",
        parallel_k=3,
    )
)

# 6. Format error: a join of an id never forked ends the episode at once.
_F = "Join first.<JOIN-7>"
SCENARIOS.append(
    Scenario(
        name="format_error_join_unknown",
        script={"organizer": _F + "<ANSWER>1+2+3+4</ANSWER>"},
        status="format_error",
        answer=None,
        accuracy=0.0,
        latency=len(_F),
        eta=1.0,
        organizer_events=["started", "format_error", "finished"],
        format_error_kinds=["join_unknown"],
    )
)

# 7. A worker that times out: it is charged its whole budget on the clock; the episode goes on.
_O1 = "<FORK-1>slow</FORK-1>"
_O2 = "short.<JOIN-1>"
_O3 = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"
_W1 = "thinking very slowly...<RETURN>x</RETURN>"
SCENARIOS.append(
    Scenario(
        name="worker_timeout",
        script={"organizer": _O1 + _O2 + _O3, "1": _W1},
        status="completed",
        answer="1+2+3+4; 2*3+4",
        accuracy=1.0,
        latency=_n(_O1) + max(_n(_O2), WORKER_BUDGET) + _n(_O3),
        eta=(_n(_O1, _O2, _O3) + WORKER_BUDGET) / (_n(_O1) + max(_n(_O2), WORKER_BUDGET) + _n(_O3)),
        organizer_events=["started", "fork", "join", "worker_result", "answer", "finished"],
        returned={"1": f"[worker 1 timed out after {WORKER_TIMEOUT_S:g}s]"},
        worker_errors={"1": "timeout"},
        slow_agents=("1",),
    )
)

# 8. A tool fork: the python worker evaluates the expression; a tool decodes nothing (no clock cost).
_O1 = "<FORK-1@python>2*3+4</FORK-1>"
_O2 = "<JOIN-1>"
_O3 = "<ANSWER>2*3+4; 1+2+3+4</ANSWER>"
SCENARIOS.append(
    Scenario(
        name="python_tool",
        script={"organizer": _O1 + _O2 + _O3},
        status="completed",
        answer="2*3+4; 1+2+3+4",
        accuracy=1.0,
        latency=_n(_O1, _O2, _O3),
        eta=1.0,
        organizer_events=["started", "fork", "join", "worker_result", "answer", "finished"],
        returned={"1": "2*3+4 = 10"},
        endpoints={"1": "python"},
    )
)

# 9. The verify tool: candidates checked against the problem the query carries; only the ok ones are kept.
_O1 = "<FORK-1@verify>1 2 3 4 -> 10: 2*3+4; 4+3*2; 10; 1+2+3*4</FORK-1>"
_O2 = "<JOIN-1>"
_O3 = "<ANSWER>2*3+4</ANSWER>"
SCENARIOS.append(
    Scenario(
        name="verify_tool",
        script={"organizer": _O1 + _O2 + _O3},
        status="completed",
        answer="2*3+4",
        accuracy=0.5,
        latency=_n(_O1, _O2, _O3),
        eta=1.0,
        organizer_events=["started", "fork", "join", "worker_result", "answer", "finished"],
        returned={"1": "ok 2*3+4; no 4+3*2: same as 2*3+4; no 10: uses 10, which is not given; "
                       "no 1+2+3*4: evaluates to 15, not 10"},
        endpoints={"1": "verify"},
    )
)

BY_NAME = {s.name: s for s in SCENARIOS}


def scenario_of(episode_id: str | None) -> Scenario:
    name = (episode_id or "").split("--", 1)[0]
    if name not in BY_NAME:
        raise KeyError(f"episode id {episode_id!r} names no scenario; known: {sorted(BY_NAME)}")
    return BY_NAME[name]


class ScenarioBackend(ScriptRouter):
    """Routes each request by its episode id to the scenario's :class:`ScriptedBackend` (see module doc)."""

    model_id = "scripted-scenarios"

    def __init__(self, tokens_per_s: float | None = None) -> None:
        self._fast = {s.name: ScriptedBackend(s.script, tokens_per_s=tokens_per_s) for s in SCENARIOS}
        self._slow = {s.name: ScriptedBackend(s.script, tokens_per_s=SLOW_TOKENS_PER_S) for s in SCENARIOS}

    def route(self, request: GenerateRequest) -> ScriptedBackend:
        scenario = scenario_of(request.session)
        pool = self._slow if request.tag in scenario.slow_agents else self._fast
        return pool[scenario.name]


def backend_factory(settings: object = None) -> ScenarioBackend:
    """``ASYNCTHINK_BACKEND_FACTORY`` target for the worker processes of the distributed setup."""
    return ScenarioBackend()
