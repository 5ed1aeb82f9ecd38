"""Math: JSONL loading with clear errors, math-verify scoring (also off the main thread), vote."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from shared.tasks import get_task
from shared.tasks.base import Mode, Problem
from shared.tasks.math import MathTask, load_jsonl

TASK = MathTask()


def problem(answer: str) -> Problem:
    return TASK.problem_from_payload({"problem": "What is it?", "answer": answer}, "q")


def test_bundled_splits() -> None:
    aime, amc = TASK.problems("aime24", 30), TASK.problems("amc23", 40)
    assert aime[0].id == "aime24-60" and aime[0].reference == "204"
    assert amc[0].id == "amc23-0" and amc[0].reference == "27"
    assert TASK.problems("test", 70) == aime + amc
    assert len(TASK.problems("aime24", 3)) == 3
    with pytest.raises(ValueError, match="30 problems"):
        TASK.problems("aime24", 31)
    with pytest.raises(ValueError, match="JSONL"):
        TASK.problems("train", 1)
    with pytest.raises(ValueError, match="no such"):
        TASK.problems("/nonexistent.jsonl", 1)


def test_load_jsonl_path_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": 1, "problem": "1+1?", "answer": 2}) + "\n\n")
    [p] = TASK.problems(str(good), 1)
    assert (p.id, p.payload, p.reference) == ("1", {"problem": "1+1?", "answer": "2"}, "2")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"id": "a", "problem": "x", "answer": "1"})
        + "\n"
        + json.dumps({"id": "b", "problem": "y"})
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing 'answer'"):
        load_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        load_jsonl(bad)
    bad.write_text('["a"]\n')
    with pytest.raises(ValueError, match="JSON object"):
        load_jsonl(bad)


@pytest.mark.parametrize(
    ("answer", "reference", "accuracy"),
    [
        ("204", "204", 1.0),
        ("\\boxed{204}", "204", 1.0),
        ("The answer is $\\boxed{204}$.", "204", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("\\frac{2}{4}", "\\frac12", 1.0),
        ("-1", "-1", 1.0),
        ("203", "204", 0.0),
        ("no idea", "204", 0.0),
        ("", "204", 0.0),
    ],
)
def test_score(answer: str, reference: str, accuracy: float) -> None:
    s = TASK.score(problem(reference), answer)
    assert s.accuracy == accuracy and s.correct == int(accuracy) and s.needed == 1


def test_score_without_answer_or_reference() -> None:
    assert TASK.score(problem("3"), None).details == {"error": "no answer"}
    unknown = TASK.problem_from_payload({"problem": "?"})
    assert unknown.reference is None and TASK.score(unknown, "3").accuracy == 0.0


def test_score_works_off_the_main_thread() -> None:
    results: list[float] = []
    thread = threading.Thread(
        target=lambda: results.append(TASK.score(problem("27"), "\\boxed{27}").accuracy)
    )
    thread.start()
    thread.join()
    assert results == [1.0]

    async def in_executor() -> float:
        loop = asyncio.get_running_loop()
        s = await loop.run_in_executor(None, TASK.score, problem("1/2"), "0.5")
        return s.accuracy

    assert asyncio.run(in_executor()) == 1.0


def test_aggregate_majority_by_equivalence() -> None:
    assert TASK.aggregate(["\\boxed{1/2}", "3", "0.5", "\\frac{2}{4}", "3"]) == "\\boxed{1/2}"
    assert TASK.aggregate(["7", "8", "8"]) == "8"
    assert TASK.aggregate(["7", "8"]) == "7"  # tie: first seen
    assert TASK.aggregate(["foo", "Foo ", "bar"]) == "foo"  # unparsable: normalized text
    assert TASK.aggregate([None, " "]) is None


def test_prompts_and_payload() -> None:
    task = get_task("math")
    assert task.name == "math" and task.default_capacity == 4
    p = problem("3")
    assert task.organizer_prompt(p, Mode.SEQUENTIAL) == "Math. What is it?\n"
    assert task.organizer_prompt(p, Mode.ASYNCTHINK) == "Math. What is it?\nYou may fork workers.\n"
    assert task.worker_prompt("Find x.") == "Worker. Find x.\n"
    with pytest.raises(ValueError, match="problem"):
        TASK.problem_from_payload({"answer": "3"})
    a, b = TASK.problem_from_payload({"problem": "Q"}), TASK.problem_from_payload({"problem": "Q"})
    assert a.id == b.id and a.id.startswith("math-")
