"""The GRPO loop: whole-episode rollouts through the core engine, group advantages, clipped updates.

One step of :func:`train_grpo`:

1. sample P problems from the train pool (deterministic in ``seed`` and the step);
2. run P x G episodes **concurrently** through :class:`shared.engine.Engine` on the rollout backend
   (CUDA + Qwen2: the slot engine; otherwise the transformers backend on the same device), sampling at
   ``temperature``; every episode has its own sampling seed (:mod:`trainer.grpo.rollout`);
3. rewards from each :class:`~shared.engine.EpisodeResult` (``R_FE`` or ``R_A + λ R_η``, computed by
   the engine with the run's reward config) or from ``reward_fn(result)`` for toy tasks;
4. group advantages (:func:`~trainer.grpo.losses.group_advantages`); every sequence of an episode
   (organizer and each worker) gets its episode's advantage; text injected by Joins is masked;
5. ``updates_per_step`` AdamW updates over micro-batches (:mod:`trainer.grpo.update`);
6. copy the new weights into the rollout backend; log metrics (``out/metrics.jsonl``, a progress bar);
   checkpoint every ``save_every`` steps and at the end (:mod:`trainer.grpo.checkpoint`).

``max_minutes`` stops before a step that would not finish in time and saves a checkpoint, so a run can
go on with ``resume=True`` in the next piece of GPU time.

Limits: one process, one device; the training model is held in fp32 (bf16 autocast on CUDA); rollouts
are strictly on-policy (generation waits for the update; no overlap of the two).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.engine import EngineConfig, EpisodeResult
from shared.rewards import RewardConfig
from shared.tasks import get_task
from trainer.grpo import checkpoint as ckpt
from trainer.grpo.config import GRPOConfigArgs
from trainer.grpo.losses import Sequence, episode_sequences, group_advantages
from trainer.grpo.rollout import (
    load_problem_pool,
    open_rollout_backend,
    refresh_weights,
    run_group_rollouts,
    sample_problems,
)
from trainer.grpo.update import grpo_update, step_metrics

log = logging.getLogger(__name__)

RewardFn = Callable[[EpisodeResult], float]
METRICS_FILE = "metrics.jsonl"


@dataclass
class GRPORun:
    """What :func:`train_grpo` did."""

    out: Path
    step: int  # optimizer steps completed in total (across resumes)
    stopped: str  # "done" (all steps) or "time" (max_minutes)
    last_checkpoint: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # this invocation's step records


class _Reporter:
    """A rich progress bar on a terminal; one line per step on stderr otherwise; nothing when off."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar: Any = None
        self.job: Any = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("grpo"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
            )
            self.bar.start()
            self.job = self.bar.add_task("", total=total, completed=start)

    def step(self, rec: dict[str, Any]) -> None:
        text = (
            f"R {rec['reward']:+.3f} acc {rec['accuracy']:.2f} FE {rec['format_error_rate']:.2f} "
            f"T {rec['latency_T']:.0f} η/c {rec['eta_over_c']:.2f} forks {rec['forks_per_episode']:.1f} "
            f"{rec['rollout_tokens_per_s'] / 1000:.1f}k tok/s upd {rec['update_s']:.1f}s"
        )
        if self.bar is not None:
            self.bar.update(self.job, advance=1, description=text)
        elif self.lines:
            print(f"step {rec['step']}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------------------- the loop
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def learning_rate(config: GRPOConfigArgs, step: int) -> float:
    """The learning rate of the update after ``step`` completed steps: linear warmup, then constant."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


@dataclass
class _Trainer:
    """What a run holds between steps: the models, the optimizer, the rollout backend and the history."""

    config: GRPOConfigArgs
    task: Any
    device: torch.device
    bf16: bool
    tokenizer: Any
    model: Any
    ref_model: Any  # the frozen starting model for the KL penalty, or None
    optimizer: torch.optim.Optimizer
    pad_id: int
    pool: list[Any]  # the training problems
    engine_config: EngineConfig
    backend: Any  # the rollout backend (a ModelBackend)
    step: int = 0  # optimizer steps completed, across resumes
    history: list[dict[str, Any]] = field(default_factory=list)  # every step's record, across resumes
    resumed_from: Path | None = None

    @property
    def metrics_path(self) -> Path:
        return self.config.out / METRICS_FILE

    def save(self, path: Path) -> Path:
        return ckpt.save_checkpoint(
            path,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            step=self.step,
            run_config=self.config.to_json(),
            metrics=self.history,
        )


def _start(config: GRPOConfigArgs) -> _Trainer:
    """Load the model (from the newest checkpoint when resuming), the optimizer and its state, the
    reference model, the problem pool and the rollout backend; rewrite the metrics file up to the step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _resolve_device(config.device)
    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.find_latest(out) if config.resume else None
    if config.resume and resume_from is None:
        log.warning("resume asked for, but %s holds no checkpoint: starting from %s", out, config.model)
    model_dir = resume_from or config.model
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    ref_model: Any = None
    if config.kl_beta > 0:
        ref_model = AutoModelForCausalLM.from_pretrained(
            str(config.model), local_files_only=True, dtype=torch.float32
        )
        ref_model.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay
    )
    task = get_task(config.task)
    engine_config = EngineConfig.of(
        config.episode,
        RewardConfig(format_error_reward=config.format_error_reward, concurrency_weight=config.lam, tau=config.tau),
    )
    run = _Trainer(
        config=config, task=task, device=device, bf16=bf16, tokenizer=tokenizer, model=model,
        ref_model=ref_model, optimizer=optimizer, pad_id=pad_id, pool=load_problem_pool(config, task),
        engine_config=engine_config, backend=None, resumed_from=resume_from,
    )
    if resume_from is not None:
        state = ckpt.load_state(resume_from)
        optimizer.load_state_dict(state.optimizer)
        ckpt.restore_rng(state)
        run.step = state.step
        run.history = [r for r in ckpt.read_metrics(resume_from) if r.get("step", 0) <= run.step]
        log.info("resumed from %s at step %d", resume_from, run.step)
    with run.metrics_path.open("w") as fh:  # drop records of steps after the checkpoint (a cut-off run)
        for old_rec in run.history:
            fh.write(json.dumps(old_rec) + "\n")
    config.save(out / ckpt.RUN_CONFIG_FILE)
    run.backend = open_rollout_backend(config, model, tokenizer, model_dir, device, bf16)
    refresh_weights(run.backend, model, f"grpo-{run.step}")
    return run


