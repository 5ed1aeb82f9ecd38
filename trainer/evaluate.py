"""Evaluate a local model directory on a problem split, with the tools, and diagnose its countdown traces.

:func:`evaluate_model` runs ``n`` problems of a split (``test``, ``test2``, a JSONL path ...) through the
core engine in one mode, with the in-process tool endpoints (``@python``, ``@verify``) that the
embedded organizer has, and returns the evaluation summary (:func:`shared.evaluation.summarize`) plus,
for countdown, the trace diagnosis (:mod:`trainer.diagnose`: invalid and bare candidates and answers)
and a few example episodes. On CUDA it decodes with the slot engine, elsewhere with the transformers
backend. The recipe and ``bench/trace_check.py`` both use it, so their numbers are measured alike.
"""

from __future__ import annotations

import asyncio
import time
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
