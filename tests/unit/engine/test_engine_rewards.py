"""The engine's reward of whole episodes, end to end: real countdown scoring, real parsing, the scripted
backend (one character per token), compared with values worked out by hand.

Every case states its arithmetic: ``T`` and ``η`` from the script lengths, ``R_A`` from the countdown
answer, ``R_η = min(η / c, τ) / τ`` and ``R = R_A + λ · R_η`` (or ``R_FE``). The capacity cases give
different rewards for c = 1, 2 and 4 on the same kind of episode, so an engine that scores with another
capacity than the episode's (one more, a constant, the task's default) fails here.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine, EngineConfig, EpisodeResult
from shared.messages import EpisodeStatus
from shared.rewards import RewardConfig
from shared.tasks import get_task
from shared.tasks.base import Mode

NUMBERS = [1, 2, 3, 4]  # target 10: 1+2+3+4, 2*3+4, 4*3-2, (1+4)*2 and 2*4+3-1 are distinct solutions
LAM, TAU = 0.2, 0.75  # the default λ and τ


def run(
    script: dict[str, str], *, n_solutions: int = 2, rewards: RewardConfig | None = None, **settings: Any
) -> EpisodeResult:
    task = get_task("countdown")
    problem = task.problem_from_payload({"numbers": NUMBERS, "target": 10, "n_solutions": n_solutions}, "p")
    config = EngineConfig(worker_budget=64, **settings, rewards=rewards or RewardConfig())
    return asyncio.run(Engine(ScriptedBackend(script), task, config).run(problem, episode_id="ep"))


def assert_rewards(result: EpisodeResult, accuracy: float, concurrency: float, total: float) -> None:
    assert result.rewards.format_error is False
    assert math.isclose(result.rewards.accuracy, accuracy, abs_tol=1e-12), result.rewards
    assert math.isclose(result.rewards.concurrency, concurrency, abs_tol=1e-12), result.rewards
    assert math.isclose(result.rewards.total, total, abs_tol=1e-12), result.rewards


# One fork joined while the worker still runs: the clock jumps to the worker's end.
O1 = "Two ways.<FORK-1>find a product route</FORK-1>"  # 46 tokens
O2 = "Sum all: 1+2+3+4.<JOIN-1>"  # 25 tokens, decoded while the worker runs
O3 = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"  # 31 tokens
W1 = "2*3 is 6 and 6+4 is 10, done.<RETURN>2*3+4</RETURN>"  # 51 tokens
FORK_SCRIPT = {"organizer": O1 + O2 + O3, "1": W1}


@pytest.mark.parametrize(
    ("capacity", "r_eta"),
    [
        # T = 46 + max(25, 51) + 31 = 128; η = (46 + 25 + 31 + 51) / 128 = 153/128 ≈ 1.195
        # c = 2: η/c = 153/256 ≈ 0.598 < τ, R_η = (153/256) / 0.75 = 51/64
        (2, 51 / 64),
        # c = 4: η/c = 153/512, R_η = (153/512) / 0.75 = 51/128
        (4, 51 / 128),
        # c = 3: η/c = 153/384, R_η = (153/384) / 0.75 = 17/32
        (3, 17 / 32),
    ],
)
def test_valid_asyncthink_episode_is_rewarded_with_its_own_capacity(capacity: int, r_eta: float) -> None:
    result = run(FORK_SCRIPT, capacity=capacity)
    assert result.status is EpisodeStatus.COMPLETED, result.format_errors
    assert result.capacity == capacity
    assert result.answer == "1+2+3+4; 2*3+4"
    assert result.latency == 128  # 46 + 51 + 31
    assert math.isclose(result.eta, 153 / 128)
    assert result.score is not None and (result.score.correct, result.score.needed) == (2, 2)
    # R_A = 2/2 = 1; R = 1 + 0.2 · R_η
    assert_rewards(result, 1.0, r_eta, 1.0 + LAM * r_eta)


def test_capacity_one_without_forks() -> None:
    # c = 1: the organizer alone. T = 31 tokens of "<ANSWER>...", η = 1, η/c = 1 > τ: R_η = 0.75/0.75 = 1.
    # (Scored with c = 2 it would be 0.5/0.75 = 2/3: the capacity matters even without forks.)
    result = run({"organizer": O3}, capacity=1)
    assert result.status is EpisodeStatus.COMPLETED
    assert (result.capacity, result.latency, result.eta) == (1, 31, 1.0)
    assert_rewards(result, 1.0, 1.0, 1.0 + LAM * 1.0)


def test_sequential_mode_uses_the_task_default_capacity() -> None:
    # countdown's default c = 2; η = 1: R_η = (1/2) / 0.75 = 2/3; R = 1 + 0.2 · 2/3 = 17/15
    result = run({"organizer": O3}, mode=Mode.SEQUENTIAL)
    assert result.status is EpisodeStatus.COMPLETED
    assert (result.capacity, result.latency, result.eta) == (2, 31, 1.0)
    assert_rewards(result, 1.0, 2 / 3, 17 / 15)


def test_partial_multi_solution_answer() -> None:
    # n_s = 3; the answer lists a solution twice (one counts), one wrong expression and one more solution:
    # correct unique = 2 ("1+2+3+4", "2*3+4"): R_A = min(2, 3)/3 = 2/3. "4+3+2+1" is the same solution as
    # "1+2+3+4" reordered (a duplicate), "1+1" is not a solution.
    answer = "1+2+3+4; 4+3+2+1; 2*3+4"
    result = run({"organizer": f"<ANSWER>{answer}</ANSWER>"}, n_solutions=3, capacity=4)
    assert result.status is EpisodeStatus.COMPLETED
    assert result.score is not None and (result.score.correct, result.score.needed) == (2, 3)
    # η = 1, c = 4: R_η = (1/4) / 0.75 = 1/3; R = 2/3 + 0.2/3 = 0.7333...
    assert_rewards(result, 2 / 3, 1 / 3, 2 / 3 + LAM / 3)


def test_wrong_answer_scores_only_the_concurrency() -> None:
    # no valid expression: R_A = 0; η = 1, c = 2: R_η = 2/3; R = 0.2 · 2/3 = 2/15
    result = run({"organizer": "<ANSWER>1+1; 9</ANSWER>"})
    assert result.status is EpisodeStatus.COMPLETED
    assert result.score is not None and result.score.correct == 0
    assert_rewards(result, 0.0, 2 / 3, 2 / 15)


def test_reward_config_reaches_the_reward() -> None:
    # λ = 0.5, τ = 1: R_η = min(153/128 / 2, 1) / 1 = 153/256; R = 1 + 0.5 · 153/256 = 665/512
    result = run(FORK_SCRIPT, capacity=2, rewards=RewardConfig(concurrency_weight=0.5, tau=1.0))
    assert_rewards(result, 1.0, 153 / 256, 665 / 512)


@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_format_error_episode_gets_r_fe(capacity: int) -> None:
    # a join of a fork that never happened: a format error; R = R_FE whatever the capacity or answer
    result = run(
        {"organizer": "abc<JOIN-3><ANSWER>1+2+3+4; 2*3+4</ANSWER>"},
        capacity=capacity,
        rewards=RewardConfig(format_error_reward=-0.5),
    )
    assert result.status is EpisodeStatus.FORMAT_ERROR
    assert [e["kind"] for e in result.format_errors] == ["join_unknown"]
    assert result.score is None
    assert result.rewards.format_error is True
    assert (result.rewards.accuracy, result.rewards.concurrency, result.rewards.total) == (0.0, 0.0, -0.5)


def test_parallel_thinking_votes_and_uses_k_as_capacity() -> None:
    # k = 2 traces of 31 and 42 tokens: T = 42, η = (31 + 42)/42 = 73/42; c = k = 2:
    # η/c = 73/84 ≈ 0.87 > τ: R_η = 1; R_A = 1 (below); R = 1.2
    t1 = "<ANSWER>1+2+3+4; 2*3+4</ANSWER>"
    t2 = "think more.<ANSWER>2*3+4; (1+4)*2</ANSWER>"  # 11 + 31 = 42 tokens
    result = run({"trace-1": t1, "trace-2": t2}, mode=Mode.PARALLEL, parallel_k=2)
    assert result.status is EpisodeStatus.COMPLETED
    assert (result.capacity, result.latency) == (2, 42)
    assert math.isclose(result.eta, 73 / 42)
    # votes: 2*3+4 twice, then 1+2+3+4 (seen first) and (1+4)*2 once each; the vote lists all three and
    # the score counts the first n_s = 2, both correct
    assert result.answer == "2*3+4; 1+2+3+4; (1+4)*2"
    assert result.score is not None and (result.score.correct, result.score.needed) == (2, 2)
    assert_rewards(result, 1.0, 1.0, 1.0 + LAM)


def test_failed_episode_scores_nothing() -> None:
    # an organizer with no script: the backend raises, the episode fails; no score, η = 0: R_η = 0, R = 0
    result = run({"someone-else": "x"})
    assert result.status is EpisodeStatus.FAILED
    assert result.error is not None and "no script for agent" in result.error
    assert result.score is None and (result.latency, result.eta) == (0, 0.0)
    assert_rewards(result, 0.0, 0.0, 0.0)
