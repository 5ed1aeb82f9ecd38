"""Builders of engine results for store tests: real dataclasses, no model."""

from __future__ import annotations

import time

from shared.engine import EpisodeResult
from shared.messages import EpisodeStatus, SegmentRecord
from shared.metrics import Decode, ForkStep, JoinStep, Timeline
from shared.rewards import RewardParts
from shared.tasks.base import Mode, Problem, Score


def problem(problem_id: str = "cd-1", task: str = "countdown") -> Problem:
    return Problem(
        task=task, id=problem_id, payload={"numbers": [3, 7, 25, 50], "target": 75}, reference=None
    )


def segments(model_version: str = "v1") -> list[SegmentRecord]:
    now = time.time()
    # Token ids span the vocabulary (0, large ids) and the mask has injected (0) runs inside.
    organizer = SegmentRecord(
        agent="organizer",
        role="organizer",
        prompt="Find 4 expressions ...",
        prompt_ids=[151643, 0, 17, 42, 99999],
        completion_ids=[5, 6, 7, 8, 900, 901, 902, 9, 10, 0],
        completion_mask=[1, 1, 1, 1, 0, 0, 0, 1, 1, 1],
        text="<FORK-1>a</FORK-1><JOIN-1>x</JOIN-1><ANSWER>25+50</ANSWER>",
        generated_tokens=7,
        clock_start=0,
        clock_end=12,
        wall_start=now - 2.0,
        wall_end=now,
        model_version=model_version,
    )
    worker = SegmentRecord(
        agent="1",
        role="worker",
        fork_id=1,
        parent="organizer",
        query="try 25+50",
        prompt="Worker: try 25+50",
        prompt_ids=[1, 2, 3],
        completion_ids=[11, 12, 13, 14],
        completion_mask=[1, 1, 1, 1],
        text="<RETURN>25+50=75</RETURN>",
        returned="25+50=75",
        generated_tokens=4,
        clock_start=4,
        clock_end=8,
        wall_start=now - 1.5,
        wall_end=now - 1.0,
        model_version=model_version,
    )
    return [organizer, worker]


def result(
    episode_id: str = "ep-1",
    *,
    problem_id: str = "cd-1",
    task: str = "countdown",
    mode: Mode = Mode.ASYNCTHINK,
    status: EpisodeStatus = EpisodeStatus.COMPLETED,
    model_version: str = "v1",
) -> EpisodeResult:
    fe = status is EpisodeStatus.FORMAT_ERROR
    return EpisodeResult(
        episode_id=episode_id,
        problem=problem(problem_id, task),
        mode=mode,
        capacity=2,
        model_id="asyncthink-countdown-small",
        model_version=model_version,
        status=status,
        answer=None if fe else "25+50",
        score=None if fe else Score(accuracy=0.25, correct=1, needed=4, details={"valid": ["25+50"]}),
        rewards=RewardParts(
            accuracy=0.0 if fe else 0.25,
            concurrency=0.0 if fe else 0.5,
            format_error=fe,
            total=-1.0 if fe else 0.3,
        ),
        latency=12,
        eta=1.25,
        wall_time_s=2.0,
        format_errors=[{"kind": "unclosed_tag", "offset": 3, "message": "m", "agent": "organizer"}]
        if fe
        else [],
        timeline=Timeline.of(Decode(4), ForkStep(1, Timeline.of(Decode(4))), JoinStep(1), Decode(3)),
        segments=segments(model_version),
    )
