"""The ``python`` tool's limits: checked before work, errors and results bounded (issue 13, "Bad input")."""

from __future__ import annotations

import time

from services.workers.tools import MAX_RETURN_CHARS, evaluate_arithmetic, run_tool
from shared.messages import WorkerTask


def test_python_tool_checks_its_limits_before_splitting() -> None:
    query = "1+1;" * 2_500_000  # 10 MB
    start = time.perf_counter()
    returned, error = evaluate_arithmetic(query)
    assert time.perf_counter() - start < 0.05
    assert error == "tool_error" and len(returned) < 300


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
