"""Episode rewards for GRPO: accuracy, format error and thinking concurrency.

    R = R_FE                  if the episode has any format error
    R = R_A + λ · R_η         otherwise, with R_η = min(η / c, τ) / τ

``R_A`` comes from the task's ``score`` (1/0, or ``min(n_correct_unique, n_s) / n_s`` for multi-solution
countdown); ``η`` is the thinking concurrency of :mod:`shared.metrics` and ``c`` the agent-pool capacity.
τ caps the concurrency reward so forking for its own sake stops paying once η/c reaches τ. There is no
"leverage" reward for forking after a join: the paper reports that it made training collapse.
Pure functions, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardConfig:
    # R_FE: the whole reward of an episode with any format error; must be below every reachable
    # valid reward (>= 0), or RL learns that breaking the format is safe.
    format_error_reward: float = -1.0
    # λ: weight of the concurrency reward R_η added to the accuracy reward; 0 switches it off
    # (the paper's "without R_η" ablation).
    concurrency_weight: float = 0.2
    # τ: cap on η/c in R_η = min(η/c, τ)/τ; in (0, 1]. Beyond η/c = τ more forking earns nothing.
    # η >= 1 whenever some agent is decoding, so η/c >= 1/c: with c = 2 a τ of 0.5 or less would give
    # R_η = 1 without any concurrency. The default 0.75 carries a signal for c = 2 (no forks: 0.67) and
    # c = 4 (no forks: 0.33), and caps the reward below full occupancy against reward hacking.
    tau: float = 0.75

    def __post_init__(self) -> None:
        if not math.isfinite(self.format_error_reward) or self.format_error_reward >= 0:
            raise ValueError(
                f"format_error_reward must be a negative number (got {self.format_error_reward}); "
                "use e.g. -1.0 so a format error scores below any valid episode"
            )
        if not math.isfinite(self.concurrency_weight) or self.concurrency_weight < 0:
            raise ValueError(
                f"concurrency_weight (λ) must be >= 0 (got {self.concurrency_weight}); "
                "use 0 to disable the concurrency reward"
            )
        if not math.isfinite(self.tau) or not 0 < self.tau <= 1:
            raise ValueError(f"tau (τ) must be in (0, 1] (got {self.tau}); the default is 0.75")


@dataclass(frozen=True)
class RewardParts:
    accuracy: float  # R_A in [0, 1] (0 when there was a format error)
    concurrency: float  # R_η in [0, 1] (0 when there was a format error)
    format_error: bool  # True when R = R_FE
    total: float  # the scalar reward GRPO uses


def concurrency_reward(eta: float, capacity: int, tau: float) -> float:
    """``R_η = min(η / c, τ) / τ``, in [0, 1].

    >>> concurrency_reward(1.0, 2, 0.5)  # no concurrency: η = 1, η/c = 0.5 = τ
    1.0
    >>> concurrency_reward(0.5, 2, 0.5)
    0.5
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 (got {capacity})")
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1] (got {tau})")
    return min(max(eta, 0.0) / capacity, tau) / tau


def total_reward(
    accuracy: float,
    eta: float,
    capacity: int,
    format_error: bool,
    config: RewardConfig | None = None,
) -> RewardParts:
    """The episode reward and its parts.

    >>> total_reward(1.0, 1.5, 2, False).total  # 1 + 0.2 * min(0.75, 0.75) / 0.75
    1.2
    >>> total_reward(1.0, 1.5, 2, True).total
    -1.0
    """
    cfg = config or RewardConfig()
    if format_error:
        return RewardParts(accuracy=0.0, concurrency=0.0, format_error=True, total=cfg.format_error_reward)
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1] (got {accuracy})")
    r_eta = concurrency_reward(eta, capacity, cfg.tau)
    return RewardParts(
        accuracy=accuracy,
        concurrency=r_eta,
        format_error=False,
        total=accuracy + cfg.concurrency_weight * r_eta,
    )
