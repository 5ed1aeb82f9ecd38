"""Tool workers: endpoints that answer a fork without a model (``<FORK-i@name>query</FORK-i>``).

Two tools, both pure functions of their sub-query (a worker sees only its sub-query):

* ``python``: exact arithmetic with the countdown expression parser (:mod:`shared.tasks.expr`: a
  hand-written tokenizer and recursive descent, never ``eval``). Non-negative integers, ``+ - * /``
  (and their Unicode forms), parentheses, several expressions separated by ``;`` or newlines; the
  takeaway is ``expr = value`` per expression (a fraction where the division is not exact), or an
  error text that says what was wrong.
* ``verify``: checks countdown candidates against a problem under the task's rules
  (:func:`shared.tasks.expr.check_solution`). The query carries the problem, since the tool sees
  nothing else::

      3 7 25 50 -> 75: 50+25; 3*25; 25+50; 7*11; 75

  (numbers, ``->``, the target, ``:``, candidates separated by ``;``). Candidates are checked in order
  and each gets one line of the takeaway, joined by ``; ``: ``ok <expr>`` for a valid solution not
  seen earlier in the query, else ``no <expr>: <why>`` where *why* is the wrong value, a number that is
  not given, a number used more often than given, fewer than two numbers, padding around a bare number,
  or ``same as <earlier>`` (equal in canonical form to an earlier ``ok``). An organizer keeps its
  exact list of verified solutions by listing the ones it already holds first: the ``ok`` entries of
  the reply are then the whole list, in order.

A tool decodes no tokens: its outcome has an empty timeline (it costs the organizer clock nothing) and
a segment without token ids. Tools run in process (:func:`local_endpoints`: the embedded organizer,
evaluation and GRPO rollouts) or in the Celery ``tool`` queue (``services/workers``).

Limits: at most ``MAX_EXPRESSIONS`` expressions (or candidates) per query, each capped by the parser's
length and nesting limits, so a tool call is bounded; no variables, functions, powers, decimals or unary
minus. The bounds are checked before any work: a query over ``MAX_QUERY_CHARS`` is refused unread, and
expressions are read one at a time, stopping at the first one past the limit. An error quotes at most
``QUOTE_CHARS`` of an expression, a takeaway is cut to ``MAX_RETURN_CHARS``, and the stored segment keeps
at most ``MAX_QUERY_CHARS`` of the query.
"""

from __future__ import annotations

import re
import time
from fractions import Fraction

from shared.agents import WorkerEndpoint, worker_segment
from shared.messages import WorkerOutcome, WorkerTask
from shared.tasks.expr import MAX_EXPR_CHARS, Canonical, ExprError, check_solution, evaluate, parse

MAX_EXPRESSIONS = 16
MAX_QUERY_CHARS = 64 + MAX_EXPRESSIONS * (MAX_EXPR_CHARS + 1)  # a verify header, then every expression at its longest
MAX_RETURN_CHARS = 4096  # the takeaway the organizer reads (and the store keeps)
QUOTE_CHARS = 60  # of an expression, in an error text
MAX_NUMBERS = 8
TOOL_NAMES = ("python", "verify")
VERIFY_FORMAT = "numbers -> target: candidate; candidate (e.g. 3 7 25 50 -> 75: 50+25; 3*25)"

_VERIFY = re.compile(r"^\s*(?P<numbers>[0-9][0-9 ,]*?)\s*->\s*(?P<target>[0-9]+)\s*:(?P<candidates>.*)$", re.S)


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


_EXPRESSION = re.compile(r"[^;\n]+")  # expressions are separated by ';' or newlines


def _parts(text: str, limit: int = MAX_EXPRESSIONS) -> list[str]:
    """The non-empty ``;``/newline-separated parts, read one at a time: at most ``limit + 1`` (one more
    than allowed means too many; the rest is never read)."""
    parts: list[str] = []
    for match in _EXPRESSION.finditer(text):
        if match.group().strip():
            parts.append(match.group().strip())
            if len(parts) > limit:
                break
    return parts


