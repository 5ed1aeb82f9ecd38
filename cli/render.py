"""Readable traces and tables for the terminal (rich), and the JSON form of an episode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shared.engine import EpisodeResult


def _organizer_text(text: str) -> Text:
    """Organizer text with tags highlighted."""
    import re

    out = Text()
    pos = 0
    for m in re.finditer(r"</?(?:FORK|JOIN)-\d+(?:@[\w.:-]+)?>|</?ANSWER>", text):
        out.append(text[pos : m.start()])
        tag = m.group(0)
        style = "bold cyan" if "FORK" in tag else "bold magenta" if "JOIN" in tag else "bold green"
        out.append(tag, style=style)
        pos = m.end()
    out.append(text[pos:])
    return out


def _metrics_line(latency: int, eta: float, capacity: int, wall: float, status: str) -> str:
    pct = 100.0 * eta / capacity if capacity else 0.0
    return f"T = {latency} tokens   η = {eta:.2f}   η/c = {pct:.1f}%   wall = {wall:.2f} s   status = {status}"


def _render(header: str, answer: str | None, detail: str, segments: Sequence[Any], metrics: str,
            errors: Sequence[dict[str, Any]]) -> Group:
    parts: list[Any] = [Text(header, style="bold")]
    for seg in segments:
        if seg.role == "organizer":
            title = f"{seg.agent} · {seg.generated_tokens} tokens decoded"
            parts.append(Panel(_organizer_text(seg.text or ""), title=title, title_align="left"))
    workers = [s for s in segments if s.role == "worker"]
    if workers:
        table = Table(title="workers", show_lines=False, title_justify="left")
        for col in ("fork", "sub-query", "takeaway", "tokens", "clock"):
            table.add_column(col)
        for w in workers:
            takeaway = w.returned if w.returned is not None else f"[{w.error or 'no return'}]"
            table.add_row(w.agent, (w.query or "").strip(), (takeaway or "").strip(), str(w.generated_tokens),
                          f"{w.clock_start}–{w.clock_end}")
        parts.append(table)
    for e in errors:
        parts.append(Text(f"format error: {e.get('kind')} at {e.get('agent')}:{e.get('offset')} — {e.get('message')}",
                          style="red"))
    parts.append(Text(f"answer: {answer}" + (f"   ({detail})" if detail else ""), style="bold green"))
    parts.append(Text(metrics))
    return Group(*parts)


def print_episode(result: EpisodeResult, console: Console | None = None) -> None:
    console = console or Console()
    detail = ""
    if result.score is not None:
        detail = f"accuracy {result.score.accuracy:.2f}, {result.score.correct}/{result.score.needed} correct"
    header = (f"episode {result.episode_id} · {result.problem.task} {result.problem.id} · {result.mode.value} · "
              f"c = {result.capacity} · model {result.model_id}@{result.model_version}")
    console.print(_render(header, result.answer, detail, result.segments,
                          _metrics_line(result.latency, result.eta, result.capacity, result.wall_time_s, result.status),
                          result.format_errors))
    if result.error:
        console.print(Text(f"error: {result.error}", style="red"))


def print_stored_episode(episode: Any, segments: Sequence[Any], console: Console | None = None) -> None:
    console = console or Console()
    header = (f"episode {episode.id} · {episode.task} · {episode.mode} · c = {episode.capacity} · "
              f"model {episode.model_id}@{episode.model_version}")
    detail = "" if episode.accuracy is None else f"accuracy {episode.accuracy:.2f}, reward {episode.reward_total:.2f}"
    console.print(_render(header, episode.answer, detail, segments,
                          _metrics_line(episode.latency or 0, episode.eta or 0.0, episode.capacity or 1,
                                        episode.wall_time_s or 0.0, episode.status),
                          episode.format_errors or []))


def episode_json(result: EpisodeResult) -> dict[str, Any]:
    return {
        "episode_id": result.episode_id,
        "task": result.problem.task,
        "problem_id": result.problem.id,
        "payload": result.problem.payload,
        "mode": result.mode.value,
        "capacity": result.capacity,
        "model": result.model_id,
        "model_version": result.model_version,
        "status": result.status,
        "answer": result.answer,
        "accuracy": result.score.accuracy if result.score else None,
        "rewards": {"accuracy": result.rewards.accuracy, "concurrency": result.rewards.concurrency,
                    "format_error": result.rewards.format_error, "total": result.rewards.total},
        "latency": result.latency,
        "eta": result.eta,
        "eta_over_c": result.eta_over_c,
        "wall_time_s": result.wall_time_s,
        "format_errors": result.format_errors,
        "segments": [s.model_dump(exclude={"prompt_ids", "completion_ids", "completion_mask"})
                     for s in result.segments],
    }


def summary_table(task: str, model: str, summaries: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=f"{task} · {model}", title_justify="left")
    cols = ["mode", "n"]
    if task == "countdown":
        cols += ["≥1 %", "≥2 %", "≥3 %", "all %"]
    else:
        cols += ["accuracy %"]
    cols += ["mean T", "η/c %", "forks", "format err %", "wall s"]
    for c in cols:
        table.add_column(c, justify="right" if c != "mode" else "left")
    for mode, s in summaries.items():
        row = [mode, str(s["episodes"])]
        if task == "countdown":
            row += [f"{s['at_least_1']:.1f}", f"{s['at_least_2']:.1f}", f"{s['at_least_3']:.1f}",
                    f"{s['all_correct']:.1f}"]
        else:
            row += [f"{s['accuracy']:.1f}"]
        row += [f"{s['mean_latency']:.1f}", f"{s['mean_eta_over_c']:.1f}", f"{s['forks_per_episode']:.2f}",
                f"{s['format_error_rate']:.1f}", f"{s['mean_wall_time_s']:.2f}"]
        table.add_row(*row)
    return table
