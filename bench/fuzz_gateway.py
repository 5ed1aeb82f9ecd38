"""Fuzz the gateway with schemathesis over its own OpenAPI schema: no 5xx, no row written by a refusal.

Usage::

    PYTHONPATH=. python -m bench.fuzz_gateway [--seconds 60] [--examples 100]

The gateway runs for real (uvicorn on 127.0.0.1, a free port) in the embedded setup over the scripted
backend (episodes finish in milliseconds), with API keys required, a bootstrap admin key and no rate
limit; its database is a SQLite file in a temporary directory. For every operation of ``/openapi.json``
and both of schemathesis's generation modes (``positive``: requests the schema allows; ``negative``:
requests it forbids), Hypothesis draws up to ``--examples`` cases (derandomized: the same cases on every
run), each
sent with the admin key. Two things are checked on every answer:

* its status is below 500;
* when it is a refusal (4xx), the number of stored problems and episodes did not change.

The table gives, per operation and mode, the requests sent and the answers by status class; the last
line the totals and the failures. ``--seconds`` bounds the whole run: cases drawn after it are not sent.
The CI test ``tests/unit/gateway/test_fuzz.py`` runs :func:`fuzz` with a smaller budget.

Limits: only loopback is reached; the trainer's command routes (``NEEDS_TRAINER``) are left out, since
without a trainer service they wait their ``timeout_s`` and answer 504 by design; a case ``requests`` cannot send (a header value it refuses) is counted
as ``unsent``; response bodies are not checked against the schema, only statuses and rows.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN_KEY = "fuzz-admin-" + "0123456789abcdef" * 3


@dataclass
class Finding:
    operation: str
    mode: str
    status: int | None
    what: str
    curl: str


@dataclass
class FuzzReport:
    counts: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def requests(self) -> int:
        return sum(c["sent"] for c in self.counts.values())

    @property
    def server_errors(self) -> int:
        return sum(c["5xx"] for c in self.counts.values())

    def table(self) -> str:
        cols = ("sent", "2xx", "4xx", "5xx", "unsent")
        lines = [f"{'operation':<44} {'mode':<9}" + "".join(f"{c:>8}" for c in cols)]
        total: Counter[str] = Counter()
        for (op, mode), c in sorted(self.counts.items()):
            total.update(c)
            lines.append(f"{op[:44]:<44} {mode:<9}" + "".join(f"{c[k]:>8}" for k in cols))
        lines.append(f"{'all':<44} {'':<9}" + "".join(f"{total[k]:>8}" for k in cols))
        lines.append(
            f"{self.requests} requests in {self.seconds:.1f} s, {self.server_errors} answers >= 500, "
            f"{sum(f.what.startswith('rows') for f in self.findings)} refusals that wrote rows"
            + (" (time budget reached)" if self.stopped_early else "")
        )
        return "\n".join(lines)


def _script(agent: str, prompt: str) -> str:
    if agent == "organizer":
        return "<FORK-1>25 50</FORK-1><JOIN-1><ANSWER>25+50; 3*25</ANSWER>"
    if agent.startswith("trace-"):
        return "<ANSWER>25+50</ANSWER>"
    return "<RETURN>25+50</RETURN>"


# Operations that wait for the trainer service to answer over the bus: without one running they answer
# 504 by design after their timeout_s (up to an hour), so fuzzing them measures the wait. Their input
# validation and answers are covered by tests/unit/gateway/test_admin.py with a trainer stand-in.
NEEDS_TRAINER = ("/v1/admin/trainer", "/v1/admin/versions/{version}/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_gateway(home: Path, **settings: Any) -> Iterator[tuple[str, Callable[[], tuple[int, int]]]]:
    """A keyed gateway (embedded, scripted backend, SQLite under ``home``) on loopback: its base URL and
    a function counting stored (problems, episodes)."""
    import uvicorn
    from sqlalchemy import func, select

    from services.gateway.app import create_app
    from shared.backends.scripted import ScriptedBackend
    from shared.config import Settings
    from shared.store import make_engine
    from shared.store.models import Episode, ProblemRow

    url = f"sqlite:///{home / 'fuzz.db'}"
    values: dict[str, Any] = {
        "database_url": url, "bus": "inprocess", "auth": "keys", "admin_key": ADMIN_KEY,
        "rate_limit_per_minute": 0,
    }  # fmt: skip
    values.update(settings)
    app = create_app(Settings(**values), embedded_backend=ScriptedBackend(_script), bind_host="127.0.0.1")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, name="fuzz-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    engine = make_engine(url)

    def rows() -> tuple[int, int]:
        with engine.connect() as conn:
            problems = conn.execute(select(func.count()).select_from(ProblemRow)).scalar_one()
            episodes = conn.execute(select(func.count()).select_from(Episode)).scalar_one()
        return int(problems), int(episodes)

    try:
        yield f"http://127.0.0.1:{port}", rows
    finally:
        server.should_exit = True
        thread.join(30)
        engine.dispose()


def _bound(check: Callable[..., None], *args: Any) -> Callable[[Any], None]:
    """``check`` with its leading arguments bound, as a plain function of ``case`` (what @given takes)."""

    def test(case: Any) -> None:
        check(*args, case)

    return test


def fuzz(
    base_url: str,
    rows: Callable[[], tuple[int, int]],
    *,
    admin_key: str = ADMIN_KEY,
    seconds: float = 60.0,
    examples: int = 100,
) -> FuzzReport:
    """Run every operation of the gateway's schema in both generation modes (see the module docstring)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    headers = {"Authorization": f"Bearer {admin_key}"}
    spec = requests.get(f"{base_url}/openapi.json", headers=headers, timeout=30)
    spec.raise_for_status()
    schema = schemathesis.openapi.from_dict(spec.json())
    report = FuzzReport()
    start = time.monotonic()
    deadline = start + seconds
    session = requests.Session()
    operations = [
        op for op in (result.ok() for result in schema.get_all_operations())
        if not op.path.startswith(NEEDS_TRAINER)
    ]
    def check(name: str, mode: str, counts: Counter[str], case: Any) -> None:
        if time.monotonic() > deadline:
            report.stopped_early = True
            return
        before = rows()
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, ValueError, UnicodeError):
            counts["unsent"] += 1
            return
        counts["sent"] += 1
        status = response.status_code
        counts[f"{status // 100}xx"] += 1
        if status >= 500:
            report.findings.append(
                Finding(name, mode, status, f"{status}: {response.text[:200]}", case.as_curl_command(headers))
            )
        elif status >= 400 and rows() != before:
            report.findings.append(
                Finding(name, mode, status, f"rows written by a {status}", case.as_curl_command(headers))
            )

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for operation in operations:
            name = f"{operation.method.upper()} {operation.path}"
            counts = report.counts.setdefault((name, mode.value), Counter())
            run = given(case=operation.as_strategy(generation_mode=mode))(_bound(check, name, mode.value, counts))
            try:
                settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )(run)()
            except Unsatisfiable:  # e.g. no way to break an operation without parameters (negative mode)
                counts["none"] += 1
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="time budget of the whole run (default 60)")
    p.add_argument("--examples", type=int, default=100, help="cases per operation and mode (default 100)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, serve_gateway(Path(tmp)) as (base, rows):
        report = fuzz(base, rows, seconds=args.seconds, examples=args.examples)
    print(report.table())
    for f in report.findings[:20]:
        print(f"\n{f.operation} [{f.mode}] {f.what}\n    {f.curl}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
