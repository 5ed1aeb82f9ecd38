"""Evaluate a local model directory on a problem split, with the tools, and diagnose its countdown traces.

:func:`evaluate_model` runs ``n`` problems of a split (``test``, ``test2``, a JSONL path ...) through the
core engine in one mode, with the in-process tool endpoints (``@python``, ``@verify``) that the
embedded organizer has, and returns the evaluation summary (:func:`shared.evaluation.summarize`) plus,
for countdown, the trace diagnosis (:mod:`trainer.diagnose`: invalid and bare candidates and answers)
and a few example episodes. On CUDA it decodes with the slot engine, elsewhere with the transformers
backend. The recipe and ``bench/trace_check.py`` both use it, so their numbers are measured alike.

:func:`evaluate_workers` prompts the model as a worker on every first-pair unit of held-out problems
(the query both countdown teachers fork) and measures what it returns as solutions and how much of the
arithmetic it writes is false: a check that needs no working organizer.
"""

from __future__ import annotations

import asyncio
import re
import time
from fractions import Fraction
from pathlib import Path
from typing import Any


def open_eval_backend(model_dir: Path, device: str, attention: str = "auto", max_batch: int = 64) -> Any:
    """The slot engine on CUDA (fast), the transformers backend elsewhere."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        from transformers import AutoTokenizer

        from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig

        tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        engine_config = SlotEngineConfig(max_slots=1024, max_len=4096, decode_attention=attention)
        engine = SlotEngine.from_pretrained(str(model_dir), engine_config, tokenizer=tokenizer,
                                            device=torch.device(device))
        return SlotEngineBackend(engine, tokenizer, model_id=model_dir.name, weight_version=model_dir.name)
    from shared.backends.transformers_backend import TransformersBackend

    return TransformersBackend(model_dir, device="cpu" if device.startswith("cuda") else device,
                               max_batch=max_batch)


def evaluate_model(
    model_dir: Path,
    task_name: str,
    mode: str,
    *,
    split: str = "test",
    n: int = 100,
    k: int = 1,
    device: str = "cpu",
    organizer_budget: int = 1536,
    worker_budget: int = 512,
    attention: str = "auto",
    concurrency: int | None = None,
    examples: int = 3,
) -> dict[str, Any]:
    """Summary of ``n`` problems of ``split`` in ``mode`` (greedy; parallel samples ``k`` traces at
    temperature 0.7), with ``diagnosis`` for countdown and ``examples`` episodes."""
    from shared.engine import Engine, EngineConfig
    from shared.evaluation import run_episodes, summarize
    from shared.tasks import get_task
    from shared.tasks.base import Mode
    from shared.tools import local_endpoints

    task = get_task(task_name)
    problems = task.problems(split, n)
    backend = open_eval_backend(model_dir, device, attention)
    config = EngineConfig(mode=Mode(mode), parallel_k=k, organizer_budget=organizer_budget,
                          worker_budget=worker_budget, temperature=0.0 if k == 1 else 0.7, seed=0)
    engine = Engine(backend, task, config, endpoints=local_endpoints())

    async def go() -> Any:
        try:
            return await run_episodes(engine, problems, concurrency=concurrency or len(problems))
        finally:
            await backend.aclose()

    t0 = time.monotonic()
    results = asyncio.run(go())
    summary = summarize(task.name, results)
    summary.update(eval_seconds=time.monotonic() - t0, model=str(model_dir), split=split, mode=mode,
                   organizer_budget=organizer_budget, worker_budget=worker_budget)
    if task.name == "countdown":
        from trainer.diagnose import diagnose
        from trainer.diagnose import summarize as summarize_diagnoses

        summary["diagnosis"] = summarize_diagnoses([
            diagnose(r.problem.payload, r.segments[0].text if r.segments else "", r.answer) for r in results
        ])
    summary["examples"] = [
        {"problem": r.problem.payload, "answer": r.answer, "status": r.status, "T": r.latency,
         "organizer": r.segments[0].text[:2000] if r.segments else ""}
        for r in results[:examples]
    ]
    return summary


_STATEMENT = re.compile(r"(?<![\d)])(\d+)([-+*/])(\d+)=(\d+)(?![\d(])")


def arithmetic_lines(text: str) -> tuple[int, int]:
    """``(statements, wrong)``: every ``x op y=z`` written in ``text``, and how many are false."""
    total = wrong = 0
    for m in _STATEMENT.finditer(text):
        x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if op == "/" and y == 0:
            ok = False
        else:
            value = {"+": Fraction(x + y), "-": Fraction(x - y), "*": Fraction(x * y)}.get(op) or Fraction(x, y)
            ok = value == z
        total += 1
        wrong += not ok
    return total, wrong


def evaluate_workers(
    model_dir: Path, *, split: str = "test", n: int = 50, device: str = "cpu", budget: int = 512
) -> dict[str, Any]:
    """The model as a countdown *worker*: every first-pair unit of ``n`` held-out problems, prompted the
    way the organizer forks it (``a b | c d -> t``, the query both teachers use), decoded greedily.

    What it measures is what a worker puts forward as solutions: the candidates it returns (how many
    are invalid, how many a bare number), and the arithmetic it writes on the way (every ``x op y=z``:
    how many are false). Needs no working organizer, so it says something about a model trained for
    minutes.
    """
    from shared.backends.base import GenerateRequest, SamplingParams
    from shared.protocol import WORKER_STOP_REGEX, extract_return
    from shared.tasks.countdown import CountdownTask
    from shared.tasks.expr import ExprError, check_solution
    from trainer.diagnose import is_bare
    from trainer.synth.search_teacher import pairs_in_order

    task = CountdownTask()
    problems = task.problems(split, n)
    units: list[tuple[Any, str]] = []
    for p in problems:
        numbers, target = list(p.payload["numbers"]), p.payload["target"]
        for a, b in pairs_in_order(numbers):
            rest = list(numbers)
            rest.remove(a)
            rest.remove(b)
            units.append((p, f"{a} {b} | {' '.join(map(str, rest))} -> {target}"))
    backend = open_eval_backend(model_dir, device, max_batch=128)

    async def one(query: str) -> str:
        ids = backend.encode(task.worker_prompt(query))
        req = GenerateRequest(input_ids=ids, max_new_tokens=budget, stop_regex=WORKER_STOP_REGEX,
                              sampling=SamplingParams(temperature=0.0), tag="worker")
        return (await backend.generate(req)).text

    async def go() -> list[str]:
        try:
            return list(await asyncio.gather(*(one(q) for _, q in units)))
        finally:
            await backend.aclose()

    t0 = time.monotonic()
    texts = asyncio.run(go())
    out = {"units": len(units), "returned": 0, "candidates": 0, "invalid": 0, "bare": 0, "statements": 0,
           "wrong_statements": 0}
    valid_per_problem: dict[str, set[Any]] = {}
    for (p, _), text in zip(units, texts, strict=True):
        statements, wrong = arithmetic_lines(text)
        out["statements"] += statements
        out["wrong_statements"] += wrong
        returned = extract_return(text)
        if returned is None:
            continue
        out["returned"] += 1
        for expr in (e.strip() for e in returned.split(";")):
            if not expr or expr == "none":
                continue
            out["candidates"] += 1
            out["bare"] += is_bare(expr)
            try:
                key = check_solution(expr, p.payload["numbers"], p.payload["target"])
            except ExprError:
                out["invalid"] += 1
                continue
            valid_per_problem.setdefault(p.id, set()).add(key)
    return {
        **out,
        "returned_pct": 100 * out["returned"] / max(1, out["units"]),
        "candidates_per_unit": out["candidates"] / max(1, out["units"]),
        "invalid_candidates_pct": 100 * out["invalid"] / max(1, out["candidates"]),
        "bare_candidates_pct": 100 * out["bare"] / max(1, out["candidates"]),
        "wrong_statements_pct": 100 * out["wrong_statements"] / max(1, out["statements"]),
        "problems_with_a_valid_candidate_pct": 100 * len(valid_per_problem) / max(1, len(problems)),
        "eval_seconds": time.monotonic() - t0,
        "example": texts[0][:800] if texts else "",
    }
