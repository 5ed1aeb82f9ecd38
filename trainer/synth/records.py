"""Synthesized traces as SFT-ready records, and the checks every teacher's output must pass.

A record is one agent's sequence, exactly as the engine would run it (JSONL, one object a line)::

    {"kind": "organizer" | "worker" | "sequential",
     "problem_id": "cd-1-0",
     "prompt": "<the task's prompt text, exactly as the engine gives it>",
     "completion": "<what the agent generates, with join results inline>",
     "injected": [[start, end], ...],      # character spans of completion written by the runtime
     "task": "countdown", "episode_id": "...", "fork_id": 1 | null,
     "capacity": 2, "topology": "interleaved" | ... | "sequential"}

An injected span is exactly what a Join appends: the worker's returned text followed by ``</JOIN-i>``
(:func:`shared.protocol.join_result`), starting right after ``<JOIN-i>``. Format SFT masks those spans
and the prompt out of the loss.

:func:`check_episode` / :func:`check_sequential` run the protocol parser (no format error at the
chosen capacity, every fork joined, every join's injected text equal to that worker's return, or for a
tool fork such as ``<FORK-i@verify>`` to what the tool returns for its query) and the task verifier
(the answer must score 1.0). Tool forks have no worker record: a tool generates nothing to train on. They return a short reason string when a trace fails, so
teachers can drop it and count why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.protocol import Answer, Fork, Join, Return, Role, join_result, parse
from shared.tasks.base import Mode, Problem, Task
from shared.tools import tool_reply

KINDS = ("organizer", "worker", "sequential")


@dataclass
class TraceRecord:
    kind: str  # organizer | worker | sequential
    problem_id: str
    prompt: str  # the task's prompt, exactly as the engine builds it
    completion: str  # generated text with join results inline
    injected: list[list[int]] = field(default_factory=list)  # [start, end) spans of runtime-written text
    task: str = ""
    episode_id: str = ""  # links an organizer with its workers
    fork_id: int | None = None  # workers: the i of <FORK-i>
    capacity: int | None = None  # pool size c the trace was checked at
    topology: str | None = None  # skeleton topology ("sequential" for sequential traces)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(row: dict[str, Any]) -> TraceRecord:
        known = {k: row[k] for k in TraceRecord.__dataclass_fields__ if k in row}
        rec = TraceRecord(**known)
        rec.injected = [[int(a), int(b)] for a, b in rec.injected]
        return rec

    def pieces(self) -> list[tuple[str, bool]]:
        """The completion cut into ``(text, generated)`` pieces, in order (injected pieces: False)."""
        out: list[tuple[str, bool]] = []
        pos = 0
        for start, end in sorted(self.injected):
            if start < pos or end < start or end > len(self.completion):
                raise ValueError(
                    f"bad injected span [{start}, {end}) in a completion of {len(self.completion)} chars"
                )
            if start > pos:
                out.append((self.completion[pos:start], True))
            out.append((self.completion[start:end], False))
            pos = end
        if pos < len(self.completion):
            out.append((self.completion[pos:], True))
        return out


def worker_record(
    task: Task, problem: Problem, *, episode_id: str, fork_id: int, query: str, completion: str,
    capacity: int, topology: str,
) -> TraceRecord:
    """A worker's record: the engine's worker prompt for ``query`` and the text the worker generates."""
    return TraceRecord(
        kind="worker", problem_id=problem.id, prompt=task.worker_prompt(query), completion=completion,
        task=task.name, episode_id=episode_id, fork_id=fork_id, capacity=capacity, topology=topology,
    )


def organizer_record(
    task: Task, problem: Problem, writer: OrganizerWriter, *, episode_id: str, capacity: int, topology: str
) -> TraceRecord:
    """The organizer's record from its writer (completion and injected spans), with the AsyncThink prompt."""
    return TraceRecord(
        kind="organizer", problem_id=problem.id, prompt=task.organizer_prompt(problem, Mode.ASYNCTHINK),
        completion=writer.text, injected=writer.injected, task=task.name, episode_id=episode_id,
        capacity=capacity, topology=topology,
    )


def sequential_record(task: Task, problem: Problem, completion: str) -> TraceRecord:
    """A sequential trace of ``problem``: one thread, the sequential prompt, no forks."""
    return TraceRecord(
        kind="sequential", problem_id=problem.id, prompt=task.organizer_prompt(problem, Mode.SEQUENTIAL),
        completion=completion, task=task.name, episode_id=f"{problem.id}-seq", capacity=1,
        topology="sequential",
    )


