"""Rollouts for GRPO: the training-problem pool, whole-episode groups, the rollout backend and its weights.

- :func:`load_problem_pool` / :func:`sample_problems`: the train problems (a JSONL file, or the task's
  generated train split, cached in ``out/train_problems.jsonl``) and P of them per step, deterministic
  in the seed and the step.
- :func:`run_group_rollouts`: P x G episodes at once through the core :class:`~shared.engine.Engine`;
  each episode has its own sampling seed, so a group's members differ.
- :func:`open_rollout_backend`: the slot engine (:mod:`trainer.rollout`) on CUDA for Qwen2 models,
  else :class:`~shared.backends.transformers_backend.TransformersBackend` on the training device.
- :func:`refresh_weights`: copy the training model's weights into the rollout backend after an update.

Limits: refresh only between rollouts (no request in flight); generating countdown problems costs about
0.2 s each, so the default pool is capped (:data:`POOL_CAP`) and big pools come from ``problems_file``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from shared.backends.base import ModelBackend, WeightUpdate
from shared.engine import Engine, EngineConfig, EpisodeResult
from shared.tasks.base import Problem, Task
from trainer.grpo.config import GRPOConfigArgs

log = logging.getLogger(__name__)

PROBLEMS_FILE = "train_problems.jsonl"
POOL_CAP = 512  # default pool size cap


# -------------------------------------------------------------------------------------------- problems
def load_problem_pool(config: GRPOConfigArgs, task: Task) -> list[Problem]:
    """The train problems: ``problems_file``, else the pool cached in ``out``, else generated and cached."""
    cache = config.out / PROBLEMS_FILE
    if config.problems_file is not None:
        return _read_problems(config.problems_file, task)
    if cache.is_file():
        return _read_problems(cache, task)
    size = config.pool_size or min(config.steps * config.problems_per_step, POOL_CAP)
    size = max(size, config.problems_per_step)
    log.info("generating %d %s training problems (seed %d)", size, task.name, config.seed)
    pool = task.problems("train", size, seed=config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    with cache.open("w") as fh:
        for p in pool:
            fh.write(json.dumps({"id": p.id, "payload": p.payload}) + "\n")
    return pool


def _read_problems(path: Path, task: Task) -> list[Problem]:
    problems: list[Problem] = []
    for k, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        payload = row["payload"] if isinstance(row, dict) and "payload" in row else row
        pid = row.get("id") if isinstance(row, dict) and "payload" in row else None
        try:
            problems.append(task.problem_from_payload(payload, pid or f"{path.stem}-{k}"))
        except ValueError as exc:
            raise ValueError(f"{path}:{k + 1}: not a {task.name} problem: {exc}") from exc
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def sample_problems(pool: list[Problem], n: int, *, seed: int, step: int) -> list[Problem]:
    """``n`` problems for ``step``: without replacement when the pool is large enough."""
    rng = random.Random(seed * 1_000_003 + step)
    return rng.sample(pool, n) if len(pool) >= n else [rng.choice(pool) for _ in range(n)]


# -------------------------------------------------------------------------------------------- rollouts
def open_rollout_backend(
    config: GRPOConfigArgs, model: Any, tokenizer: Any, model_dir: Path, device: torch.device, bf16: bool
) -> ModelBackend:
    """The slot engine on CUDA for Qwen2 models (``rollout_backend`` auto|slot), else transformers."""
    kind = config.rollout_backend
    is_qwen2 = getattr(model.config, "model_type", "") == "qwen2"
    if kind == "auto":
        kind = "slot" if device.type == "cuda" and is_qwen2 and _slot_engine_available() else "transformers"
    if kind == "slot":
        if not is_qwen2:
            raise ValueError(
                f"the slot engine runs Qwen2 models; {model_dir} is "
                f"{getattr(model.config, 'model_type', '?')}: use rollout_backend=transformers"
            )
        from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig

        engine = SlotEngine(
            model,
            tokenizer,
            SlotEngineConfig(
                max_slots=config.rollout_slots,
                max_len=config.rollout_max_len,
                seed=config.seed,
                dtype="bfloat16" if bf16 else "float32",
                decode_attention=config.rollout_attention,
            ),
            device=device,
        )
        return SlotEngineBackend(engine, tokenizer, model_id=config.out.name, weight_version="grpo-0")
    from shared.backends.transformers_backend import TransformersBackend

    return TransformersBackend(
        model_dir,
        device=str(device),
        dtype="bfloat16" if bf16 else "float32",
        max_batch=config.rollout_slots,
        version="grpo-0",
    )


def _slot_engine_available() -> bool:
    try:
        import trainer.rollout  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def refresh_weights(backend: ModelBackend, model: torch.nn.Module, version: str) -> None:
    """Copy the training model's weights into the rollout backend and label them ``version``.

    Call between rollouts. Every rollout backend declares that it takes a torch module
    (``WeightSource.MODULE``); the slot engine copies in place, so captured CUDA graphs stay valid.
    """
    asyncio.run(backend.update_weights(WeightUpdate(version=version, module=model)))


async def run_group_rollouts(
    backend: ModelBackend,
    task: Task,
    problems: list[Problem],
    engine_config: EngineConfig,
    *,
    group_size: int,
    seed: int,
) -> list[list[EpisodeResult]]:
    """G episodes per problem, all at once; ``result[p][g]``. Episode seeds derive from ``seed``.

    The tools (``@python``, ``@verify``) run in process, as in the embedded organizer; a tool's segment
    has no token ids, so nothing of it is trained on."""
    from shared.tools import local_endpoints

    endpoints = local_endpoints()

    async def one(p: int, g: int) -> EpisodeResult:
        cfg = engine_config.model_copy(update={"seed": seed + p * group_size + g})
        engine = Engine(backend, task, cfg, endpoints=endpoints)
        return await engine.run(problems[p], episode_id=f"s{seed}-p{p}-g{g}")

    flat = await asyncio.gather(*(one(p, g) for p in range(len(problems)) for g in range(group_size)))
    return [list(flat[p * group_size : (p + 1) * group_size]) for p in range(len(problems))]
