"""Orchestration overhead: Redis + Celery versus the in-process setup, against a bare Celery round trip.

Usage::

    python -m bench.orchestration [--roundtrips 300] [--episodes 256] [--concurrency 64] \\
        [--tokens-per-s 2000] [--skip-distributed]

The model is the scripted backend (``shared.backends.scripted``): it replays fixed text, so what is
measured is the orchestration, not a model. Both setups run the real :class:`OrganizerService`
(problems stream -> engine -> store + event stream); the distributed one dispatches forks to a real
Celery worker process (``--pool=threads``) through :class:`CeleryWorkerEndpoint` and stores traces in a
fresh PostgreSQL database; the in-process one uses :class:`InProcessBus`, local workers and SQLite.

What is printed (p50 / p99 over ``--roundtrips`` one-fork episodes run one at a time):

1. **bare Celery round trip**: ``echo.delay(x).get()`` over the same Redis — the yardstick;
2. **fork dispatch**: the organizer's ``fork`` event -> the worker starts (its segment's ``wall_start``);
   **join resume**: the worker's trace ends (``wall_end``, just before its outcome is stored and
   published) -> the organizer resumes (its ``worker_result`` event); **round trip**: ``fork`` ->
   ``worker_result`` for a worker that decodes instantly and is joined at once;
3. **episodes per second** with ``--concurrency`` episodes in flight (``--episodes`` in total, each
   with one fork and one join, instant decoding);
4. **wall / bound**: wall-clock episode time over the critical-path bound ``T / tokens-per-s`` for an
   episode with two overlapping workers decoding at ``--tokens-per-s``.

Ratios to the bare round trip are printed beside the figures, and the issue's targets beside them
(round trip <= 1.5x bare at p50 and p99; wall <= 1.05x bound). Nothing is asserted.

Limits: timestamps of fork and worker start come from two processes on one host (one wall clock); the
machine's load shows in every figure, the yardstick included, which is why it is measured in the same
run. The distributed part needs Redis (``--redis-url``, a database it may flush: default db 10) and
PostgreSQL (``--pg-url``, used to create and drop a scratch database).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.backends.scripted import ScriptedBackend, ScriptRouter
from shared.messages import EventKind

REPO = Path(__file__).resolve().parent.parent
RATE_ENV = "ASYNCTHINK_BENCH_TOKENS_PER_S"
PAYLOAD = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 1}

# Scripts, by the episode-id prefix "<kind>--": "rt" (one instant fork, joined at once) and "wall"
# (two overlapping workers at the fixed token rate; capacity 3).
SCRIPTS: dict[str, dict[str, str]] = {
    "rt": {
        "organizer": "<FORK-1>q</FORK-1><JOIN-1><ANSWER>1+2+3+4</ANSWER>",
        "1": "<RETURN>2*3+4</RETURN>",
    },
    "wall": {
        "organizer": "Plan two routes. " * 4
        + "<FORK-1>products</FORK-1>"
        + "Check sums while they work. " * 4
        + "<FORK-2>differences</FORK-2>"
        + "Keep checking sums by hand. " * 6
        + "<JOIN-1><JOIN-2>"
        + "Both back. <ANSWER>1+2+3+4</ANSWER>",
        "1": "Try every product of two numbers then add the rest. " * 5 + "<RETURN>2*3+4</RETURN>",
        "2": "Try every difference then multiply. " * 9 + "<RETURN>4*3-2</RETURN>",
    },
}


class BenchBackend(ScriptRouter):
    """Scripted backends routed by the episode id's prefix; "wall" decodes at a fixed rate."""

    model_id = "scripted-bench"

    def __init__(self, tokens_per_s: float) -> None:
        self._backends = {
            "rt": ScriptedBackend(SCRIPTS["rt"]),
            "wall": ScriptedBackend(SCRIPTS["wall"], tokens_per_s=tokens_per_s),
        }

    def route(self, request: Any) -> ScriptedBackend:
        return self._backends[(request.session or "").split("--", 1)[0]]


def backend_factory(settings: object = None) -> BenchBackend:
    """``ASYNCTHINK_BACKEND_FACTORY`` target for the benchmark's Celery worker process."""
    return BenchBackend(float(os.environ.get(RATE_ENV, "2000")))


# ----------------------------------------------------------------------------- statistics
def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Row:
    name: str
    p50: float
    p99: float
    unit: str = "ms"
    note: str = ""


@dataclass
class SetupResults:
    name: str
    dispatch: list[float] = field(default_factory=list)
    resume: list[float] = field(default_factory=list)
    roundtrip: list[float] = field(default_factory=list)
    episodes_per_s: float = 0.0
    wall_over_bound: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- a running setup
