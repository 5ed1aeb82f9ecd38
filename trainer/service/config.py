"""``TrainerServiceConfig``: every setting of the trainer service, with help text and validation.

Pure data (no torch import), so ``asyncthink --help`` stays instant: ``asyncthink serve trainer`` and
``asyncthink trainer serve`` build their options from the fields' ``help`` metadata (``cli/options.py``).
The episodes the service submits for GRPO are one :class:`~shared.episode.EpisodeSettings` (``episode``,
sampled at temperature > 0), flattened into options of their own (``--organizer-budget`` ...); the
held-out gate runs the same settings greedily (temperature 0, fixed seed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.episode import EpisodeSettings
from shared.tasks.base import Mode

METHODS = ("sft", "grpo")
GATE_METRICS = ("accuracy", "reward")
PAUSE_MODES = ("retract", "in_place", "abort")
ADVANTAGE_SCALES = ("std", "none")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _episodes() -> EpisodeSettings:
    return EpisodeSettings(temperature=1.0)  # a GRPO group needs varied samples


@dataclass
class TrainerServiceConfig:
    """Settings of :class:`trainer.service.TrainerService`. Field help doubles as the CLI's ``--help``."""

    # --- what to train ------------------------------------------------------------------------------
    method: str = _f(
        "sft",
        "sft: filtered SFT on the system's own good stored traces (rejection sampling); grpo: submit G "
        "episodes per problem through the normal submission path and train on their group advantages",
        choices=METHODS,
    )
    task: str = _f("countdown", "the task whose episodes are consumed and whose held-out split gates")
    base_model: Path | None = _f(
        None,
        "the model directory the serving fleet started from (weights and tokenizer); default: "
        "ASYNCTHINK_MODEL when it is a directory, else the tokenizer= directory of an sglang: spec",
    )
    model_id: str | None = _f(None, "the name of the model lineage in model_versions (default: base-model's name)")
    init_version: str | None = _f(
        None,
        "the version label the fleet reports for the base model (default: the first 12 hex digits of its "
        "weights' sha256, as the transformers backend labels it; SGLang's launch default is 'default')",
    )
    out: Path = _f(
        Path("runs/trainer"),
        "where checkpoints go (OUT/versions/<version>/): a directory every serving process can read",
    )
    # --- the data (sft) -----------------------------------------------------------------------------
    min_episodes: int = _f(32, "sft: episodes that pass the filters before a cycle starts")
    max_episodes: int = _f(256, "sft: most episodes one cycle trains on (the oldest unconsumed first)")
    min_accuracy: float = _f(0.25, "keep an episode only if its accuracy R_A is at least this (0: no filter)")
    min_reward: float | None = _f(None, "keep an episode only if its total reward is at least this")
    allow_format_errors: bool = _f(False, "also train on episodes with format errors (their reward is R_FE)")
    max_staleness: int = _f(
        1,
        "keep a segment only if every version that produced it is the serving version or at most this "
        "many versions before it in the serving version's lineage (0: the serving version only)",
    )
    # --- grpo -----------------------------------------------------------------------------------------
    problems_per_cycle: int = _f(8, "grpo: P, problems submitted per cycle")
    group_size: int = _f(4, "grpo: G, episodes submitted per problem (>= 2)")
    pool_size: int = _f(64, "grpo: training problems generated once from the task's train split")
    episode: EpisodeSettings = field(
        default_factory=_episodes,
        metadata={
            "help": "the submitted episodes' settings (and the gate's, greedily)",
            "exclude": ("seed", "parallel_k", "stream_text", "recursive", "max_depth"),
            "choices_of": {"mode": ("asyncthink", "sequential")},
        },
    )
    episode_timeout_s: float = _f(900.0, "grpo: seconds to wait for a cycle's submitted episodes to finish")
    # --- the update ------------------------------------------------------------------------------------
    lr: float = _f(1e-5, "AdamW learning rate")
    updates_per_cycle: int = _f(
        1,
        "optimizer steps per cycle over the cycle's whole batch (sft: passes; grpo: μ, clipped against "
        "the rollout policy when > 1)",
    )
    advantage_scale: str = _f("std", "grpo: std: (r - mean)/(std + eps) per group; none: r - mean",
                              choices=ADVANTAGE_SCALES)  # fmt: skip
    clip_eps: float = _f(0.2, "grpo: PPO clip range of the importance ratio")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = no clipping)")
    micro_batch_tokens: int = _f(16384, "padded tokens per forward/backward pass (bounds memory only)")
    device: str = _f("cpu", "where the trainer trains and evaluates: cpu, cuda or cuda:N")
    # --- the gate ---------------------------------------------------------------------------------------
    eval_problems: int = _f(16, "held-out problems (the first N of the task's test split) in the gate")
    gate_metric: str = _f("accuracy", "what the gate compares: mean accuracy or mean total reward",
                          choices=GATE_METRICS)  # fmt: skip
    gate_tolerance: float = _f(
        0.02,
        "publish only if candidate >= serving - tolerance on the gate metric (a negative value demands an "
        "improvement of at least that much)",
    )
    post_swap_problems: int = _f(
        4,
        "after a swap, held-out problems run through the serving fleet; if their episodes do not carry "
        "the new version or score below the candidate's gate score - tolerance, roll back (0: no check)",
    )
    post_swap_tolerance: float = _f(
        0.25,
        "the check after a swap rolls back when the fleet's score on its problems is below the candidate's "
        "offline score on the same problems minus this (the fleet may batch and round differently)",
    )
    # --- publishing --------------------------------------------------------------------------------------
    pause_mode: str = _f(
        "retract",
        "SGLang pause for the swap: retract (running requests wait, then go on with the new weights), "
        "in_place (frozen with their KV cache) or abort (cut off; the engine resends their calls)",
        choices=PAUSE_MODES,
    )
    swap_timeout_s: float = _f(120.0, "seconds to wait for every serving process to confirm a swap")
    # --- the schedule --------------------------------------------------------------------------------
    cycles: int = _f(0, "stop after this many cycles (0: run until stopped)")
    poll_s: float = _f(30.0, "seconds between looks for enough new data (sft) when a cycle cannot start")
    start_paused: bool = _f(False, "start paused (resume with `asyncthink trainer resume`)")
    seed: int = _f(0, "seed of problem sampling and torch")
    metrics_port: int = _f(9108, "port of the trainer's own Prometheus /metrics (0: none)")
    control_prefix: str = _f(
        "asyncthink", "prefix of the control streams on the bus (serving processes read ASYNCTHINK_CONTROL_PREFIX)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.episode, dict):
            self.episode = EpisodeSettings(**self.episode)
        self.out = Path(self.out).expanduser()
        if self.base_model is not None:
            self.base_model = Path(self.base_model).expanduser()
        for name, allowed in (("method", METHODS), ("gate_metric", GATE_METRICS), ("pause_mode", PAUSE_MODES),
                              ("advantage_scale", ADVANTAGE_SCALES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("min_episodes", "max_episodes", "problems_per_cycle", "pool_size", "updates_per_cycle",
                     "micro_batch_tokens", "eval_problems"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_staleness", "post_swap_problems", "cycles", "metrics_port"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_episodes < self.min_episodes:
            raise ValueError(f"max_episodes ({self.max_episodes}) must be >= min_episodes ({self.min_episodes})")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group-relative advantage needs a group), got {self.group_size}")
        if self.method == "grpo" and self.episode.temperature <= 0:
            raise ValueError("grpo needs temperature > 0 (--temperature): a group of greedy episodes is one episode")
        if self.episode.mode is Mode.PARALLEL:
            raise ValueError("mode must be asyncthink or sequential: parallel thinking is not trained")
        if not 0 < self.clip_eps < 1 or self.lr <= 0 or self.max_grad_norm < 0:
            raise ValueError("clip_eps must be in (0, 1), lr > 0 and max_grad_norm >= 0")
        for name in ("episode_timeout_s", "swap_timeout_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, EpisodeSettings):
                value = value.model_dump(mode="json")
            out[f.name] = value
        return out
