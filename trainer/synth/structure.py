"""Structure initialization: random organizer action skeletons for cold-start trace synthesis.

The paper (arXiv 2510.26658, §4) put randomly sampled organizer action sequences into its synthesis
prompt so that the format-SFT data shows many thinking topologies. A :class:`Skeleton` is such a
sequence over ``n_tasks`` sub-tasks (units of work, e.g. "the solutions whose first step combines one
pair of numbers"): each unit is either forked to a worker (``FORK``, later ``JOIN``) or done by the
organizer itself (``WORK``), in some order. Topologies sampled by :func:`sample_skeleton`:

- ``interleaved``: fork a unit, maybe do the next unit meanwhile, join, repeat;
- ``fork_all``: fork up to ``c - 1`` units at once, work meanwhile, then join them all (in a random order);
- ``pipelined``: keep the pool full; each join is followed by a new fork (forks issued after joins);
- ``random``: a random walk over the actions the capacity rule allows.

Every sampled skeleton has at least one fork, joins every fork, and never has more than ``c - 1``
workers active, so it is valid under :class:`shared.protocol.ProtocolParser` at capacity ``c``
(:func:`skeleton_errors` checks that by rendering it with placeholder text). Sampling is pure and
deterministic given the ``random.Random`` passed in.

Limits: a skeleton says *who* does each unit and *when*; it does not say how long any of it takes, and
the units are taken in a fixed order (unit ``k`` is started before unit ``k + 1``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from shared.protocol import Answer, Fork, Join, Role, Think, parse, render
from shared.tasks.base import Task

TOPOLOGIES = ("interleaved", "fork_all", "pipelined", "random")


class StepKind(StrEnum):
    FORK = "fork"  # start a worker on a unit
    JOIN = "join"  # wait for a worker and read its result
    WORK = "work"  # the organizer does a unit itself


@dataclass(frozen=True)
class Step:
    kind: StepKind
    fork_id: int | None = None  # FORK and JOIN: the i of <FORK-i> / <JOIN-i>
    unit: int | None = None  # FORK and WORK: the index of the unit (0-based)

    def describe(self) -> str:
        if self.kind is StepKind.FORK:
            return f"FORK-{self.fork_id} (task {self.unit})"
        if self.kind is StepKind.JOIN:
            return f"JOIN-{self.fork_id}"
        return f"THINK (task {self.unit})"


@dataclass(frozen=True)
class Skeleton:
    steps: tuple[Step, ...]
    capacity: int  # the pool size c the skeleton respects
    topology: str  # which sampler made it

    @property
    def n_tasks(self) -> int:
        return sum(s.kind is not StepKind.JOIN for s in self.steps)

    @property
    def n_forks(self) -> int:
        return sum(s.kind is StepKind.FORK for s in self.steps)

    def fork_of_unit(self) -> dict[int, int]:
        """unit index -> fork id, for the forked units."""
        return {
            s.unit: s.fork_id
            for s in self.steps
            if s.kind is StepKind.FORK and s.unit is not None and s.fork_id is not None
        }

    def describe(self) -> str:
        """One line for a synthesis prompt: ``FORK-1 (task 0), THINK (task 1), JOIN-1, ..., ANSWER``."""
        return ", ".join([s.describe() for s in self.steps] + ["ANSWER"])

    def max_active(self) -> int:
        active, most = 0, 0
        for s in self.steps:
            active += {StepKind.FORK: 1, StepKind.JOIN: -1, StepKind.WORK: 0}[s.kind]
            most = max(most, active)
        return most


def skeleton_errors(skeleton: Skeleton) -> list[str]:
    """Problems with a skeleton: it is rendered with placeholder text and run through the protocol
    parser at its capacity; a fork that is never joined is reported too (the parser allows it, but a
    teacher needs every worker's result). Empty when the skeleton is valid."""
    actions: list[Think | Fork | Join | Answer] = [Think("plan\n")]
    for s in skeleton.steps:
        if s.kind is StepKind.FORK:
            assert s.fork_id is not None
            actions.append(Fork(s.fork_id, f"task {s.unit}"))
        elif s.kind is StepKind.JOIN:
            assert s.fork_id is not None
            actions.append(Join(s.fork_id))
        else:
            actions.append(Think(f"task {s.unit}\n"))
    actions.append(Answer("done"))
    results = {s.fork_id: "result" for s in skeleton.steps if s.fork_id is not None}
    _, errors = parse(render(actions, results), Role.ORGANIZER, capacity=skeleton.capacity)
    problems = [f"{e.kind.value}: {e.message}" for e in errors]
    forked = {s.fork_id for s in skeleton.steps if s.kind is StepKind.FORK}
    joined = {s.fork_id for s in skeleton.steps if s.kind is StepKind.JOIN}
    if forked - joined:
        problems.append(f"forks never joined: {sorted(i for i in forked - joined if i is not None)}")
    return problems


class _Builder:
    def __init__(self, capacity: int) -> None:
        self.steps: list[Step] = []
        self.active: list[int] = []  # fork ids, oldest first
        self.next_unit = 0
        self.next_fork = 1
        self.capacity = capacity

    def fork(self) -> None:
        self.steps.append(Step(StepKind.FORK, fork_id=self.next_fork, unit=self.next_unit))
        self.active.append(self.next_fork)
        self.next_fork += 1
        self.next_unit += 1

    def work(self) -> None:
        self.steps.append(Step(StepKind.WORK, unit=self.next_unit))
        self.next_unit += 1

    def join(self, fork_id: int) -> None:
        self.active.remove(fork_id)
        self.steps.append(Step(StepKind.JOIN, fork_id=fork_id))

    @property
    def free(self) -> int:
        return self.capacity - 1 - len(self.active)


def sample_skeleton(
    rng: random.Random,
    capacity: int,
    n_tasks: int,
    topology: str | None = None,
    *,
    fork_prob: float = 0.8,
    work_prob: float = 0.9,
) -> Skeleton:
    """A random valid skeleton over ``n_tasks`` units at capacity ``c`` (``capacity >= 2``).

    ``topology`` is one of :data:`TOPOLOGIES` (random when None). ``fork_prob`` is the chance that the
    organizer forks the next unit rather than doing it itself when no worker is running (the first
    fork always happens); ``work_prob`` the chance that it does a unit itself while workers run rather
    than joining at once. At least one unit is always forked.
    """
    if capacity < 2:
        raise ValueError(f"a skeleton with forks needs capacity >= 2 (organizer + a worker), got {capacity}")
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    if topology is None:
        topology = rng.choice(TOPOLOGIES)
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}")
    b = _Builder(capacity)

    def left() -> int:
        return n_tasks - b.next_unit

    def maybe_work_first() -> None:
        # after the first fork, the organizer may do units of its own with no worker running
        while left() > 1 and rng.random() > fork_prob and b.next_fork > 1:
            b.work()

    def last_is_own() -> bool:
        # forking the very last unit leaves the organizer nothing to do meanwhile: usually do it itself
        return left() == 1 and b.next_fork > 1 and rng.random() < work_prob

    if topology == "interleaved":
        while left():
            maybe_work_first()
            if last_is_own():
                b.work()
                break
            b.fork()
            fid = b.active[-1]
            while left() and rng.random() < work_prob:
                b.work()
                if rng.random() < 0.7:
                    break
            b.join(fid)
    elif topology == "fork_all":
        while left():
            maybe_work_first()
            if last_is_own():
                b.work()
                break
            while left() and b.free > 0 and (not b.active or rng.random() < 0.8):
                b.fork()
            wave = len(b.active)
            for _ in range(wave):
                if left() and rng.random() < work_prob:
                    b.work()
            order = list(b.active)
            if rng.random() < 0.5:
                rng.shuffle(order)
            for fid in order:
                b.join(fid)
    elif topology == "pipelined":
        while left():
            if b.free == 0:
                if rng.random() < work_prob:
                    b.work()
                    if not left():
                        break
                b.join(b.active[0])
            if last_is_own():
                b.work()
                break
            b.fork()
        for fid in list(b.active):
            b.join(fid)
    else:  # a random walk over the allowed actions
        while left() or b.active:
            weights = {
                "fork": 1.0 if left() and b.free > 0 else 0.0,
                "work": (2.0 if b.active else 0.5) * work_prob if left() and b.next_fork > 1 else 0.0,
                "join": (1.0 if left() else 2.0) if b.active else 0.0,
            }
            if weights["fork"] and last_is_own():
                weights["fork"] = 0.0
                weights["work"] = 1.0
            choice = rng.choices(list(weights), weights=list(weights.values()))[0]
            if choice == "fork":
                b.fork()
            elif choice == "work":
                b.work()
            else:
                b.join(b.active[rng.randrange(len(b.active))])
    return Skeleton(tuple(b.steps), capacity, topology)


def sequential_skeleton(n_tasks: int) -> Skeleton:
    """Every unit done by the organizer itself, in order: the shape of a sequential trace."""
    return Skeleton(tuple(Step(StepKind.WORK, unit=u) for u in range(n_tasks)), 1, "sequential")


@dataclass
class SkeletonTeacher:
    """What the programmatic teachers share: the pool and skeleton settings, and what they counted."""

    task: Task
    capacity: int = 2  # pool size c of the AsyncThink traces
    topologies: tuple[str, ...] | None = None  # skeleton samplers to draw from; None = all
    fork_prob: float = 0.8  # skeleton: chance to fork the next unit when no worker runs
    work_prob: float = 0.9  # skeleton: chance the organizer works while a worker runs
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> traces dropped
    partial: Counter[str] = field(default_factory=Counter)  # kind -> kept traces answering with fewer parts

    def skeleton(self, rng: random.Random, n_tasks: int) -> Skeleton:
        """A skeleton over ``n_tasks`` units from one of ``topologies`` (any when None)."""
        topology = rng.choice(self.topologies) if self.topologies else None
        return sample_skeleton(
            rng, self.capacity, n_tasks, topology, fork_prob=self.fork_prob, work_prob=self.work_prob
        )
