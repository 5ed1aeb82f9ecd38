"""``GRPOConfigArgs``: every setting of a GRPO run, with help text and validation.

Pure data (no torch import), so ``asyncthink --help`` stays instant: the CLI builds its options from the
fields' ``help`` metadata (``cli/options.py``). The rollouts' episode settings are one
:class:`~shared.episode.EpisodeSettings` (``episode``), declared where every other episode setting is;
its fields are options of their own (``--mode``, ``--organizer-budget`` ...). Validation in
``__post_init__`` names the fix, as TRL's ``GRPOConfig`` does.
A run writes this config to ``grpo_config.json`` beside each checkpoint (``config.json`` there is the
model's own Hugging Face config).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.episode import EpisodeSettings
from shared.rewards import RewardConfig

_REWARDS = RewardConfig()  # the documented reward defaults (shared/rewards.py)
MODES = ("asyncthink", "sequential")
ROLLOUT_BACKENDS = ("auto", "slot", "transformers")
ROLLOUT_ATTENTIONS = ("auto", "varlen", "masked")
ADVANTAGE_SCALES = ("std", "none")
LOSS_NORMS = ("tokens", "sequences")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _rollout_episodes() -> EpisodeSettings:
    return EpisodeSettings(temperature=1.0)  # GRPO needs varied samples in a group


@dataclass
class GRPOConfigArgs:
    """Settings of :func:`trainer.grpo.train_grpo`. Field help doubles as the CLI's ``--help``."""

    # --- what to train, where to write --------------------------------------------------------------
    model: Path = _f(
        None,
        "model directory to start from (a Hugging Face causal LM with its tokenizer; "
        "usually the format-SFT output)",
        required=True,
    )
    out: Path = _f(None, "output directory: metrics.jsonl, checkpoint-<step>/, final/", required=True)
    task: str = _f("countdown", "task name: countdown | sudoku | math")
    problems_file: Path | None = _f(
        None,
        "JSONL of training problems (one task payload per line, or "
        '{"payload": ...}); default: the task\'s generated train split',
    )
    pool_size: int = _f(
        0,
        "problems generated once for the train pool when no --problems-file "
        "(0 = steps x problems-per-step, capped at 512); steps sample from the pool",
    )
    # --- the GRPO schedule --------------------------------------------------------------------------
    steps: int = _f(100, "optimizer steps (each: rollouts, one update, a weight refresh)")
    problems_per_step: int = _f(8, "P: distinct problems per step")
    group_size: int = _f(8, "G: episodes per problem; the group-relative advantage compares these (>= 2)")
    updates_per_step: int = _f(
        1,
        "gradient updates on each step's rollouts (μ); > 1 uses the clipped "
        "ratio against the rollout policy's log-probs",
    )
    # --- episodes (shared/episode.py: the same settings as serving, sampled at temperature 1) ---------
    episode: EpisodeSettings = field(
        default_factory=_rollout_episodes,
        metadata={
            "help": "the rollouts' episode settings",
            "exclude": ("seed", "parallel_k", "stream_text"),  # --seed seeds the whole run; parallel is not trained
            "choices_of": {"mode": MODES},
        },
    )
    # --- rewards (shared/rewards.py) ---------------------------------------------------------------------
    format_error_reward: float = _f(
        _REWARDS.format_error_reward, "R_FE: reward of an episode with any format error (< 0)"
    )
    lam: float = _f(
        _REWARDS.concurrency_weight,
        "λ: weight of the concurrency reward R_η (0 = the 'without R_η' ablation)",
    )
    tau: float = _f(_REWARDS.tau, "τ: cap on η/c in R_η = min(η/c, τ)/τ, in (0, 1]")
    # --- the loss ----------------------------------------------------------------------------------
    advantage_scale: str = _f(
        "std", "std: (r - mean) / (std + eps) per group; none: r - mean", choices=ADVANTAGE_SCALES
    )
    advantage_eps: float = _f(1e-4, "eps added to the group std")
    clip_eps: float = _f(0.2, "PPO clip range of the importance ratio")
    kl_beta: float = _f(0.0, "β of the k3 KL penalty to the starting model (0 = no reference model)")
    loss_norm: str = _f(
        "tokens",
        "tokens: sum over generated tokens / their count in the step; "
        "sequences: mean over each sequence's tokens, then over sequences",
        choices=LOSS_NORMS,
    )
    # --- the optimizer -----------------------------------------------------------------------------
    lr: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warmup over this many steps, then constant")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = no clipping)")
    micro_batch_tokens: int = _f(
        16384,
        "padded tokens (sequences x length) per forward/backward pass; "
        "bounds activation memory, the update is the same",
    )
    # --- hardware ----------------------------------------------------------------------------------
    device: str = _f("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    bf16: bool | None = _f(
        None, "bfloat16 autocast for the update and bf16 rollouts (default: on for CUDA, off for CPU)"
    )
    rollout_backend: str = _f(
        "auto",
        "auto (slot engine on CUDA for Qwen2 models, else transformers), slot, or transformers",
        choices=ROLLOUT_BACKENDS,
    )
    rollout_slots: int = _f(256, "sequences decoded at once by the rollout backend (KV slots / batch)")
    rollout_max_len: int = _f(4096, "slot engine: tokens per slot (prompt + injected text + output)")
    rollout_attention: str = _f(
        "auto",
        "slot engine decode attention: auto (the Triton kernel on CUDA when installed), varlen or masked",
        choices=ROLLOUT_ATTENTIONS,
    )
    # --- bookkeeping -------------------------------------------------------------------------------
    save_every: int = _f(50, "save out/checkpoint-<step> every this many steps (0 = only at the end)")
    seed: int = _f(0, "seed of problem sampling, rollout sampling and torch")
    resume: bool = _f(False, "continue from the newest checkpoint in --out (model, optimizer, step, RNG)")
    max_minutes: float | None = _f(None, "stop cleanly and save a checkpoint before this much wall time")
    progress: bool = _f(True, "show a progress bar (when stderr is a terminal)")

    def __post_init__(self) -> None:
        if self.model is None or self.out is None:
            raise ValueError(
                "model and out are required: the starting model directory and the output directory"
            )
        self.model = Path(self.model).expanduser()
        self.out = Path(self.out).expanduser()
        if self.problems_file is not None:
            self.problems_file = Path(self.problems_file).expanduser()
        if not (self.model / "config.json").is_file():
            raise ValueError(
                f"model {self.model} is not a model directory (no config.json); pass the SFT output "
                "or build one with `asyncthink model DIR`"
            )
        if self.problems_file is not None and not self.problems_file.is_file():
            raise ValueError(f"problems_file {self.problems_file} does not exist")
        for name in (
            "steps",
            "problems_per_step",
            "updates_per_step",
            "micro_batch_tokens",
            "rollout_slots",
            "rollout_max_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 (a group-relative advantage needs a group), got {self.group_size}"
            )
        for name in ("pool_size", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.episode, dict):
            self.episode = EpisodeSettings(**self.episode)
        if self.rollout_attention not in ROLLOUT_ATTENTIONS:
            raise ValueError(
                f"rollout_attention must be one of {ROLLOUT_ATTENTIONS}, got {self.rollout_attention!r}"
            )
        if self.episode.mode.value not in MODES:
            raise ValueError(
                f"mode must be one of {MODES} (parallel thinking is an eval baseline, not trained "
                f"here), got {self.episode.mode.value!r}"
            )
        if self.episode.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (GRPO needs varied samples in a group), got {self.episode.temperature}"
            )
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(
                f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}"
            )
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise ValueError(
                f"advantage_scale must be one of {ADVANTAGE_SCALES}, got {self.advantage_scale!r}"
            )
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {self.loss_norm!r}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_beta < 0 or self.advantage_eps <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("kl_beta and weight_decay must be >= 0, advantage_eps and lr > 0")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 when given, got {self.max_minutes}")
        # The reward settings are validated where they live.
        RewardConfig(format_error_reward=self.format_error_reward, concurrency_weight=self.lam, tau=self.tau)

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

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load(path: Path) -> GRPOConfigArgs:
    """A config saved by :meth:`GRPOConfigArgs.save` (also the older flat form, episode settings at the top)."""
    data = json.loads(Path(path).read_text())
    episode = dict(data.pop("episode", None) or {})
    for name in EpisodeSettings.model_fields:
        if name in data and name != "seed":
            episode[name] = data.pop(name)
    return GRPOConfigArgs(**data, episode=EpisodeSettings(**episode))