class Harness:
    """An organizer service on a bus and a store, plus helpers to submit and await episodes."""

    def __init__(self, bus: Any, session_factory: Callable[[], Any], service: Any) -> None:
        self.bus = bus
        self.session_factory = session_factory
        self.service = service
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.service.run_forever(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 60)

    async def submit(self, kind: str, **fields: Any) -> str:
        from shared.episode import EpisodeSettings
        from shared.messages import PROBLEMS_STREAM, SubmitProblem

        eid = f"{kind}--{uuid.uuid4().hex[:16]}"
        sub = SubmitProblem(
            episode_id=eid, task="countdown", problem_id=f"bench-{kind}", payload=PAYLOAD,
            settings=EpisodeSettings(**fields),
        )
        await self.bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
        return eid

    async def events(self, eid: str, timeout_s: float = 60.0) -> list[Any]:
        from services.runtime import events_until_finished

        return await events_until_finished(self.bus, eid, timeout_s=timeout_s)


async def measure(h: Harness, res: SetupResults, args: argparse.Namespace) -> None:
    # 2. fork dispatch, join resume and the round trip, one episode at a time.
    for i in range(args.roundtrips + args.warmup):
        eid = await h.submit("rt", worker_budget=64)
        events = await h.events(eid)
        fork = next(e for e in events if e.kind is EventKind.FORK)
        seg = next(e for e in events if e.kind is EventKind.SEGMENT and e.agent == "1").data["segment"]
        back = next(e for e in events if e.kind is EventKind.WORKER_RESULT)
        if i >= args.warmup:
            res.dispatch.append((seg["wall_start"] - fork.ts) * 1e3)
            res.resume.append((back.ts - seg["wall_end"]) * 1e3)
            res.roundtrip.append((back.ts - fork.ts) * 1e3)
    # 3. episodes per second with `concurrency` in flight.
    done_before = h.service.episodes_done
    t0 = time.perf_counter()
    sent = 0
    while h.service.episodes_done - done_before < args.episodes:
        in_flight = sent - (h.service.episodes_done - done_before)
        while sent < args.episodes and in_flight < args.concurrency:
            await h.submit("rt", worker_budget=64)
            sent += 1
            in_flight += 1
        await asyncio.sleep(0.002)
    res.episodes_per_s = args.episodes / (time.perf_counter() - t0)
    # 4. wall-clock time over the critical-path bound.
    for _ in range(args.wall_episodes):
        eid = await h.submit("wall", capacity=3, worker_budget=1024)
        events = await h.events(eid)
        fin = next(e for e in events if e.kind is EventKind.FINISHED)
        started = next(e for e in events if e.kind is EventKind.STARTED)
        bound = fin.data["latency"] / args.tokens_per_s
        res.wall_over_bound.append((fin.ts - started.ts) / bound)


# ----------------------------------------------------------------------------- the two setups
async def run_inprocess(args: argparse.Namespace, tmp: Path) -> SetupResults:
    from services.organizer.service import OrganizerService
    from shared.bus.inprocess import InProcessBus
    from shared.store import db

    url = f"sqlite:///{tmp / 'bench.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    bus = InProcessBus()
    service = OrganizerService(
        bus,
        db.session_factory(engine),
        BenchBackend(args.tokens_per_s),
        endpoints={},
        consumer_name="bench-inprocess",
        max_concurrent_episodes=args.concurrency,
        read_block_ms=1000,
    )
    res = SetupResults("in-process (InProcessBus, local workers, SQLite)")
    async with Harness(bus, db.session_factory(engine), service) as h:
        await measure(h, res, args)
    engine.dispose()
    return res


def bare_celery(app: Any, n: int, warmup: int) -> list[float]:
    out = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        assert app.send_task("asyncthink.echo", args=[i], queue="model").get(timeout=10) == i
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


