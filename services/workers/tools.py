"""Tool workers: the ``python`` arithmetic tool behind ``<FORK-i@python>expression</FORK-i>``.

The tool evaluates arithmetic exactly with the countdown expression parser
(:mod:`shared.tasks.expr`: a hand-written tokenizer and recursive descent, never ``eval``). It accepts
non-negative integers, ``+ - * /`` (and their Unicode forms), parentheses, and several expressions
separated by ``;`` or newlines; its takeaway is ``expr = value`` per expression (a fraction where the
division is not exact), or an error text that says what was wrong.

Limits: no variables, functions, powers, decimals or unary minus; at most ``MAX_EXPRESSIONS``
expressions, each capped by the parser's length and nesting limits, so evaluation is bounded. Both are
checked before any work: a query over ``MAX_QUERY_CHARS`` is refused unread, and expressions are read one
at a time, stopping at the first one past ``MAX_EXPRESSIONS``. An error quotes at most ``QUOTE_CHARS`` of the expression, the takeaway is
cut to ``MAX_RETURN_CHARS``, and the stored segment keeps at most ``MAX_QUERY_CHARS`` of the query. A tool
decodes no tokens: its outcome has an empty timeline (it costs the organizer clock nothing) and a
segment without token ids. Runs in process (embedded setup) or inside the Celery ``tool`` queue.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

from shared.agents import WorkerEndpoint, worker_segment
from shared.messages import WorkerOutcome, WorkerTask
from shared.tasks.expr import MAX_EXPR_CHARS, ExprError, evaluate, parse

MAX_EXPRESSIONS = 16
MAX_QUERY_CHARS = MAX_EXPRESSIONS * (MAX_EXPR_CHARS + 1)  # every expression at its longest, plus separators
MAX_RETURN_CHARS = 4096  # the takeaway the organizer reads (and the store keeps)
QUOTE_CHARS = 60  # of an expression, in an error text
TOOL_NAMES = ("python",)
_EXPRESSION = re.compile(r"[^;\n]+")  # expressions are separated by ';' or newlines


def _quote(text: str) -> str:
    return repr(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def evaluate_arithmetic(query: str) -> tuple[str, str | None]:
    """``(takeaway, error)`` for one tool query; ``error`` is None when every expression evaluated.

    >>> evaluate_arithmetic("3*(4+5); 7/2")
    ('3*(4+5) = 27; 7/2 = 7/2', None)
    """
    if len(query) > MAX_QUERY_CHARS:
        return (
            f"[python: the query is {len(query)} characters; at most {MAX_QUERY_CHARS} "
            f"({MAX_EXPRESSIONS} expressions of at most {MAX_EXPR_CHARS})]",
            "tool_error",
        )
    parts: list[str] = []
    for match in _EXPRESSION.finditer(query):  # stops at the first expression over the limit
        if match.group().strip():
            if len(parts) == MAX_EXPRESSIONS:
                return f"[python: at most {MAX_EXPRESSIONS} expressions per query]", "tool_error"
            parts.append(match.group().strip())
    if not parts:
        return "[python: empty query; send an arithmetic expression such as 3*(4+5)]", "tool_error"
    out: list[str] = []
    for expr in parts:
        try:
            out.append(f"{expr} = {_fmt(evaluate(parse(expr)))}")
        except ExprError as exc:
            return f"[python: cannot evaluate {_quote(expr)}: {exc}]", "tool_error"
    return _cut("; ".join(out), MAX_RETURN_CHARS), None


def run_tool(task: WorkerTask) -> WorkerOutcome:
    """Run the tool named by ``task.endpoint`` on the sub-query; an unknown tool gets an error outcome."""
    start = time.time()
    if task.endpoint == "python":
        returned, error = evaluate_arithmetic(task.query)
    else:
        returned, error = f"[no tool {task.endpoint!r}; known tools: {', '.join(TOOL_NAMES)}]", "unknown_endpoint"
    query = _cut(task.query, MAX_QUERY_CHARS)
    segment = worker_segment(
        task.model_copy(update={"query": query}),
        prompt=query,
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
