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


@pytest.mark.parametrize("value", [0.0, -0.0, float("inf"), float("-inf"), float("nan")])
def test_format_error_reward_of_zero_or_not_finite_is_refused(value: float) -> None:
    # R_FE = 0 would tie with a valid episode that earned nothing (R_A = 0, λ·R_η = 0): a format error
    # must cost something. -0.0 == 0.0, so it is refused too; -inf would make every mean reward -inf.
    with pytest.raises(ValueError) as err:
        RewardConfig(format_error_reward=value)
    assert str(err.value) == (
        f"format_error_reward must be a negative number (got {value}); "
        "use e.g. -1.0 so a format error scores below any valid episode"
    )


def test_the_boundaries_that_are_accepted() -> None:
    # the largest negative float, λ = 0 (the "without R_η" ablation) and τ = 1 are all valid
    cfg = RewardConfig(format_error_reward=-5e-324, concurrency_weight=0.0, tau=1.0)
    assert (cfg.format_error_reward, cfg.concurrency_weight, cfg.tau) == (-5e-324, 0.0, 1.0)
    assert RewardConfig(tau=1e-9).tau == 1e-9  # τ only has to be above 0


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_concurrency_weight_messages(value: float) -> None:
    with pytest.raises(ValueError) as err:
        RewardConfig(concurrency_weight=value)
    assert str(err.value) == (
        f"concurrency_weight (λ) must be >= 0 (got {value}); use 0 to disable the concurrency reward"
    )


@pytest.mark.parametrize("value", [0.0, -0.5, 1.0000001, float("inf")])
def test_tau_messages(value: float) -> None:
    with pytest.raises(ValueError) as err:
        RewardConfig(tau=value)
    assert str(err.value) == f"tau (τ) must be in (0, 1] (got {value}); the default is 0.75"


def test_concurrency_reward_boundaries() -> None:
    # c = 1 (the organizer alone) is the smallest pool: η = 1 gives η/c = 1, capped at τ = 0.5 -> 1.0
    assert concurrency_reward(1.0, 1, 0.5) == 1.0
    assert concurrency_reward(0.25, 1, 0.5) == 0.5  # 0.25 / 0.5
    assert concurrency_reward(0.5, 2, 1.0) == 0.25  # τ = 1 is allowed: 0.25 / 1
    assert concurrency_reward(-3.0, 2, 0.5) == 0.0  # a negative η counts as 0
    with pytest.raises(ValueError) as err:
        concurrency_reward(1.0, 0, 0.5)
    assert str(err.value) == "capacity must be >= 1 (got 0)"
    for tau in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError) as err:
            concurrency_reward(1.0, 2, tau)
        assert str(err.value) == f"tau must be in (0, 1] (got {tau})"


def test_accuracy_bounds() -> None:
    # accuracy 0 and 1 are the ends of [0, 1]: both valid; just outside either end is refused
    assert total_reward(0.0, 1.0, 2, False).total == pytest.approx(0.2 * (0.5 / 0.75))  # 0 + λ·(0.5/0.75)
    assert total_reward(1.0, 1.0, 2, False).accuracy == 1.0
    for accuracy in (-0.01, 1.01):
        with pytest.raises(ValueError) as err:
            total_reward(accuracy, 1.0, 2, False)
        assert str(err.value) == f"accuracy must be in [0, 1] (got {accuracy})"
    # a format error skips the accuracy check: its reward is R_FE whatever the accuracy says
    assert total_reward(7.0, 1.0, 2, True).total == -1.0


def test_doctests() -> None:
    import doctest

    import shared.rewards

    assert doctest.testmod(shared.rewards).failed == 0


def test_docstring_examples() -> None:
    import doctest

    import shared.rewards

    failures, tried = doctest.testmod(shared.rewards)
    assert tried > 0 and failures == 0
