"""Engines for episodes that people shape: a human organizer, and an approved fork/join plan.

:func:`engine_for` is what :func:`services.runtime.build_engine` returns; for a plain submission it is the
plain :class:`~shared.engine.Engine`. Two things change it:

* ``submission.organizer == "human"``: the organizer's text comes from a person
  (:class:`~services.human.organizer.HumanOrganizerBackend`, reading the input stream of the human
  queue's bus), and the stored organizer segment carries ``author="human"``;
* ``submission.plan``: the organizer runs with the approved plan in its context (:func:`plan_prompt`
  appended to its prompt: after the task's statement, and for a chat template at the start of the
  organizer's turn; prompt tokens, never trained on), and a fork whose id the plan names goes to the
  plan's endpoint with the plan's worker budget (a branch a person moved to a tool or to people goes
  there even when the organizer's tag leaves the endpoint out). The sub-query is the organizer's own
  words; where they differ from the plan, :func:`shared.plans.deviations` reports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.human.endpoint import human_endpoint_in
from services.human.organizer import HumanOrganizerBackend
from shared.agents import Checkpointer, EventSink, WorkerEndpoint, failed_outcome
from shared.backends.base import ModelBackend
from shared.engine import Engine, EngineConfig, EpisodeResult
from shared.messages import SegmentRecord, SubmitProblem, WorkerOutcome, WorkerTask
from shared.plans import Plan, plan_prompt
from shared.tasks.base import Mode, Problem, Task


@dataclass
class PlannedTask:
    """A task whose organizer prompt ends with an approved plan; everything else is the task's."""

    task: Any  # the task as the engine prompts it (possibly wrapped for the model's prompt style)
    plan: Plan
    name: str = field(init=False)
    default_capacity: int = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.task.name
        self.default_capacity = self.task.default_capacity

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        return str(self.task.organizer_prompt(problem, mode)) + plan_prompt(self.plan)

    def __getattr__(self, name: str) -> Any:  # worker_prompt, score, aggregate, problems, ...
        return getattr(self.task, name)


class PlanRoute:
    """Sends the organizer's fork ``i`` where the plan puts fork ``i`` (endpoint and worker budget)."""

    def __init__(self, plan: Plan, endpoints: Mapping[str | None, WorkerEndpoint]) -> None:
        self.forks = plan.forks()
        self.endpoints = dict(endpoints)

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        step = self.forks.get(task.fork_id) if task.depth == 1 else None
        if step is not None:
            update: dict[str, Any] = {"endpoint": step.endpoint}
            if step.budget:
                update["budget"] = step.budget
            task = task.model_copy(update=update)
        endpoint = self.endpoints.get(task.endpoint)
        if endpoint is None:
            return failed_outcome(task, "unknown_endpoint", returned=f"[no worker endpoint '{task.endpoint}']")
        return await endpoint.run(task)


class HumanOrganizedEngine(Engine):
    """An engine whose organizer is a person: the stored organizer segment says so (``author="human"``)."""

    async def run(
        self, problem: Problem, *, episode_id: str | None = None, resume_from: SegmentRecord | None = None
    ) -> EpisodeResult:
        # a person's episode is not resumed from a checkpoint: they carry on in the page instead
        result = await super().run(problem, episode_id=episode_id)
        for seg in result.segments:
            if seg.role == "organizer":
                seg.author = "human"
        return result


def engine_for(
    submission: SubmitProblem,
    backend: ModelBackend,
    task: Task,
    config: EngineConfig,
    endpoints: Mapping[str | None, WorkerEndpoint] | None,
    sink: EventSink,
    *,
    checkpointer: Checkpointer | None = None,
    recorder: Any = None,
) -> Engine:
    """The engine for one submission (see the module docstring); ``checkpointer`` keeps a model
    organizer's sequence for a resume (a person's episode is not resumed)."""
    if submission.organizer == "human":
        people = human_endpoint_in(endpoints or {})
        organizer = HumanOrganizerBackend(
            backend,
            people.bus if people is not None else None,
            submission.episode_id,
            idle_s=people.config.organizer_idle_s if people is not None else 1800.0,
        )
        engine: Engine = HumanOrganizedEngine(organizer, task, config, endpoints=endpoints, sink=sink)
    else:
        engine = Engine(
            backend, task, config, endpoints=endpoints, sink=sink, checkpointer=checkpointer, recorder=recorder
        )
    if submission.plan is not None and submission.plan.steps:
        planned = PlannedTask(engine.task, submission.plan)
        engine.task = planned  # type: ignore[assignment]
        engine.runner.task = planned  # type: ignore[assignment]
        route = PlanRoute(submission.plan, engine.runner.endpoints)
        engine.runner.endpoints = dict.fromkeys(engine.runner.endpoints, route)
    return engine
