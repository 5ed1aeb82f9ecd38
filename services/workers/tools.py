"""Tool workers of the ``tool`` queue: ``<FORK-i@python>expression</FORK-i>`` and ``<FORK-i@verify>query</FORK-i>``.

The tools themselves live in :mod:`shared.tools` (pure functions of the sub-query, so the embedded
organizer, evaluation and the trainer's rollouts run the same code without importing the services):

* ``python`` evaluates arithmetic exactly (``3*(4+5); 7/2`` -> ``3*(4+5) = 27; 7/2 = 7/2``);
* ``verify`` checks countdown candidates against the problem the query carries, under the task's rules,
  and says why each failing one fails::

      <FORK-2@verify>3 7 25 50 -> 75: 50+25; 25+50; 7*11</FORK-2>
      -> ok 50+25; no 25+50: same as 50+25; no 7*11: evaluates to 77, not 75

This module is where the services register them: :data:`TOOL_NAMES` are the endpoints the Celery
``tool`` queue serves (``services.workers.endpoint`` routes each of them there, ``services.workers.tasks``
runs them with :func:`run_tool`), and :func:`local_endpoints` is what the gateway's and the organizer's
in-process setups pass to the engine. A tool decodes no tokens: its outcome has an empty timeline.
"""

from __future__ import annotations

from shared.tools import (
    MAX_EXPRESSIONS,
    MAX_QUERY_CHARS,
    MAX_RETURN_CHARS,
    QUOTE_CHARS,
    TOOL_NAMES,
    PythonToolWorker,
    ToolWorker,
    evaluate_arithmetic,
    local_endpoints,
    run_tool,
    verify_query,
)

__all__ = [
    "MAX_EXPRESSIONS",
    "MAX_QUERY_CHARS",
    "MAX_RETURN_CHARS",
    "QUOTE_CHARS",
    "TOOL_NAMES",
    "PythonToolWorker",
    "ToolWorker",
    "evaluate_arithmetic",
    "local_endpoints",
    "run_tool",
    "verify_query",
]