async def run_distributed(args: argparse.Namespace, tmp: Path) -> tuple[SetupResults, list[float]]:
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    from services.organizer.service import OrganizerService
    from services.workers.app import make_app
    from services.workers.endpoint import CeleryWorkerEndpoint
    from shared.bus.redis_streams import RedisStreamsBus
    from shared.store import db

    print(f"flushing the Redis database {args.redis_url} (--redis-url) for the distributed part", file=sys.stderr)
    redis.Redis.from_url(args.redis_url).flushdb()
    admin = make_url(args.pg_url)
    conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
    name = f"asyncthink_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    env = dict(
        os.environ,
        ASYNCTHINK_REDIS_URL=args.redis_url,
        ASYNCTHINK_BACKEND_FACTORY="bench.orchestration:backend_factory",
        PYTHONPATH=str(REPO),
        **{RATE_ENV: str(args.tokens_per_s)},
    )
    celery = str(Path(sys.executable).with_name("celery"))
    log = (tmp / "celery.log").open("wb")
    proc = subprocess.Popen(
        [
            celery,
            "-A",
            "services.workers.app",
            "worker",
            "-Q",
            "model,tool",
            "--pool=threads",
            "-c",
            str(args.celery_concurrency),
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    app = make_app(args.redis_url)
    engine = None
    try:
        db.migrate(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                app.send_task("asyncthink.echo", args=[0], queue="model").get(timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"celery worker did not start; see {tmp / 'celery.log'}") from None
        bare = bare_celery(app, args.roundtrips, args.warmup)
        engine = db.make_engine(url)
        bus = RedisStreamsBus(args.redis_url)
        endpoint = CeleryWorkerEndpoint(bus, app)
        service = OrganizerService(
            bus,
            db.session_factory(engine),
            BenchBackend(args.tokens_per_s),
            endpoints=endpoint.endpoints(),
            consumer_name="bench-distributed",
            max_concurrent_episodes=args.concurrency,
            read_block_ms=1000,
        )
        res = SetupResults("Redis + Celery (worker process, PostgreSQL)")
        async with Harness(bus, db.session_factory(engine), service) as h:
            await measure(h, res, args)
        await endpoint.close()
        await bus.close()
        return res, bare
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if engine is not None:
            engine.dispose()
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ----------------------------------------------------------------------------- report
def report(results: list[SetupResults], bare: list[float] | None, args: argparse.Namespace) -> str:
    lines: list[str] = []
    b50, b99 = (pct(bare, 0.5), pct(bare, 0.99)) if bare else (float("nan"), float("nan"))
    head = f"{'measure':<44} {'p50':>9} {'p99':>9} {'p50/bare':>9} {'p99/bare':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    if bare:
        lines.append(
            f"{'bare Celery echo round trip (ms)':<44} {b50:>9.3f} {b99:>9.3f} {1.0:>9.2f} {1.0:>9.2f}"
        )
    for r in results:
        lines.append(f"[{r.name}]")
        for label, values in (
            ("fork dispatch (ms)", r.dispatch),
            ("join resume (ms)", r.resume),
            ("round trip, instant worker (ms)", r.roundtrip),
        ):
            p50, p99 = pct(values, 0.5), pct(values, 0.99)
            lines.append(f"  {label:<42} {p50:>9.3f} {p99:>9.3f} {p50 / b50:>9.2f} {p99 / b99:>9.2f}")
        lines.append(
            f"  {'episodes/s, ' + str(args.concurrency) + ' in flight':<42} {r.episodes_per_s:>9.1f}"
        )
        w50, wmax = pct(r.wall_over_bound, 0.5), max(r.wall_over_bound, default=float("nan"))
        lines.append(f"  {'wall / critical-path bound (p50, max)':<42} {w50:>9.3f} {wmax:>9.3f}")
    lines.append("")
    lines.append(
        "targets (printed, not asserted): round trip <= 1.5x bare Celery at p50 and p99; wall <= 1.05x bound"
    )
    lines.append(
        f"settings: {args.roundtrips} round trips (+{args.warmup} warm-up), {args.episodes} episodes at "
        f"{args.concurrency} in flight, {args.wall_episodes} wall episodes at {args.tokens_per_s:g} tokens/s, "
        f"celery --pool=threads -c {args.celery_concurrency}, {os.cpu_count()} CPUs"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.orchestration",
        description="Orchestration overhead of Redis + Celery versus in-process, against a bare Celery round trip.",
    )
    p.add_argument(
        "--roundtrips", type=int, default=300, help="one-fork episodes timed one at a time (default 300)"
    )
    p.add_argument("--warmup", type=int, default=20, help="untimed episodes first (default 20)")
    p.add_argument(
        "--episodes", type=int, default=256, help="episodes for the throughput figure (default 256)"
    )
    p.add_argument("--concurrency", type=int, default=64, help="episodes in flight (default 64)")
    p.add_argument("--wall-episodes", type=int, default=5, help="episodes for wall / bound (default 5)")
    p.add_argument("--tokens-per-s", type=float, default=2000.0, help="scripted decode rate (default 2000)")
    p.add_argument("--celery-concurrency", type=int, default=8, help="Celery worker threads (default 8)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="a Redis database it may flush")
    p.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="PostgreSQL used to create and drop a scratch database",
    )
    p.add_argument("--skip-distributed", action="store_true", help="only the in-process setup")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    import logging
    import tempfile

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = [await run_inprocess(args, tmp)]
        bare = None
        if not args.skip_distributed:
            dist, bare = await run_distributed(args, tmp)
            results.append(dist)
    print(report(results, bare, args))


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
