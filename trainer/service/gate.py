"""The gate: a candidate and the serving version on the same fixed held-out problems, then the decision.

:func:`evaluate` runs the first ``eval_problems`` problems of the task's test split through the core
engine on an in-process transformers backend loaded from a checkpoint directory, greedily (temperature
0, a fixed seed) with the service's episode settings, and returns the mean accuracy, mean total reward,
format-error and failure rates, mean critical-path latency and the per-problem accuracies.
:func:`fingerprint` names that evaluation, so a version's score is computed once and reused when it is
the serving side of a later gate. :func:`decide` publishes a candidate only if its metric is at least the
serving version's minus the tolerance.

Limits: evaluation runs on the trainer's device (the served engine, e.g. SGLang, may batch and round
differently; the check after a swap covers that); a small held-out set is noisy, so the tolerance is a
trade-off between blocking good versions and letting a regression through.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from shared.engine import Engine, EngineConfig
from shared.episode import EpisodeSettings
from shared.messages import EpisodeStatus
from shared.tasks.base import Problem, Task

GATE_SEED = 0


def gate_settings(settings: EpisodeSettings) -> EpisodeSettings:
    """The gate's episode settings: the service's, greedy and seeded."""
    return settings.model_copy(update={"temperature": 0.0, "seed": GATE_SEED, "stream_text": False})


def fingerprint(task: str, problems: list[Problem], settings: EpisodeSettings) -> str:
    body = json.dumps(
        {"task": task, "problems": [p.id for p in problems], "settings": gate_settings(settings).model_dump(mode="json")},
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def summarize(results: list[Any]) -> dict[str, Any]:
    """Means over engine results (or anything with the same fields)."""
    n = len(results)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {
        "n": n,
        "accuracy": mean([r.rewards.accuracy for r in results]),
        "reward": mean([r.rewards.total for r in results]),
        "format_error_rate": mean([1.0 if r.rewards.format_error else 0.0 for r in results]),
        "failed_rate": mean([1.0 if r.status is EpisodeStatus.FAILED else 0.0 for r in results]),
        "latency_T": mean([float(r.latency) for r in results]),
        "per_problem": {r.problem.id: r.rewards.accuracy for r in results},
    }


async def evaluate(
    path: Path, version: str, task: Task, problems: list[Problem], settings: EpisodeSettings, *, device: str = "cpu"
) -> dict[str, Any]:
    """Held-out scores of the checkpoint at ``path`` (see the module docstring)."""
    from shared.backends.transformers_backend import TransformersBackend

    t0 = time.monotonic()
    backend = await asyncio.to_thread(TransformersBackend, path, device=device, version=version)
    try:
        engine = Engine(backend, task, EngineConfig.of(gate_settings(settings)))
        results = await asyncio.gather(*(engine.run(p, episode_id=f"gate-{version}-{p.id}") for p in problems))
    finally:
        await backend.aclose()
    out = summarize(list(results))
    out["seconds"] = time.monotonic() - t0
    out["version"] = version
    return out


def decide(candidate: dict[str, Any], serving: dict[str, Any], *, metric: str, tolerance: float) -> dict[str, Any]:
    """The gate's record: both scores, the delta, and whether the candidate may be published."""
    delta = float(candidate[metric]) - float(serving[metric])
    return {
        "metric": metric,
        "tolerance": tolerance,
        "candidate": {k: v for k, v in candidate.items() if k != "per_problem"},
        "serving": {k: v for k, v in serving.items() if k != "per_problem"},
        "delta": delta,
        "passed": delta >= -tolerance,
    }
