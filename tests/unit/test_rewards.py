"""Rewards: R = R_FE on a format error, else R_A + λ·min(η/c, τ)/τ."""

from __future__ import annotations

import pytest

from shared.rewards import RewardConfig, RewardParts, concurrency_reward, total_reward


@pytest.mark.parametrize(
    ("eta", "capacity", "tau", "expected"),
    [
        (1.0, 2, 0.5, 1.0),
        (1.0, 4, 0.5, 0.5),
        (1.5, 4, 0.5, 0.75),
        (3.0, 4, 0.5, 1.0),  # capped at τ
        (1.2, 2, 0.8, 0.75),
        (0.0, 2, 0.5, 0.0),
    ],
)
def test_concurrency_reward(eta: float, capacity: int, tau: float, expected: float) -> None:
    assert concurrency_reward(eta, capacity, tau) == pytest.approx(expected)


def test_total_reward() -> None:
    parts = total_reward(1.0, 1.0, 4, False)  # η/c = 0.25, τ = 0.75 -> R_η = 1/3
    assert (parts.accuracy, parts.format_error) == (1.0, False)
    assert parts.concurrency == pytest.approx(1 / 3)
    assert parts.total == pytest.approx(1.0 + 0.2 / 3)
    assert total_reward(0.75, 2.0, 4, False).total == pytest.approx(0.75 + 0.2 * 2 / 3)
    assert total_reward(1.0, 2.0, 2, False).concurrency == 1.0  # η/c = 1 is capped at τ
    assert total_reward(1.0, 4.0, 4, True) == RewardParts(
        accuracy=0.0, concurrency=0.0, format_error=True, total=-1.0
    )
    cfg = RewardConfig(format_error_reward=-2.0, concurrency_weight=0.0, tau=1.0)
    assert total_reward(0.5, 2.0, 2, False, cfg).total == 0.5
    assert total_reward(0.5, 2.0, 2, True, cfg).total == -2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format_error_reward": 0.5}, "format_error_reward must be a negative"),
        ({"concurrency_weight": -0.1}, "concurrency_weight"),
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"tau": float("nan")}, "tau"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="capacity"):
        concurrency_reward(1.0, 0, 0.5)
    with pytest.raises(ValueError, match="accuracy"):
        total_reward(1.5, 1.0, 2, False)


def test_doctests() -> None:
    import doctest

    import shared.rewards

    assert doctest.testmod(shared.rewards).failed == 0


def test_docstring_examples() -> None:
    import doctest

    import shared.rewards

    failures, tried = doctest.testmod(shared.rewards)
    assert tried > 0 and failures == 0
