"""LLM teacher: organizer and worker traces written by any OpenAI-compatible chat endpoint.

The paper had GPT-4o write its cold-start traces, with a randomly sampled organizer action sequence in
the prompt ("structure initialization"). :class:`LLMTeacher` does the same for any endpoint that speaks
the OpenAI chat-completions API (hosted models, vLLM, SGLang's OpenAI route): it samples a skeleton
(:mod:`trainer.synth.structure`), puts it in a per-task prompt, and asks for a reply in sections::

    ORGANIZER:
    ...text with <FORK-i>...</FORK-i>, <JOIN-i>...</JOIN-i> and <ANSWER>...</ANSWER>...
    WORKER 1:
    ...text ending with <RETURN>...</RETURN>...

The reply is cut at ``</ANSWER>`` / ``</RETURN>`` (where the engine would stop), each join's text is
replaced by exactly what the runtime would inject (that worker's return and ``</JOIN-i>``), and the
episode goes through the same checks as the programmatic teacher's
(:func:`trainer.synth.records.check_episode`: parser at the chosen capacity, then the verifier). With
``strict_structure`` the forks and joins must also follow the skeleton, in order. Failures are dropped
and counted by reason (``llm_error``, ``unparsable_reply``, ``skeleton_mismatch``, ``format:...``,
``verifier``, ...).

Limits: one request per episode, no retries (a failed one is counted and skipped); every request has
the configured timeout. The endpoint's quality decides the keep rate; small models will mostly fail.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared.protocol import Fork, Join, Role, parse
from shared.tasks.base import Mode, Problem, Task
from trainer.synth.records import Episode, TraceRecord, check_episode, check_sequential, reinject
from trainer.synth.structure import TOPOLOGIES, Skeleton, StepKind, sample_skeleton

PROTOCOL_RULES = """You write training traces for asynchronous thinking. One model plays two roles.
The ORGANIZER thinks in plain text and may use these actions:
- <FORK-i>sub-query</FORK-i> starts worker i on a short, self-contained sub-query (i = 1, 2, ... in order).
- <JOIN-i> waits for worker i; write the worker's exact RETURN text right after it, then </JOIN-i>.
- <ANSWER>...</ANSWER> gives the final answer and ends the organizer.
At most {workers} worker(s) may be forked and not yet joined at any time. Join every worker you fork.
Each WORKER sees only its sub-query, thinks briefly, and ends with <RETURN>short result</RETURN>.
Keep every line short and step by step. Write no other tags."""

REPLY_FORMAT = """Reply with exactly these sections and nothing else:
ORGANIZER:
<the organizer's text>
{workers}"""

TASK_HINTS: dict[str, str] = {
    "countdown": (
        "Split the search: give each worker one part, for example the expressions whose first step "
        "combines one pair of numbers (sub-query like '41 14 | 4 3 -> 13'). A worker writes one step per "
        "line, e.g. '41+14=55: 55-3=52 52/4=13', and returns the full expressions it found separated by "
        "'; ' (or 'none'). The organizer searches other pairs itself while workers run, then answers "
        "with the requested number of distinct expressions separated by '; '."
    ),
    "sudoku": (
        "Split the work: give each worker one row or one 2x2 box with the puzzle, and have it return "
        "the filled digits. The organizer fills the rest, checks rows, columns and boxes, and answers "
        "with the 16 digits of the solved grid, row by row."
    ),
}

_SECTION = re.compile(r"^\s*(ORGANIZER|WORKER\s+(\d+))\s*:\s*$", re.M)


@dataclass(frozen=True)
class LLMTeacherConfig:
    base_url: str  # e.g. http://localhost:8000/v1 (vLLM, SGLang) or a hosted API
    model: str  # the endpoint's model name
    api_key: str = "EMPTY"  # sent as the bearer token; local servers usually ignore it
    timeout_s: float = 120.0  # per request
    temperature: float = 0.7
    max_tokens: int = 2048  # per reply
    capacity: int = 2  # pool size c the traces must respect
    min_tasks: int = 2  # skeleton size range (units of work per episode)
    max_tasks: int = 4
    topologies: tuple[str, ...] = TOPOLOGIES
    strict_structure: bool = True  # forks and joins must follow the sampled skeleton

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError("the LLM teacher needs --base-url and --model (an OpenAI-compatible endpoint)")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.capacity < 2:
            raise ValueError(f"capacity must be >= 2 for AsyncThink traces, got {self.capacity}")
        if not 1 <= self.min_tasks <= self.max_tasks:
            raise ValueError(f"need 1 <= min_tasks <= max_tasks, got {self.min_tasks}, {self.max_tasks}")
        unknown = set(self.topologies) - set(TOPOLOGIES)
        if unknown:
            raise ValueError(f"unknown topologies {sorted(unknown)}; choose from {', '.join(TOPOLOGIES)}")


@dataclass
class LLMTeacher:
    task: Task
    config: LLMTeacherConfig
    client: Any = None  # an ``openai.OpenAI``; built from the config when None
    dropped: Counter[str] = field(default_factory=Counter)
    partial: Counter[str] = field(default_factory=Counter)  # never written: every trace answers in full

    def __post_init__(self) -> None:
        if self.client is None:
            from openai import OpenAI

            self.client = OpenAI(
                base_url=self.config.base_url,
                api_key=self.config.api_key,
                timeout=self.config.timeout_s,
                max_retries=0,
            )

    # ----------------------------------------------------------------------------- prompts
    def messages(self, problem: Problem, skeleton: Skeleton | None) -> list[dict[str, str]]:
        """The chat messages for one episode (``skeleton`` None: a sequential trace)."""
        hint = TASK_HINTS.get(self.task.name, "")
        if skeleton is None:
            system = (
                "You write training traces for step-by-step thinking: one thread, no workers, short lines, "
                "ending with <ANSWER>...</ANSWER>. Write no other tags."
            )
            user = (
                f"Task prompt:\n{self.task.organizer_prompt(problem, Mode.SEQUENTIAL)}\n{hint}\n"
                "Reply with the trace only, starting right after the task prompt."
            )
            return [{"role": "system", "content": system}, {"role": "user", "content": user}]
        system = PROTOCOL_RULES.format(workers=skeleton.capacity - 1)
        workers = "\n".join(
            f"WORKER {i}:\n<worker {i}'s text>" for i in sorted(set(skeleton.fork_of_unit().values()))
        )
        user = (
            f"Task prompt the organizer sees:\n{self.task.organizer_prompt(problem, Mode.ASYNCTHINK)}\n"
            f"{hint}\n"
            f"Follow this action sequence (THINK (task k) = the organizer does part k itself):\n"
            f"{skeleton.describe()}\n\n" + REPLY_FORMAT.format(workers=workers)
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _ask(self, messages: list[dict[str, str]]) -> str | None:
        try:
            reply = self.client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                timeout=self.config.timeout_s,
            )
            content = reply.choices[0].message.content
        except Exception:  # any transport, HTTP or schema failure: count it and move on
            self.dropped["llm_error"] += 1
            return None
        if not content:
            self.dropped["llm_error"] += 1
            return None
        return str(content)

    # ----------------------------------------------------------------------------- replies
    def parse_reply(self, problem: Problem, reply: str, skeleton: Skeleton, episode_id: str) -> Episode | str:
        """An unchecked episode from a reply, or the reason it cannot be read."""
        heads = list(_SECTION.finditer(reply))
        if not heads or heads[0].group(1) != "ORGANIZER":
            return "unparsable_reply"
        bodies: dict[str, str] = {}
        for k, m in enumerate(heads):
            end = heads[k + 1].start() if k + 1 < len(heads) else len(reply)
            key = "organizer" if m.group(2) is None else m.group(2)
            if key in bodies:
                return "unparsable_reply"
            bodies[key] = reply[m.end() : end].strip("\n")
        workers: dict[int, TraceRecord] = {}
        returns: dict[int, str] = {}
        org_text = _cut_after(bodies.pop("organizer"), "</ANSWER>").lstrip()
        events, _ = parse(org_text, Role.ORGANIZER, capacity=1 << 20)
        queries = {e.fork_id: e.query for e in events if isinstance(e, Fork)}
        for key, body in bodies.items():
            fid = int(key)
            text = _cut_after(body, "</RETURN>").lstrip()
            ret = re.search(r"<RETURN>(.*?)</RETURN>", text, re.S)
            if fid not in queries or ret is None:
                return "unparsable_reply"
            returns[fid] = ret.group(1)
            workers[fid] = TraceRecord(
                kind="worker",
                problem_id=problem.id,
                prompt=self.task.worker_prompt(queries[fid]),
                completion=text,
                task=self.task.name,
                episode_id=episode_id,
                fork_id=fid,
                capacity=skeleton.capacity,
                topology=skeleton.topology,
            )
        rebuilt = reinject(org_text, returns)
        if rebuilt is None:
            return "unparsable_reply"
        completion, injected = rebuilt
        if self.config.strict_structure:
            wanted = [(s.kind.value, s.fork_id) for s in skeleton.steps if s.kind is not StepKind.WORK]
            got = [
                ("fork" if isinstance(e, Fork) else "join", e.fork_id)
                for e in events
                if isinstance(e, Fork | Join)
            ]
            if got != wanted:
                return "skeleton_mismatch"
        organizer = TraceRecord(
            kind="organizer",
            problem_id=problem.id,
            prompt=self.task.organizer_prompt(problem, Mode.ASYNCTHINK),
            completion=completion,
            injected=injected,
            task=self.task.name,
            episode_id=episode_id,
            capacity=skeleton.capacity,
            topology=skeleton.topology,
        )
        return Episode(problem, organizer, workers)

    def episode(self, problem: Problem, rng: random.Random) -> Episode | None:
        """A checked AsyncThink episode, or None (the reason is counted in ``dropped``)."""
        cfg = self.config
        skeleton = sample_skeleton(
            rng, cfg.capacity, rng.randint(cfg.min_tasks, cfg.max_tasks), rng.choice(cfg.topologies)
        )
        reply = self._ask(self.messages(problem, skeleton))
        if reply is None:
            return None
        ep = self.parse_reply(problem, reply, skeleton, f"{problem.id}-llm")
        reason = ep if isinstance(ep, str) else check_episode(self.task, ep, cfg.capacity)
        if reason:
            self.dropped[reason] += 1
            return None
        assert isinstance(ep, Episode)
        return ep

    def sequential(self, problem: Problem) -> TraceRecord | None:
        """A checked sequential trace, or None (the reason is counted in ``dropped``)."""
        reply = self._ask(self.messages(problem, None))
        if reply is None:
            return None
        rec = TraceRecord(
            kind="sequential",
            problem_id=problem.id,
            prompt=self.task.organizer_prompt(problem, Mode.SEQUENTIAL),
            completion=_cut_after(reply.strip("\n"), "</ANSWER>"),
            task=self.task.name,
            episode_id=f"{problem.id}-llm-seq",
            capacity=1,
            topology="sequential",
        )
        reason = check_sequential(self.task, problem, rec)
        if reason:
            self.dropped[reason] += 1
            return None
        return rec


def _cut_after(text: str, tag: str) -> str:
    """Text up to and including the first ``tag`` (where the engine would stop), else all of it."""
    k = text.find(tag)
    return text if k < 0 else text[: k + len(tag)]
