"""Tool workers: the ``python`` arithmetic tool behind ``<FORK-i@python>expression</FORK-i>``.

The tool evaluates arithmetic exactly with the countdown expression parser
(:mod:`shared.tasks.expr`: a hand-written tokenizer and recursive descent, never ``eval``). It accepts
non-negative integers, ``+ - * /`` (and their Unicode forms), parentheses, and several expressions
separated by ``;`` or newlines; its takeaway is ``expr = value`` per expression (a fraction where the
division is not exact), or an error text that says what was wrong.

Limits: no variables, functions, powers, decimals or unary minus; at most ``MAX_EXPRESSIONS``
expressions, each capped by the parser's length and nesting limits, so evaluation is bounded. A tool
decodes no tokens: its outcome has an empty timeline (it costs the organizer clock nothing) and a
segment without token ids. Runs in process (embedded setup) or inside the Celery ``tool`` queue.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

from shared.agents import WorkerEndpoint, worker_segment
from shared.messages import WorkerOutcome, WorkerTask
from shared.tasks.expr import ExprError, evaluate, parse

MAX_EXPRESSIONS = 16
TOOL_NAMES = ("python",)


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def evaluate_arithmetic(query: str) -> tuple[str, str | None]:
    """``(takeaway, error)`` for one tool query; ``error`` is None when every expression evaluated.

    >>> evaluate_arithmetic("3*(4+5); 7/2")
    ('3*(4+5) = 27; 7/2 = 7/2', None)
    """
    parts = [p.strip() for p in re.split(r"[;\n]", query) if p.strip()]
    if not parts:
        return "[python: empty query; send an arithmetic expression such as 3*(4+5)]", "tool_error"
    if len(parts) > MAX_EXPRESSIONS:
        return f"[python: at most {MAX_EXPRESSIONS} expressions per query]", "tool_error"
    out: list[str] = []
    for expr in parts:
        try:
            out.append(f"{expr} = {_fmt(evaluate(parse(expr)))}")
        except ExprError as exc:
            return f"[python: cannot evaluate {expr!r}: {exc}]", "tool_error"
    return "; ".join(out), None


def run_tool(task: WorkerTask) -> WorkerOutcome:
    """Run the tool named by ``task.endpoint`` on the sub-query; an unknown tool gets an error outcome."""
    start = time.time()
    if task.endpoint == "python":
        returned, error = evaluate_arithmetic(task.query)
    else:
        returned, error = f"[no tool {task.endpoint!r}; known tools: {', '.join(TOOL_NAMES)}]", "unknown_endpoint"
    segment = worker_segment(
        task,
        prompt=task.query,
        text=f"<RETURN>{returned}</RETURN>",
        returned=returned,
        wall_start=start,
        wall_end=time.time(),
        error=error,
    )
    return WorkerOutcome(returned=returned, timeline=[], segments=[segment], error=error)


class PythonToolWorker:
    """The ``python`` tool as an in-process worker endpoint (embedded setup)."""

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        return run_tool(task)


def local_endpoints() -> dict[str | None, WorkerEndpoint]:
    """The worker endpoints that run inside the organizer's process: the tools. (The model's own workers
    need no entry: the engine runs them in process unless an endpoint for ``None`` is given.)"""
    return {name: PythonToolWorker() for name in TOOL_NAMES}
