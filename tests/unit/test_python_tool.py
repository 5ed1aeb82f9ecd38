"""The ``python`` tool's limits: checked before work, errors and results bounded (issue 13, "Bad input")."""

from __future__ import annotations

import pytest

import shared.tools
from services.workers.tools import MAX_RETURN_CHARS, evaluate_arithmetic, run_tool
from shared.messages import WorkerTask
from shared.tools import MAX_EXPRESSIONS, MAX_QUERY_CHARS


def test_python_tool_checks_its_limits_before_splitting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10 MB query is refused on its length alone: the splitter never reads it (counted, not timed)."""
    split: list[int] = []
    real_parts = shared.tools._parts

    def counting_parts(text: str, limit: int = MAX_EXPRESSIONS) -> list[str]:
        split.append(len(text))
        return real_parts(text, limit)

    monkeypatch.setattr(shared.tools, "_parts", counting_parts)
    query = "1+1;" * 2_500_000  # 4 chars x 2.5 M = 10 MB
    returned, error = evaluate_arithmetic(query)
    assert error == "tool_error" and len(returned) < 300
    assert returned.startswith(f"[python: the query is {len(query)} characters; at most {MAX_QUERY_CHARS}")
    assert split == []
    assert evaluate_arithmetic("1+1;2*3") == ("1+1 = 2; 2*3 = 6", None)
    assert split == [7]  # the spy does see a split: the empty list above is not for want of looking


def test_python_tool_error_does_not_echo_the_whole_expression() -> None:
    returned, error = evaluate_arithmetic("1+" * 140 + "x")
    assert error == "tool_error" and len(returned) < 300


def test_python_tool_bounds_what_it_returns_and_stores() -> None:
    task = WorkerTask(
        episode_id="e", agent="1", fork_id=1, parent="organizer", endpoint="python", query="9" * 5_000_000,
        task="countdown", budget=64,
    )
    outcome = run_tool(task)
    assert outcome.error == "tool_error"
    stored = outcome.model_dump_json()
    assert len(stored) < 4 * MAX_RETURN_CHARS
    big = "; ".join(["*".join(["99999999999"] * 25)] * 16)
    returned, error = evaluate_arithmetic(big)
    assert error is None and len(returned) <= MAX_RETURN_CHARS
