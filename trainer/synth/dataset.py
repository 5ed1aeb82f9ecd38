"""Running a teacher over many problems, and measuring what it wrote (lengths, critical path T).

:func:`synthesize` asks a teacher for AsyncThink episodes and/or sequential traces, keeps the checked
ones and counts the dropped ones by reason. :func:`length_stats` tokenizes the records with a project
tokenizer and reports organizer / worker / sequential lengths and the critical-path latency ``T`` of
each AsyncThink episode, computed by :func:`shared.metrics.critical_path` from the episode's structure
(organizer chunks between actions, each worker's length), next to the sequential trace's length.

Token counts here count each generated piece of a completion separately (the text between injected
spans), the way the engine sees them; injected text is prefill and never counted in ``T``.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.metrics import Decode, ForkStep, JoinStep, Step, Timeline, concurrency, critical_path
from shared.protocol import Fork, Join, Role, parse
from shared.tasks.base import Problem, Task
from trainer.synth.records import Episode, TraceRecord


class Teacher(Protocol):
    """What :func:`synthesize` needs from a teacher (programmatic or LLM)."""

    dropped: Counter[str]  # reason -> traces dropped
    partial: Counter[str]  # kind -> kept traces that answer with fewer parts than the task asks for

    def episode(self, problem: Problem, rng: random.Random) -> Episode | None: ...

    def sequential(self, problem: Problem) -> TraceRecord | None: ...


@dataclass
class SynthResult:
    records: list[TraceRecord] = field(default_factory=list)
    problems: int = 0
    kept: Counter[str] = field(default_factory=Counter)  # "asyncthink" episodes, "sequential" traces
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> count
    partial: Counter[str] = field(default_factory=Counter)  # kept, answering with fewer than asked

    def summary(self) -> str:
        kept = ", ".join(
            f"{k} {v}" + (f" ({self.partial[k]} partial)" if self.partial[k] else "")
            for k, v in sorted(self.kept.items())
        ) or "none"
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.most_common()) or "none"
        return f"{self.problems} problems; kept: {kept}; dropped: {sum(self.dropped.values())} ({dropped})"


def synthesize(
    teacher: Teacher,
    problems: Iterable[Problem],
    *,
    asyncthink: bool = True,
    sequential: bool = False,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Checked records for every problem the teacher handles; dropped traces counted by reason."""
    rng = random.Random(seed)
    out = SynthResult()
    dropped_before, partial_before = Counter(teacher.dropped), Counter(teacher.partial)
    for problem in problems:
        out.problems += 1
        if asyncthink:
            ep = teacher.episode(problem, rng)
            if ep is not None:
                out.records.extend(ep.records())
                out.kept["asyncthink"] += 1
        if sequential:
            rec = teacher.sequential(problem)
            if rec is not None:
                out.records.append(rec)
                out.kept["sequential"] += 1
        if progress is not None:
            progress(1)
    out.dropped = teacher.dropped - dropped_before  # this call's counts (Counter "-" keeps positive ones)
    out.partial = teacher.partial - partial_before
    return out


