"""Gateway load: submissions and reads per second, p50/p99, with API keys on and off; the gateway's memory.

Usage::

    PYTHONPATH=. python -m bench.gateway_load [--requests 1000] [--concurrency 16] \
        [--modes off,keys,keys-nocache] [--setup distributed|embedded]

Each mode starts a fresh gateway process (``python -m services.gateway`` on 127.0.0.1, a free port):

* ``distributed`` (default): the gateway alone, as in production: ``ASYNCTHINK_BUS=redis`` on a Redis
  database it may flush (``--redis-url``, default db 12) and a scratch PostgreSQL database (created from
  ``--pg-url``'s server and dropped after). No organizer runs, so a submission costs what the gateway
  does for it (validate, authenticate, insert, publish) and nothing else;
* ``embedded``: the laptop setup: SQLite, the in-process bus and an organizer in the same process over
  the scripted backend (``ASYNCTHINK_BACKEND_FACTORY``; episodes finish in milliseconds), so submissions
  compete with the episodes they start.

Then it runs:

1. a warm-up of 50 submissions and reads (not counted);
2. ``POST /v1/problems``: ``--requests`` countdown submissions, ``--concurrency`` at a time;
3. ``GET /v1/episodes/{id}``: ``--requests`` reads of the episodes just submitted, round robin.

With ``--rounds N`` every mode runs N times, the modes interleaved, and each mode's figures cover all its
rounds (its memory: the first start, the highest peak, the last end).

Modes: ``off`` (``ASYNCTHINK_AUTH=off``, no header), ``keys`` (``ASYNCTHINK_AUTH=keys``, a bearer key
created in the database beforehand, with a rate limit high enough never to refuse, so the token bucket
runs on every request; verified keys are cached for the default 2 s) and ``keys-nocache``
(``ASYNCTHINK_AUTH_CACHE_S=0``: every request reads the key's row). The cost of auth is each keyed
mode's figures over ``off``'s. The gateway's resident memory (``VmRSS`` of its process) is sampled every
100 ms: at the start of the measured part, its peak, and at the end.

Limits: client and server share the machine (the client's CPU time shows in every mode alike); only
loopback is reached; everything is bounded by ``--requests`` and ``--timeout-s`` per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BODY = {"task": "countdown", "payload": {"numbers": [3, 7, 25, 50], "target": 75}}


def scripted_backend(settings: Any) -> Any:
    """For ``ASYNCTHINK_BACKEND_FACTORY``: one fork, one join, an answer, replayed instantly."""
    from shared.backends.scripted import ScriptedBackend

    def script(agent: str, prompt: str) -> str:
        if agent == "organizer":
            return "<FORK-1>25 50</FORK-1><JOIN-1><ANSWER>25+50; 3*25</ANSWER>"
        return "<RETURN>25+50</RETURN>"

    return ScriptedBackend(script)


@dataclass
class Phase:
    route: str
    latencies: list[float]
    seconds: float
    errors: int
    ids: list[str] = field(default_factory=list)  # episodes a submission phase created

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Run:
    mode: str
    phases: list[Phase] = field(default_factory=list)
    rss_mib: tuple[float, float, float] = (0.0, 0.0, 0.0)  # start, peak, end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(_rss_mib(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(_rss_mib(self.pid))


@dataclass
class Setup:
    name: str  # distributed | embedded
    pg_url: str  # the PostgreSQL server (distributed): a scratch database is created there
    redis_url: str  # a Redis database the bench may flush (distributed)


def _database(home: Path, setup: Setup) -> tuple[str, Any]:
    """A fresh database URL and a function that drops it."""
    if setup.name == "embedded":
        return f"sqlite:///{home / 'load.db'}", lambda: None
    import secrets

    from sqlalchemy import create_engine, text

    from shared.store.db import normalize_url

    admin = normalize_url(setup.pg_url)
    name = f"asyncthink_load_{secrets.token_hex(4)}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    return admin.set(database=name).render_as_string(hide_password=False), drop


def _flush_redis(setup: Setup) -> None:
    if setup.name == "distributed":
        import redis

        print(f"flushing the Redis database {setup.redis_url} (--redis-url)", file=sys.stderr)
        client = redis.Redis.from_url(setup.redis_url)
        client.flushdb()
        client.close()


def _prepare(home: Path, mode: str, setup: Setup, url: str) -> tuple[dict[str, str], dict[str, str]]:
    """Environment for the gateway process and headers for the client."""
    from shared.auth import Scope
    from shared.store import make_engine, migrate, repository, session_factory

    migrate(url)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ASYNCTHINK_DATABASE_URL": url,
        "ASYNCTHINK_BUS": "inprocess" if setup.name == "embedded" else "redis",
        "ASYNCTHINK_REDIS_URL": setup.redis_url,
        "ASYNCTHINK_BACKEND_FACTORY": "bench.gateway_load:scripted_backend",
        "ASYNCTHINK_ENVIRONMENT": "development",
    }
    if mode == "off":
        return env | {"ASYNCTHINK_AUTH": "off"}, {}
    engine = make_engine(url)
    with session_factory(engine)() as s:
        _, key = repository.create_api_key(
            s, name="load", scopes=[Scope.SUBMIT, Scope.READ], rate_limit_per_minute=10_000_000
        )
    engine.dispose()
    env |= {"ASYNCTHINK_AUTH": "keys"}
    if mode == "keys-nocache":
        env |= {"ASYNCTHINK_AUTH_CACHE_S": "0"}
    return env, {"Authorization": f"Bearer {key}"}


async def _phase(client: Any, route: str, calls: list[Any], concurrency: int, deadline: float) -> Phase:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)
    results: list[str] = []

    async def worker() -> None:
        nonlocal errors
        while not queue.empty() and time.monotonic() < deadline:
            call = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                r = await call(client)
                ok = r.status_code < 400
            except Exception:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
                if route.startswith("POST"):
                    results.append(r.json()["episode_id"])
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Phase(route, latencies, time.perf_counter() - start, errors, results)


async def _drive(base: str, headers: dict[str, str], n: int, concurrency: int, timeout_s: float, sampler: Any) -> list[Phase]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        deadline = time.monotonic() + timeout_s

        def post() -> Any:
            return lambda c: c.post("/v1/problems", json=BODY)

        warm = await _phase(client, "POST warm-up", [post() for _ in range(50)], concurrency, deadline)
        ids = warm.ids
        await _phase(client, "GET warm-up", [_get(i) for i in ids], concurrency, deadline)
        sampler.samples.clear()
        submit = await _phase(client, "POST /v1/problems", [post() for _ in range(n)], concurrency, deadline)
        ids = submit.ids or ids
        read = await _phase(
            client, "GET /v1/episodes/{id}", [_get(ids[k % len(ids)]) for k in range(n)], concurrency, deadline
        )
    return [submit, read]


def _get(episode_id: str) -> Any:
    return lambda c: c.get(f"/v1/episodes/{episode_id}")


def run_mode(mode: str, n: int, concurrency: int, timeout_s: float, setup: Setup) -> Run:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        _flush_redis(setup)
        url, drop = _database(Path(tmp), setup)
        env, headers = _prepare(Path(tmp), mode, setup, url)
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=tmp, env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway ({mode}) did not start")
                time.sleep(0.1)
            with RssSampler(proc.pid) as sampler:
                phases = asyncio.run(_drive(base, headers, n, concurrency, timeout_s, sampler))
            samples = sampler.samples or [0.0]
            return Run(mode, phases, (samples[0], max(samples), samples[-1]))
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            drop()
            _flush_redis(setup)


def merge(into: Run, run: Run) -> None:
    """Add ``run``'s requests to ``into`` (rates over the summed time; RSS: first start, max peak, last end)."""
    if not into.phases:
        into.phases, into.rss_mib = run.phases, run.rss_mib
        return
    for a, b in zip(into.phases, run.phases, strict=True):
        a.latencies += b.latencies
        a.seconds += b.seconds
        a.errors += b.errors
    into.rss_mib = (into.rss_mib[0], max(into.rss_mib[1], run.rss_mib[1]), run.rss_mib[2])