class OrganizerWriter:
    """Builds an organizer completion piece by piece, recording where the runtime injects text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.injected: list[list[int]] = []
        self._len = 0

    def _add(self, text: str) -> None:
        self.parts.append(text)
        self._len += len(text)

    def think(self, text: str) -> None:
        self._add(text)

    def fork(self, fork_id: int, query: str, endpoint: str | None = None) -> None:
        at = f"@{endpoint}" if endpoint else ""
        self._add(f"<FORK-{fork_id}{at}>{query}</FORK-{fork_id}>")

    def join(self, fork_id: int, returned: str) -> None:
        self._add(f"<JOIN-{fork_id}>")
        start = self._len
        self._add(join_result(fork_id, returned))
        self.injected.append([start, self._len])

    def answer(self, text: str) -> None:
        self._add(f"<ANSWER>{text}</ANSWER>")

    @property
    def text(self) -> str:
        return "".join(self.parts)


_JOIN_BLOCK = re.compile(r"<JOIN-(\d+)>(.*?)</JOIN-\1>", re.S)


def reinject(text: str, returns: dict[int, str]) -> tuple[str, list[list[int]]] | None:
    """Rewrite every ``<JOIN-i>…</JOIN-i>`` of a written organizer trace with what the runtime would
    inject (worker ``i``'s return); None when a join names a worker with no return."""
    w = OrganizerWriter()
    pos = 0
    for m in _JOIN_BLOCK.finditer(text):
        fid = int(m.group(1))
        if fid not in returns:
            return None
        w.think(text[pos : m.start()])
        w.join(fid, returns[fid])
        pos = m.end()
    w.think(text[pos:])
    return w.text, w.injected


@dataclass
class Episode:
    """An AsyncThink episode from a teacher: the organizer record and one record per worker."""

    problem: Problem
    organizer: TraceRecord
    workers: dict[int, TraceRecord]  # fork id -> worker record

    def records(self) -> list[TraceRecord]:
        return [self.organizer, *(self.workers[i] for i in sorted(self.workers))]


def _first_error(
    completion: str, role: Role, capacity: int, allow_fork: bool
) -> tuple[str | None, list[Any]]:
    events, errors = parse(completion, role, capacity=capacity, allow_fork=allow_fork)
    if errors:
        return f"format:{errors[0].kind.value}", events
    return None, events


def check_episode(task: Task, episode: Episode, capacity: int, *, partial: bool = False) -> str | None:
    """None when the episode is valid (parser and verifier); otherwise why it is not.

    ``partial``: the answer may hold fewer solutions than the task asks for (every one still correct
    and distinct), for traces that tried everything and came up short.
    """
    org = episode.organizer
    if org.prompt != task.organizer_prompt(episode.problem, Mode.ASYNCTHINK):
        return "prompt_mismatch"
    reason, events = _first_error(org.completion, Role.ORGANIZER, capacity, True)
    if reason:
        return reason
    forks = [e for e in events if isinstance(e, Fork)]
    joins = [e for e in events if isinstance(e, Join)]
    model_forks = [f for f in forks if f.endpoint is None]
    if not model_forks:
        return "no_fork"
    if {f.fork_id for f in forks} != {j.fork_id for j in joins}:
        return "unjoined_fork"
    if {f.fork_id for f in model_forks} != set(episode.workers):
        return "worker_mismatch"
    returns: dict[int, str] = {}
    for f in forks:
        if f.endpoint is not None:  # a tool: what it returns is a function of the query
            returned, error = tool_reply(f.endpoint, f.query)
            if error:
                return f"tool_{error}"
            returns[f.fork_id] = returned
            continue
        w = episode.workers[f.fork_id]
        if w.prompt != task.worker_prompt(f.query) or w.injected:
            return "worker_mismatch"
        reason, wevents = _first_error(w.completion, Role.WORKER, capacity, False)
        if reason:
            return f"worker_{reason}"
        ret = next((e for e in wevents if isinstance(e, Return)), None)
        if ret is None:  # pragma: no cover - the parser reports a missing return
            return "worker_format:missing_answer"
        returns[f.fork_id] = ret.text
    # every injected span must be exactly what the runtime would inject, right after its <JOIN-i>
    expected = []
    for j in joins:
        start = j.offset + len(f"<JOIN-{j.fork_id}>")
        expected.append([start, start + len(join_result(j.fork_id, returns[j.fork_id]))])
    if sorted(org.injected) != expected or any(
        org.completion[a:b] != join_result(j.fork_id, returns[j.fork_id])
        for (a, b), j in zip(expected, joins, strict=True)
    ):
        return "join_mismatch"
    return _check_answer(task, episode.problem, events, partial)


def check_sequential(task: Task, problem: Problem, record: TraceRecord, *, partial: bool = False) -> str | None:
    """None when a sequential trace is valid (no forks, an answer scoring 1.0); otherwise why not.

    ``partial`` as for :func:`check_episode`.
    """
    if record.prompt != task.organizer_prompt(problem, Mode.SEQUENTIAL):
        return "prompt_mismatch"
    if record.injected:
        return "join_mismatch"
    reason, events = _first_error(record.completion, Role.ORGANIZER, 1, False)
    if reason:
        return reason
    return _check_answer(task, problem, events, partial)


def _check_answer(task: Task, problem: Problem, events: list[Any], partial: bool) -> str | None:
    answer = next((e for e in events if isinstance(e, Answer)), None)
    if answer is None:  # pragma: no cover - the parser reports a missing answer
        return "format:missing_answer"
    score = task.score(problem, answer.text)
    if score is None or score.accuracy == 1.0:  # an ungraded task accepts any answer
        return None
    wrong = any(score.details.get(k) for k in ("invalid", "duplicate", "ignored"))
    if partial and score.correct >= 1 and not wrong:
        return None
    return "verifier"


# ------------------------------------------------------------------------------------------ JSONL
def write_jsonl(records: Iterable[TraceRecord], path: str | Path) -> int:
    """Write records, one JSON object a line; returns how many were written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[TraceRecord]:
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield TraceRecord.from_json(json.loads(line))