def _one_step(run: _Trainer, reward_fn: RewardFn | None) -> dict[str, Any]:
    """Rollouts, group advantages, the update and the weight refresh of one step; its metrics record."""
    config = run.config
    t0 = time.monotonic()
    problems = sample_problems(run.pool, config.problems_per_step, seed=config.seed, step=run.step)
    rollout_seed = (config.seed * 1_000_003 + run.step) * 10_007
    groups = asyncio.run(
        run_group_rollouts(
            run.backend, run.task, problems, run.engine_config, group_size=config.group_size, seed=rollout_seed
        )
    )
    rollout_s = time.monotonic() - t0
    reward_rows = [[reward_fn(r) if reward_fn else r.rewards.total for r in g] for g in groups]
    rewards = torch.tensor(reward_rows, dtype=torch.float32)  # [P, G]
    advantages = group_advantages(
        rewards,
        scale=config.advantage_scale,  # type: ignore[arg-type]
        eps=config.advantage_eps,
    )  # [P, G]
    sequences: list[Sequence] = []
    seq_adv: list[float] = []
    for p, group in enumerate(groups):
        for g, result in enumerate(group):
            for seq in episode_sequences(result):  # organizer and workers share the advantage
                sequences.append(seq)
                seq_adv.append(float(advantages[p, g]))
    t1 = time.monotonic()
    lr = learning_rate(config, run.step)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = lr
    upd = grpo_update(
        run.model, run.optimizer, sequences, seq_adv, config,
        pad_id=run.pad_id, device=run.device, bf16=run.bf16, ref_model=run.ref_model,
    )
    run.step += 1
    refresh_weights(run.backend, run.model, f"grpo-{run.step}")
    update_s = time.monotonic() - t1
    rec: dict[str, Any] = {"step": run.step, **step_metrics(groups, rewards, advantages)}
    rec.update(
        rollout_s=rollout_s,
        rollout_tokens_per_s=rec["rollout_tokens"] / max(rollout_s, 1e-9),
        update_s=update_s,
        loss=upd.loss,
        grad_norm=upd.grad_norm,
        clip_frac=upd.clip_frac,
        kl=upd.kl,
        trained_sequences=upd.trained_sequences,
        trained_tokens=upd.trained_tokens,
        update_skipped=upd.skipped,
        lr=lr,
        step_s=time.monotonic() - t0,
    )
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in rec.items()}


def _out_of_time(config: GRPOConfigArgs, started: float, step_times: list[float]) -> bool:
    """Whether another step (as long as the slowest of the last three, with margin) would pass max_minutes."""
    if config.max_minutes is None or not step_times:
        return False
    elapsed = time.monotonic() - started
    return elapsed + max(step_times[-3:]) * 1.2 + 15.0 > config.max_minutes * 60.0


def train_grpo(config: GRPOConfigArgs, *, reward_fn: RewardFn | None = None) -> GRPORun:
    """Run GRPO over thinking structures as ``config`` says; see the module docstring for one step."""
    run = _start(config)
    started = time.monotonic()
    step_times: list[float] = []
    records: list[dict[str, Any]] = []
    last_checkpoint = run.resumed_from
    stopped = "done"
    reporter = _Reporter(config.progress, config.steps, run.step)
    try:
        while run.step < config.steps:
            if _out_of_time(config, started, step_times):
                stopped = "time"
                break
            t0 = time.monotonic()
            rec = _one_step(run, reward_fn)
            run.history.append(rec)
            records.append(rec)
            with run.metrics_path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            reporter.step(rec)
            step_times.append(time.monotonic() - t0)
            if config.save_every and run.step % config.save_every == 0 and run.step < config.steps:
                last_checkpoint = run.save(config.out / f"checkpoint-{run.step}")
        if run.step < config.steps:  # stopped early: the last step must be on disk to resume from
            if last_checkpoint is None or ckpt.read_step(last_checkpoint) != run.step:
                last_checkpoint = run.save(config.out / f"checkpoint-{run.step}")
        else:
            last_checkpoint = run.save(config.out / "final")
    finally:
        reporter.close()
        asyncio.run(run.backend.aclose())
    log.info("grpo %s after %d steps; last checkpoint %s", stopped, run.step, last_checkpoint)
    return GRPORun(out=config.out, step=run.step, stopped=stopped, last_checkpoint=last_checkpoint, metrics=records)