def table(runs: list[Run]) -> str:
    lines = [f"{'mode':<13} {'route':<22} {'ok':>6} {'err':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"]
    for run in runs:
        for p in run.phases:
            lines.append(
                f"{run.mode:<13} {p.route:<22} {len(p.latencies):>6} {p.errors:>4} {p.rate:>8.1f} "
                f"{p.pct(0.5):>8.2f} {p.pct(0.99):>8.2f}"
            )
    base = next((r for r in runs if r.mode == "off"), None)
    if base is not None:
        lines.append("")
        lines.append(f"{'cost of auth':<13} {'route':<22} {'req/s off/keys':>15} {'p50 keys/off':>13} {'p99 keys/off':>13}")
        for run in runs:
            if run is base:
                continue
            for p, q in zip(run.phases, base.phases, strict=True):
                lines.append(
                    f"{run.mode:<13} {p.route:<22} {q.rate / p.rate if p.rate else float('nan'):>15.2f} "
                    f"{p.pct(0.5) / q.pct(0.5):>13.2f} {p.pct(0.99) / q.pct(0.99):>13.2f}"
                )
    lines.append("")
    lines.append(f"{'gateway RSS':<13} {'start MiB':>10} {'peak MiB':>10} {'end MiB':>10}")
    for run in runs:
        start, peak, end = run.rss_mib
        lines.append(f"{run.mode:<13} {start:>10.1f} {peak:>10.1f} {end:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per route and mode (default 1000)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--modes", default="off,keys,keys-nocache", help="comma-separated: off, keys, keys-nocache")
    p.add_argument("--timeout-s", type=float, default=300, help="time limit per mode (default 300)")
    p.add_argument("--rounds", type=int, default=1, help="run every mode this many times, interleaved (default 1)")
    p.add_argument("--setup", choices=("distributed", "embedded"), default="distributed")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                   help="PostgreSQL server for the scratch database (distributed)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="a Redis database it may flush")
    args = p.parse_args(argv)
    setup = Setup(args.setup, args.pg_url, args.redis_url)
    modes = [m.strip() for m in args.modes.split(",")]
    runs: dict[str, Run] = {}
    for _ in range(args.rounds):  # modes interleaved, so a drift in the machine's load hits each alike
        for mode in modes:
            merge(runs.setdefault(mode, Run(mode)), run_mode(mode, args.requests, args.concurrency, args.timeout_s, setup))
    print(
        f"{args.setup} setup, {args.requests} requests per route and round, {args.rounds} round(s), "
        f"{args.concurrency} in flight, {os.cpu_count()} CPUs\n"
    )
    print(table(list(runs.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