def train_problems(task: Task, n: int, seed: int, jobs: int = 1) -> list[Problem]:
    """``n`` training problems of ``task`` (never from its test split); ``jobs`` processes in shards.

    With ``jobs > 1`` shard ``k`` draws from seed ``seed * 1000 + k`` (so the set differs from a
    one-process run); duplicates across shards are removed, so slightly fewer than ``n`` may return.
    """
    if jobs <= 1 or n < 2 * jobs:
        return task.problems("train", n, seed)
    from concurrent.futures import ProcessPoolExecutor

    sizes = [n // jobs + (k < n % jobs) for k in range(jobs)]
    with ProcessPoolExecutor(jobs) as pool:
        shards = list(pool.map(_shard, [task.name] * jobs, sizes, [seed * 1000 + k for k in range(jobs)]))
    seen: set[str] = set()
    out: list[Problem] = []
    for shard in shards:
        for p in shard:
            key = json.dumps(p.payload, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _shard(task_name: str, n: int, seed: int) -> list[Problem]:
    from shared.tasks import get_task

    return get_task(task_name).problems("train", n, seed)


# ------------------------------------------------------------------------------------------ lengths
def organizer_timeline(
    record: TraceRecord, worker_tokens: dict[int, int], count: Callable[[str], int]
) -> Timeline:
    """The organizer's :class:`Timeline`: decode chunks cut at each fork and join, workers nested."""
    events, _ = parse(record.completion, Role.ORGANIZER, capacity=1 << 20)
    cuts: list[tuple[int, Step]] = []  # (generated text ends here, the step that follows)
    for ev in events:
        if isinstance(ev, Fork):  # a Fork's offset is its opening tag; the decode chunk ends at </FORK-i>
            closing = f"</FORK-{ev.fork_id}>"
            end = record.completion.index(closing, ev.offset) + len(closing)
            cuts.append((end, ForkStep(ev.fork_id, Timeline.of(Decode(worker_tokens.get(ev.fork_id, 0))))))
        elif isinstance(ev, Join):
            cuts.append((ev.offset + len(f"<JOIN-{ev.fork_id}>"), JoinStep(ev.fork_id)))
    injected = {a: b for a, b in record.injected}
    steps: list[Step] = []
    pos = 0
    for end, step in cuts:
        steps.append(Decode(count(record.completion[pos:end])))
        steps.append(step)
        pos = injected.get(end, end)  # skip the text a join injected
    steps.append(Decode(count(record.completion[pos:])))
    return Timeline(tuple(steps))


def generated_tokens(record: TraceRecord, count: Callable[[str], int]) -> int:
    return sum(count(text) for text, gen in record.pieces() if gen)


def _describe(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 3),
        "min": ordered[0],
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
    }


def token_counter(
    tokenizer: str, records: Sequence[TraceRecord] = (), *, vocab_size: int = 4096, seed: int = 0
) -> Callable[[str], int]:
    """``count(text)`` in tokens of a model or tokenizer directory, or with ``"train"`` of a tokenizer
    trained on ``records`` (plus the default corpus), the one ``asyncthink sft --preset`` would build."""
    if tokenizer == "train":
        from trainer.tokenizer import default_corpus, train_tokenizer

        corpus = [r.prompt + r.completion for r in records]
        fast = train_tokenizer([*corpus, *default_corpus(seed=seed)], vocab_size).backend_tokenizer
    else:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).backend_tokenizer

    def count(text: str) -> int:
        return len(fast.encode(text, add_special_tokens=False).ids)

    return count


def length_stats(
    records: Iterable[TraceRecord], count: Callable[[str], int], capacity: int = 2
) -> dict[str, Any]:
    """Generated-token lengths per kind, total organizer lengths (with injected text), critical path T
    and η/c of each AsyncThink episode, and T against the sequential length of the same problem."""
    by_episode: dict[str, list[TraceRecord]] = defaultdict(list)
    seq_len: dict[str, int] = {}
    lengths: dict[str, list[float]] = defaultdict(list)
    for r in records:
        n = generated_tokens(r, count)
        lengths[r.kind].append(n)
        if r.kind == "sequential":
            seq_len[r.problem_id] = n
        else:
            by_episode[r.episode_id].append(r)
        if r.kind == "organizer":
            lengths["organizer_with_injected"].append(count(r.completion))
    t_values: list[float] = []
    eta_c: list[float] = []
    ratios: list[float] = []
    forks: list[float] = []
    for recs in by_episode.values():
        org = next((r for r in recs if r.kind == "organizer"), None)
        if org is None:
            continue
        workers = {
            r.fork_id: generated_tokens(r, count)
            for r in recs
            if r.kind == "worker" and r.fork_id is not None
        }
        tl = organizer_timeline(org, workers, count)
        t = critical_path(tl)
        t_values.append(t)
        eta_c.append(concurrency(tl) / capacity)
        forks.append(len(workers))
        if org.problem_id in seq_len and seq_len[org.problem_id]:
            ratios.append(t / seq_len[org.problem_id])
    return {
        **{f"{k}_tokens": _describe(v) for k, v in sorted(lengths.items())},
        "critical_path_T": _describe(t_values),
        "eta_over_c": _describe(eta_c),
        "forks_per_episode": _describe(forks),
        "T_over_sequential": _describe(ratios),
    }