def _quote(text: str) -> str:
    return repr(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _too_long(tool: str, query: str) -> tuple[str, str] | None:
    if len(query) <= MAX_QUERY_CHARS:
        return None
    return (
        f"[{tool}: the query is {len(query)} characters; at most {MAX_QUERY_CHARS} "
        f"({MAX_EXPRESSIONS} expressions of at most {MAX_EXPR_CHARS})]",
        "tool_error",
    )


def evaluate_arithmetic(query: str) -> tuple[str, str | None]:
    """``(takeaway, error)`` for one ``python`` query; ``error`` is None when every expression evaluated.

    >>> evaluate_arithmetic("3*(4+5); 7/2")
    ('3*(4+5) = 27; 7/2 = 7/2', None)
    """
    refused = _too_long("python", query)
    if refused is not None:
        return refused
    parts = _parts(query)
    if not parts:
        return "[python: empty query; send an arithmetic expression such as 3*(4+5)]", "tool_error"
    if len(parts) > MAX_EXPRESSIONS:
        return f"[python: at most {MAX_EXPRESSIONS} expressions per query]", "tool_error"
    out: list[str] = []
    for expr in parts:
        try:
            out.append(f"{expr} = {_fmt(evaluate(parse(expr)))}")
        except ExprError as exc:
            return f"[python: cannot evaluate {_quote(expr)}: {exc}]", "tool_error"
    return _cut("; ".join(out), MAX_RETURN_CHARS), None


def parse_verify_query(query: str) -> tuple[list[int], int, list[str]]:
    """``(numbers, target, candidates)`` of a ``verify`` query; ValueError saying what is wrong."""
    m = _VERIFY.match(query)
    if m is None:
        raise ValueError(f"send {VERIFY_FORMAT}")
    numbers = [int(x) for x in re.split(r"[ ,]+", m.group("numbers").strip()) if x]
    if not 2 <= len(numbers) <= MAX_NUMBERS:
        raise ValueError(f"give 2 to {MAX_NUMBERS} numbers before '->'")
    candidates = _parts(m.group("candidates"))
    if not candidates:
        raise ValueError(f"no candidate after ':'; send {VERIFY_FORMAT}")
    if len(candidates) > MAX_EXPRESSIONS:
        raise ValueError(f"at most {MAX_EXPRESSIONS} candidates per query")
    return numbers, int(m.group("target")), candidates


def verify_candidates(numbers: list[int], target: int, candidates: list[str]) -> list[tuple[str, str | None]]:
    """``(candidate, None)`` for each new valid solution, ``(candidate, why not)`` for the others."""
    seen: dict[Canonical, str] = {}
    out: list[tuple[str, str | None]] = []
    for text in candidates:
        try:
            key = check_solution(text, numbers, target)
        except ExprError as exc:
            out.append((text, str(exc)))
            continue
        if key in seen:
            out.append((text, f"same as {seen[key]}"))
        else:
            seen[key] = text
            out.append((text, None))
    return out


def verify_query(query: str) -> tuple[str, str | None]:
    """``(takeaway, error)`` for one ``verify`` query (see the module docstring).

    >>> verify_query("3 7 25 50 -> 75: 50+25; 25+50; 7*3")
    ('ok 50+25; no 25+50: same as 50+25; no 7*3: evaluates to 21, not 75', None)
    """
    refused = _too_long("verify", query)
    if refused is not None:
        return refused
    try:
        numbers, target, candidates = parse_verify_query(query)
    except ValueError as exc:
        return f"[verify: {exc}]", "tool_error"
    lines = [f"ok {c}" if why is None else f"no {c}: {why}" for c, why in verify_candidates(numbers, target, candidates)]
    return _cut("; ".join(lines), MAX_RETURN_CHARS), None


def verified(takeaway: str) -> list[str]:
    """The ``ok`` candidates of a ``verify`` takeaway, in order (what an organizer keeps)."""
    return [part[3:].strip() for part in takeaway.split("; ") if part.startswith("ok ")]


def tool_reply(endpoint: str | None, query: str) -> tuple[str, str | None]:
    """``(takeaway, error)`` of the tool ``endpoint`` for ``query`` (what its Join injects)."""
    if endpoint == "python":
        return evaluate_arithmetic(query)
    if endpoint == "verify":
        return verify_query(query)
    return f"[no tool {endpoint!r}; known tools: {', '.join(TOOL_NAMES)}]", "unknown_endpoint"


def run_tool(task: WorkerTask) -> WorkerOutcome:
    """Run the tool named by ``task.endpoint`` on the sub-query; an unknown tool gets an error outcome."""
    start = time.time()
    returned, error = tool_reply(task.endpoint, task.query)
    query = _cut(task.query, MAX_QUERY_CHARS)  # what the store keeps of an oversized query
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


class ToolWorker:
    """A tool as an in-process worker endpoint (the tool is named by each task's endpoint)."""

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        return run_tool(task)


# The ``python`` tool's original class name, kept for callers that use it.
PythonToolWorker = ToolWorker


def local_endpoints() -> dict[str | None, WorkerEndpoint]:
    """The worker endpoints that run inside the organizer's process: the tools. (The model's own workers
    need no entry: the engine runs them in process unless an endpoint for ``None`` is given.)"""
    return {name: ToolWorker() for name in TOOL_NAMES}
