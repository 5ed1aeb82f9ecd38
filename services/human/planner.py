"""The model outside a running episode: proposing a fork/join plan, and answering as a lone worker.

* :func:`propose_plan` asks the organizer model what it would do with a problem: one dry run of the
  organizer whose forks are not executed (every worker answers ``[planning: not run]`` at once, so joins
  return immediately); the forks and joins of its text, in order, are the proposed skeleton. Nothing is
  stored; the proposal is a draft for a person to edit. Costs one organizer decode.
* :class:`LocalModelWorker` is the model as a :class:`~shared.agents.WorkerEndpoint` on a given backend
  (the embedded setup's model fallback of the human queue; the distributed setup uses the Celery model
  queue instead).
"""

from __future__ import annotations

import uuid

from shared.agents import AgentRunner, NullSink, WorkerEndpoint, worker_segment
from shared.backends.base import ModelBackend
from shared.engine import Engine, EngineConfig
from shared.episode import EpisodeSettings
from shared.messages import WorkerOutcome, WorkerTask
from shared.plans import Plan, plan_from_text
from shared.tasks import get_task
from shared.tasks.base import Problem
from shared.tasks.prompts import for_model

NOT_RUN = "[planning: not run]"


class _NotRun:
    async def run(self, task: WorkerTask) -> WorkerOutcome:
        return WorkerOutcome(returned=NOT_RUN, segments=[worker_segment(task, returned=NOT_RUN)])


async def propose_plan(
    backend: ModelBackend, problem: Problem, settings: EpisodeSettings, endpoint_names: list[str]
) -> tuple[Plan, str]:
    """The model's proposed skeleton for ``problem`` and the organizer text it was read from."""
    stub = _NotRun()
    endpoints: dict[str | None, WorkerEndpoint] = {None: stub, **dict.fromkeys(endpoint_names, stub)}
    config = EngineConfig.of(settings.model_copy(update={"stream_text": False}))
    engine = Engine(backend, get_task(problem.task), config, endpoints=endpoints, sink=NullSink())
    result = await engine.run(problem, episode_id=f"plan-{uuid.uuid4().hex}")
    organizer = next((s for s in result.segments if s.role == "organizer"), None)
    text = organizer.text if organizer is not None else ""
    return plan_from_text(text), text


class LocalModelWorker:
    """The model thinking about one sub-query alone, on ``backend`` (see the module docstring)."""

    def __init__(self, backend: ModelBackend) -> None:
        self.backend = backend

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        prompted = for_model(get_task(task.task), self.backend, task.capacity)
        return await AgentRunner(self.backend, prompted).endpoints[None].run(task)
