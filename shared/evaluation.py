"""Evaluation: run many episodes concurrently, summarise accuracy, latency and concurrency, plot them.

``run_episodes`` runs a list of problems through one engine with bounded concurrency (so a batching
backend sees many sequences at once) and hands every result to a callback (the CLI stores it and
advances a progress bar). ``summarize`` turns results into the metrics the README defines: accuracy
(and for countdown ≥1, ≥2, ≥3, all correct), mean critical-path latency T, mean η/c, format-error rate,
forks per episode and wall time. ``plot_accuracy_latency`` draws accuracy against mean T, one point
per mode; ``plot_accuracy_latency_curves`` one curve per mode from a sweep over token budgets, so
modes are compared at equal critical-path latency (read off the x axis), not at equal budgets.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared.engine import Engine, EpisodeResult
from shared.messages import EpisodeStatus
from shared.tasks.base import Problem


async def run_episodes(
    engine: Engine,
    problems: Sequence[Problem],
    *,
    concurrency: int = 16,
    on_result: Callable[[EpisodeResult], None] | None = None,
) -> list[EpisodeResult]:
    """Run every problem once; results come back in the order of ``problems``."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)

    async def one(problem: Problem) -> EpisodeResult:
        async with gate:
            result = await engine.run(problem)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(p) for p in problems)))


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def summarize(task: str, results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Metrics for one task and mode; percentages are 0-100."""
    n = len(results)
    scores = [r.score for r in results]
    out: dict[str, Any] = {
        "episodes": n,
        "accuracy": 100.0 * _mean([s.accuracy if s else 0.0 for s in scores]),
        "mean_latency": _mean([r.latency for r in results]),
        "mean_eta_over_c": 100.0 * _mean([r.eta_over_c for r in results]),
        "format_error_rate": 100.0 * _mean([1.0 if r.status is EpisodeStatus.FORMAT_ERROR else 0.0 for r in results]),
        "failed": sum(1 for r in results if r.status is EpisodeStatus.FAILED),
        "forks_per_episode": _mean([r.forks for r in results]),
        "mean_reward": _mean([r.rewards.total for r in results]),
        "mean_wall_time_s": _mean([r.wall_time_s for r in results]),
    }
    if task == "countdown":
        for k, name in ((1, "at_least_1"), (2, "at_least_2"), (3, "at_least_3")):
            out[name] = 100.0 * _mean([1.0 if s and s.correct >= k else 0.0 for s in scores])
        out["all_correct"] = 100.0 * _mean([1.0 if s and s.correct >= s.needed else 0.0 for s in scores])
    return out


_METRIC_LABELS = {"all_correct": "all correct", "at_least_1": "≥1 correct", "at_least_2": "≥2 correct",
                  "at_least_3": "≥3 correct"}


def plot_accuracy_latency(
    summaries: dict[str, dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    metrics: tuple[str, ...] = ("all_correct",),
) -> Path:
    """Accuracy against mean critical-path latency: one point per mode and metric.

    ``metrics``: summary keys to plot (countdown: ``all_correct``, ``at_least_1`` ...); a summary
    without the key falls back to ``accuracy``. Several metrics share the axes, one marker each.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5 if len(metrics) == 1 else 8.0, 4.2), dpi=120)
    markers = "os^Dv"
    colors = {mode: f"C{i}" for i, mode in enumerate(summaries)}
    for j, metric in enumerate(metrics):
        for mode, s in summaries.items():
            acc = s.get(metric, s["accuracy"])
            label = mode if len(metrics) == 1 else f"{mode}, {_METRIC_LABELS.get(metric, metric)}"
            ax.scatter([s["mean_latency"]], [acc], s=60, color=colors[mode], marker=markers[j % len(markers)],
                       label=label)
            if len(metrics) == 1:
                ax.annotate(mode, (s["mean_latency"], acc), textcoords="offset points", xytext=(6, 4))
    if len(metrics) > 1:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    right = max((s["mean_latency"] for s in summaries.values()), default=1.0)
    ax.set_xlim(0, right * 1.12)
    ax.set_xlabel("mean critical-path latency T (decoded tokens)")
    ylabel = ", ".join(_METRIC_LABELS.get(m, m) for m in metrics) if any(
        m in s for m in metrics for s in summaries.values()) else "accuracy"
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title or "accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_latency_curves(
    curves: dict[str, list[dict[str, Any]]],
    path: str | Path,
    *,
    title: str = "",
    metrics: tuple[str, ...] = ("all_correct",),
) -> Path:
    """Accuracy against mean critical-path latency, one line per mode through its budget sweep.

    ``curves`` maps a mode to its summaries (:func:`summarize`, plus ``organizer_budget``), one per
    budget; points are joined in order of mean T and labelled with their budget. One panel per metric
    (a summary without the key falls back to ``accuracy``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 4.2), dpi=120, squeeze=False)
    right = max((p["mean_latency"] for pts in curves.values() for p in pts), default=1.0)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, (mode, points) in enumerate(curves.items()):
            pts = sorted(points, key=lambda p: p["mean_latency"])
            xs = [p["mean_latency"] for p in pts]
            ys = [p.get(metric, p["accuracy"]) for p in pts]
            ax.plot(xs, ys, marker="os^Dv"[i % 5], color=f"C{i}", label=mode)
            for p, x, y in zip(pts, xs, ys, strict=True):
                if "organizer_budget" in p:
                    ax.annotate(str(p["organizer_budget"]), (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=f"C{i}")
        ax.set_xlim(0, right * 1.12)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("mean critical-path latency T (decoded tokens)")
        ax.set_ylabel(f"{_METRIC_LABELS.get(metric, metric)} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "accuracy vs latency as the budget grows (labels: organizer budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
