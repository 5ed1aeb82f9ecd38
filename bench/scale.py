"""The scale benchmark: many workers, many episodes at once, lost events, organizer CPU, scale-out, scheduling.

Usage::

    PYTHONPATH=. python -m bench.scale                       # every part (about 6 minutes on 2 cores)
    PYTHONPATH=. python -m bench.scale --parts inprocess,distributed --ns 16,256
    PYTHONPATH=. python -m bench.scale --quick               # small sizes, to check the script

The model is the scripted backend at a fixed ``--tokens-per-s`` (2,000 by default): one character per
token, so what is measured is the orchestration, not a model. The organizer of a "fan" episode forks N
workers (``<FORK-i>q</FORK-i>`` one after the other), then joins them all in order and answers; each
worker decodes ``--worker-tokens`` (512) tokens and returns. Parts (``--parts``, comma-separated):

* ``inprocess``: the bare :class:`~shared.engine.Engine` with in-process workers, one episode per N in
  ``--ns``: wall / critical-path bound (``T / tokens-per-s``) and the process's CPU per fork;
* ``distributed``: the real stack on loopback: an organizer process (``python -m services.organizer``),
  a Celery worker process (``--pool=threads -c --celery-concurrency``, ``--prefetch-multiplier
  --celery-prefetch``), Redis (its own database, ``--redis-url``; its keys are deleted first) and a
  scratch PostgreSQL database; one episode per N: wall / bound, organizer CPU per fork (the organizer
  process's user + system time from ``/proc``), the worker process's CPU per fork;
* ``concurrent``: the same stack, E episodes of 16 workers submitted at once for E in ``--at-once``:
  the makespan over the bound of one episode, the mean of each episode's wall / bound, organizer CPU
  per fork;
* ``limits``: the same, past the limits: ``--limits-episodes`` episodes submitted at once to an organizer
  that runs at most 16 at a time through a Redis connection pool of 8 (``ASYNCTHINK_REDIS_MAX_CONNECTIONS``),
  with the queue bound of the worker's result streams; every event is counted;
* ``scaleout``: 1, 2 and 4 organizer processes (``--organizers``) on one problems stream and one set of
  Celery queues: episodes/s and forks/s for ``--scaleout-episodes`` episodes of 8 workers, and every
  episode's ``started`` and ``finished`` counted (a duplicated episode would show twice);
* ``schedule``: a fixed worker pool (``--pool-slots`` runs in flight in one worker process) under load:
  ``--schedule-episodes`` episodes of mixed structures (forks joined at different points, drawn from a
  seed in the episode id, so both orders run the same structures) with the critical-path-first order
  against FIFO, interleaved (``--schedule-rounds``): mean and p99 of episode wall time and of T (the
  same for both by construction: T counts tokens, not seconds; it shows no worker was cut off).

Every distributed run counts the events on each episode's stream after it ends: the organizer's
``started``, ``fork``, ``join``, ``worker_result``, ``segment``, ``answer`` and ``finished`` and each
worker's ``return``; ``lost`` is how many of those expected events are missing. The machine's load
average (1 minute) is printed beside every figure: on shared cores every figure moves with it.

Limits: one host, so "distributed" means separate processes on loopback; timings are wall clock on a
shared machine. The organizer's CPU includes its own idle work (lease renewals, heartbeats).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.backends.base import GenerateRequest, GenerateResult
from shared.backends.scripted import ScriptedBackend, ScriptRouter

REPO = Path(__file__).resolve().parent.parent
RATE_ENV = "ASYNCTHINK_SCALE_TOKENS_PER_S"
WORKER_TOKENS_ENV = "ASYNCTHINK_SCALE_WORKER_TOKENS"
PAYLOAD = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 1}
ANSWER = "1+2+3+4"
RETURN = "<RETURN>2*3+4</RETURN>"


# ----------------------------------------------------------------------------- scripts
def fan_script(n: int, worker_tokens: int = 512) -> dict[str, str]:
    """Fork n workers one after the other, then join them all in order and answer."""
    organizer = "".join(f"<FORK-{i}>q</FORK-{i}>" for i in range(1, n + 1))
    organizer += "".join(f"<JOIN-{i}>" for i in range(1, n + 1)) + f"<ANSWER>{ANSWER}</ANSWER>"
    work = "w" * max(0, worker_tokens - len(RETURN)) + RETURN
    return {"organizer": organizer, **{str(i): work for i in range(1, n + 1)}}


def mixed_script(episode_id: str, worker_tokens: int = 512) -> dict[str, str]:
    """A structure drawn from the episode id's seed (``mixed-<seed>--<hex>``: the same seed, the same
    structure): 2-6 workers forked one after the other; one or two of them joined at once (the organizer
    is then blocked on them), the others only after 2,000-4,000 tokens of thinking; workers of 1/4 to 1/2
    of ``worker_tokens``."""
    rng = random.Random(episode_id.split("--", 1)[0])
    forks = rng.randint(2, 6)
    now = rng.sample(range(1, forks + 1), k=min(forks - 1, rng.randint(1, 2)))
    pieces: list[str] = ["plan " * rng.randint(2, 6)]
    pieces += [f"<FORK-{i}>q</FORK-{i}>" for i in range(1, forks + 1)]
    pieces += [f"<JOIN-{i}>" for i in sorted(now)]
    pieces.append("think " * (rng.randint(2000, 4000) // 6))
    pieces += [f"<JOIN-{i}>" for i in range(1, forks + 1) if i not in now]
    pieces.append(f"<ANSWER>{ANSWER}</ANSWER>")
    script = {"organizer": "".join(pieces)}
    for i in range(1, forks + 1):
        n = rng.randint(worker_tokens // 4, worker_tokens // 2)
        script[str(i)] = "w" * max(0, n - len(RETURN)) + RETURN
    return script


def script_for(episode_id: str, worker_tokens: int = 512) -> dict[str, str]:
    """The scripts of an episode, from its id: ``fan<N>--<hex>`` or ``mixed--<hex>``."""
    kind = episode_id.split("--", 1)[0]
    if kind.startswith("fan"):
        return fan_script(int(kind[3:]), worker_tokens)
    if kind.startswith("mixed"):
        return mixed_script(episode_id, worker_tokens)
    raise KeyError(f"no scale script for episode {episode_id!r}")


def forks_of(episode_id: str) -> int:
    return len(script_for(episode_id)) - 1


class ScaleBackend(ScriptRouter):
    """Every benchmark episode's scripts at a fixed token rate (a scripted backend per episode)."""

    model_id = "scripted-scale"

    def __init__(self, tokens_per_s: float, worker_tokens: int = 512) -> None:
        self.tokens_per_s = tokens_per_s
        self.worker_tokens = worker_tokens
        self._backends: OrderedDict[str, ScriptedBackend] = OrderedDict()

    def route(self, request: GenerateRequest) -> ScriptedBackend:
        eid = request.session or ""
        backend = self._backends.get(eid)
        if backend is None:
            backend = ScriptedBackend(
                script_for(eid, self.worker_tokens), tokens_per_s=self.tokens_per_s, model_id=self.model_id
            )
            self._backends[eid] = backend
            while len(self._backends) > 8192:
                self._backends.popitem(last=False)
        return backend

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self.route(request).generate(request)


def backend_factory(settings: object = None) -> ScaleBackend:
    """``ASYNCTHINK_BACKEND_FACTORY`` target for the benchmark's organizer and worker processes."""
    return ScaleBackend(float(os.environ.get(RATE_ENV, "2000")), int(os.environ.get(WORKER_TOKENS_ENV, "512")))


# ----------------------------------------------------------------------------- measurement helpers
def load() -> str:
    """The 1-minute load average, as printed beside every figure."""
    return f"{os.getloadavg()[0]:.1f}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (``/proc/<pid>/stat``)."""
    user, system = proc_cpu_split(pid)
    return user + system


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


EXPECTED_PER_FORK = ("fork", "join", "worker_result", "segment", "return")
EXPECTED_ONCE = ("started", "answer", "finished")


def lost_events(kinds: Counter[str], forks: int) -> int:
    """Expected events missing from an episode's stream (see the module doc)."""
    missing = sum(max(0, forks - kinds.get(k, 0)) for k in EXPECTED_PER_FORK)
    return missing + sum(max(0, 1 - kinds.get(k, 0)) for k in EXPECTED_ONCE)


@dataclass
class EpisodeRun:
    episode_id: str
    forks: int
    submitted: float
    started: float = 0.0
    finished: float = 0.0
    latency: int = 0  # T
    status: str = ""
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def wall(self) -> float:
        """From its ``started`` event (from its submission if that event was lost) to ``finished``."""
        return self.finished - (self.started or self.submitted)

    def bound(self, rate: float) -> float:
        return self.latency / rate


@dataclass
class Line:
    """One printed row: a label, named figures and the load average when it was measured."""

    label: str
    figures: dict[str, str]
    load: str

    def render(self) -> str:
        body = "  ".join(f"{k} {v}" for k, v in self.figures.items())
        return f"{self.label:<58} {body}   [load {self.load}]"


# ----------------------------------------------------------------------------- in-process
async def run_inprocess(args: argparse.Namespace) -> list[Line]:
    from shared.engine import Engine, EngineConfig
    from shared.tasks import get_task

    lines: list[Line] = []
    task = get_task("countdown")
    for n in args.ns:
        backend = ScaleBackend(args.tokens_per_s, args.worker_tokens)
        eid = f"fan{n}--{uuid.uuid4().hex[:12]}"
        fields = {
            "capacity": n + 1, "organizer_budget": 131_072, "worker_budget": args.worker_tokens + 64,
            "worker_timeout_s": 3600.0, "temperature": 0.0,
        }  # fmt: skip
        try:
            config = EngineConfig(**fields)
        except ValueError:  # a capacity past the settings' bound (before issue 19): build it unchecked
            config = EngineConfig.model_construct(**fields)
        engine = Engine(backend, task, config)
        problem = task.problem_from_payload(PAYLOAD, "scale")
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = await engine.run(problem, episode_id=eid)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert result.forks == n and result.answer == ANSWER, (result.status, result.forks, result.format_errors)
        lines.append(
            Line(
                f"in-process engine, N={n}",
                {
                    "wall/bound": f"{wall / (result.latency / args.tokens_per_s):.3f}",
                    "CPU/fork": f"{cpu / n * 1e3:.2f} ms",
                    "T": str(result.latency),
                    "wall": f"{wall:.2f} s",
                },
                load(),
            )
        )
        print(lines[-1].render(), flush=True)
    return lines


# ----------------------------------------------------------------------------- the distributed stack
class Stack:
    """Redis (a database of the benchmark's own), a scratch PostgreSQL database, Celery worker and
    organizer processes; episodes submitted on the problems stream as the gateway does."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.db_name = f"asyncthink_scale_{uuid.uuid4().hex[:8]}"
        self.workers: list[Any] = []
        self.organizers: list[Any] = []
        self.redis: Any = None
        self.app: Any = None
        self.db_url = ""
        self._conninfo = ""

    # -- lifecycle
    def __enter__(self) -> Stack:
        import psycopg
        import redis
        from sqlalchemy.engine import make_url

        from shared.store import db

        print(f"flushing the Redis database {self.args.redis_url} (--redis-url)", file=sys.stderr)
        r = redis.Redis.from_url(self.args.redis_url)
        r.flushdb()
        r.close()
        admin = make_url(self.args.pg_url)
        self._conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_url = admin.set(database=self.db_name).render_as_string(hide_password=False)
        db.migrate(self.db_url)
        return self

    def __exit__(self, *exc: object) -> None:
        import psycopg

        for p in [*self.organizers, *self.workers]:
            p.stop()
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def env(self, **extra: str) -> dict[str, str]:
        from bench.stack import service_env

        return service_env(
            ASYNCTHINK_BUS="redis",
            ASYNCTHINK_REDIS_URL=self.args.redis_url,
            DATABASE_URL=self.db_url,
            ASYNCTHINK_DATABASE_URL=self.db_url,
            ASYNCTHINK_BACKEND_FACTORY="bench.scale:backend_factory",
            ASYNCTHINK_WORKER_TIMEOUT_S="600",
            **{RATE_ENV: str(self.args.tokens_per_s), WORKER_TOKENS_ENV: str(self.args.worker_tokens)},
            **extra,
        )

    def start_worker(self, concurrency: int, prefetch: int, name: str = "scale-worker", **env: str) -> Any:
        from bench.stack import ServiceProcess, wait_worker_ready
        from services.workers.app import make_app

        celery = str(Path(sys.executable).with_name("celery"))
        argv = [
            celery, "-A", "services.workers.app", "worker", "-Q", "model,tool", "--pool=threads",
            "-c", str(concurrency), "--prefetch-multiplier", str(prefetch), "--loglevel=WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{name}@%h",
        ]  # fmt: skip
        proc = ServiceProcess(name, argv, self.env(**env), self.tmp / f"{name}.log").start()
        self.workers.append(proc)
        if self.app is None:
            self.app = make_app(self.args.redis_url)
        wait_worker_ready(self.app, proc)
        return proc

    def start_organizer(self, name: str, *extra: str, **env: str) -> Any:
        from bench.stack import organizer, wait_organizer_ready

        proc = organizer(self.env(**env), self.tmp / f"{name}.log", *extra, name=name).start()
        self.organizers.append(proc)
        wait_organizer_ready(proc)
        return proc

    def stop_organizers(self) -> None:
        for p in self.organizers:
            p.stop()
        self.organizers = []

    def stop_workers(self) -> None:
        for p in self.workers:
            p.stop()
        self.workers = []

    # -- episodes
    async def run_episodes(
        self, episode_ids: list[str], *, timeout_s: float = 600.0, max_in_flight: int = 0, gap_s: float = 0.0
    ) -> list[EpisodeRun]:
        """Submit the episodes (at most ``max_in_flight`` unfinished at once, 0: no limit; one every
        ``gap_s`` seconds, 0: all at once) and follow their event streams until each has finished; then
        count every event on each stream."""
        import redis.asyncio as aioredis

        from shared.episode import EpisodeSettings
        from shared.messages import PROBLEMS_STREAM, EpisodeEvent, SubmitProblem, events_stream

        client = aioredis.Redis.from_url(self.args.redis_url, decode_responses=True)
        runs = {eid: EpisodeRun(eid, forks_of(eid), 0.0) for eid in episode_ids}
        queue = list(episode_ids)
        after: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        next_at = time.monotonic()
        try:
            while queue or after:
                while (
                    queue and (max_in_flight <= 0 or len(after) < max_in_flight) and time.monotonic() >= next_at
                ):
                    next_at += gap_s
                    eid = queue.pop(0)
                    n = runs[eid].forks
                    settings = {
                        "capacity": n + 1, "organizer_budget": 131_072, "worker_budget": self.args.worker_tokens + 64,
                        "worker_timeout_s": 600.0,
                    }  # fmt: skip
                    try:
                        es = EpisodeSettings(**settings)
                    except ValueError:
                        es = EpisodeSettings.model_construct(**settings)
                    sub = SubmitProblem(
                        episode_id=eid, task="countdown", problem_id="scale", payload=PAYLOAD, settings=es
                    )
                    runs[eid].submitted = time.time()
                    await client.xadd(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
                    after[eid] = "0"
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(after)} episodes unfinished after {timeout_s:.0f} s")
                if not after:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    continue
                block = 200 if not queue else max(1, min(200, int((next_at - time.monotonic()) * 1000)))
                reply = await client.xread({events_stream(e): a for e, a in after.items()}, count=1000, block=block)
                for stream, entries in reply or []:
                    eid = stream.split(":")[2]
                    for entry_id, fields in entries:
                        after[eid] = entry_id
                        ev = EpisodeEvent.model_validate_json(fields["data"])
                        if ev.kind == "started":
                            runs[eid].started = ev.ts
                        elif ev.kind == "finished":
                            runs[eid].finished = ev.ts
                            runs[eid].latency = int(ev.data.get("latency") or 0)
                            runs[eid].status = str(ev.data.get("status"))
                    if runs[eid].finished:
                        after.pop(eid, None)
            await asyncio.sleep(1.0)  # a worker's own events may land just after its organizer's finished
            for run in runs.values():
                entries = await client.xrange(events_stream(run.episode_id))
                run.kinds = Counter(EpisodeEvent.model_validate_json(f["data"]).kind.value for _, f in entries)
        finally:
            await client.aclose()
        return list(runs.values())


def fan_ids(n: int, count: int) -> list[str]:
    return [f"fan{n}--{uuid.uuid4().hex[:16]}" for _ in range(count)]


async def run_distributed(args: argparse.Namespace, tmp: Path) -> list[Line]:
    lines: list[Line] = []
    with Stack(args, tmp) as stack:
        worker = stack.start_worker(args.celery_concurrency, args.celery_prefetch)
        org = stack.start_organizer("scale-organizer", "--max-episodes", "64")
        await stack.run_episodes(fan_ids(4, 2))  # warm up (imports, connections)
        if "distributed" in args.parts:
            for n in args.ns:
                (u0, s0), wcpu0 = proc_cpu_split(org.pid), proc_cpu_s(worker.pid)
                [run] = await stack.run_episodes(fan_ids(n, 1))
                (u1, s1), wcpu = proc_cpu_split(org.pid), proc_cpu_s(worker.pid) - wcpu0
                cpu = (u1 - u0) + (s1 - s0)
                lines.append(
                    Line(
                        f"Redis + Celery, N={n}",
                        {
                            "wall/bound": f"{run.wall / run.bound(args.tokens_per_s):.3f}",
                            "organizer CPU/fork": f"{cpu / n * 1e3:.2f} ms",
                            "(sys": f"{(s1 - s0) / n * 1e3:.2f} ms)",
                            "worker CPU/fork": f"{wcpu / n * 1e3:.2f} ms",
                            "lost": str(lost_events(run.kinds, n)),
                            "status": run.status,
                        },
                        load(),
                    )
                )
                print(lines[-1].render(), flush=True)
        if "concurrent" in args.parts:
            for e in args.at_once:
                cpu0, wcpu0, t0 = proc_cpu_s(org.pid), proc_cpu_s(worker.pid), time.time()
                runs = await stack.run_episodes(fan_ids(16, e))
                cpu, wcpu = proc_cpu_s(org.pid) - cpu0, proc_cpu_s(worker.pid) - wcpu0
                makespan = max(r.finished for r in runs) - t0
                bound = max(r.bound(args.tokens_per_s) for r in runs)
                per = [r.wall / r.bound(args.tokens_per_s) for r in runs]
                lost = sum(lost_events(r.kinds, r.forks) for r in runs)
                expected = sum(r.forks * len(EXPECTED_PER_FORK) + len(EXPECTED_ONCE) for r in runs)
                lines.append(
                    Line(
                        f"Redis + Celery, {e} episodes x 16 workers at once",
                        {
                            "makespan/bound": f"{makespan / bound:.3f}",
                            "episode wall/bound mean": f"{statistics.mean(per):.3f}",
                            "max": f"{max(per):.3f}",
                            "organizer CPU/fork": f"{cpu / (16 * e) * 1e3:.2f} ms",
                            "worker CPU/fork": f"{wcpu / (16 * e) * 1e3:.2f} ms",
                            "lost": f"{lost} of {expected}",
                            "not completed": str(sum(r.status != "completed" for r in runs)),
                        },
                        load(),
                    )
                )
                print(lines[-1].render(), flush=True)
    return lines


async def run_limits(args: argparse.Namespace, tmp: Path) -> list[Line]:
    """Past every limit: a tiny Redis pool, fewer episodes at a time than submitted, scarce workers."""
    with Stack(args, tmp) as stack:
        stack.start_worker(4, 4)  # 16 runs in flight
        org = stack.start_organizer(
            "limits-organizer", "--max-episodes", "16", "--redis-max-connections", "4"
        )
        await stack.run_episodes(fan_ids(4, 2))
        cpu0, t0 = proc_cpu_s(org.pid), time.time()
        runs = await stack.run_episodes(fan_ids(16, args.limits_episodes))
        cpu = proc_cpu_s(org.pid) - cpu0
        lost = sum(lost_events(r.kinds, r.forks) for r in runs)
        expected = sum(r.forks * len(EXPECTED_PER_FORK) + len(EXPECTED_ONCE) for r in runs)
        line = Line(
            f"past the limits: {args.limits_episodes} x 16 at once, pool 4, 16 episodes and 16 runs at a time",
            {
                "lost": f"{lost} of {expected}",
                "duplicated": str(sum(r.kinds["started"] != 1 or r.kinds["finished"] != 1 for r in runs)),
                "not completed": str(sum(r.status != "completed" for r in runs)),
                "makespan": f"{max(r.finished for r in runs) - t0:.1f} s",
                "organizer CPU/fork": f"{cpu / (16 * len(runs)) * 1e3:.2f} ms",
            },
            load(),
        )
        print(line.render(), flush=True)
        return [line]


async def run_scaleout(args: argparse.Namespace, tmp: Path) -> list[Line]:
    """1, 2 and 4 organizer processes (and two Celery worker processes) on one stream and one set of
    queues: throughput, and every episode run exactly once."""
    lines: list[Line] = []
    with Stack(args, tmp) as stack:
        for i in range(2):
            stack.start_worker(args.celery_concurrency, args.celery_prefetch, name=f"scaleout-worker-{i}")
        for k in args.organizers:
            orgs = [stack.start_organizer(f"scaleout-{k}-{i}", "--max-episodes", "64") for i in range(k)]
            await stack.run_episodes(fan_ids(4, 2 * k))
            cpu0, t0 = sum(proc_cpu_s(o.pid) for o in orgs), time.time()
            runs = await stack.run_episodes(fan_ids(8, args.scaleout_episodes))
            cpu = sum(proc_cpu_s(o.pid) for o in orgs) - cpu0
            span = max(r.finished for r in runs) - t0
            dup = sum(r.kinds["started"] != 1 or r.kinds["finished"] != 1 for r in runs)
            lost = sum(lost_events(r.kinds, r.forks) for r in runs)
            lines.append(
                Line(
                    f"scale-out: {k} organizer process(es), 2 worker processes",
                    {
                        "episodes/s": f"{len(runs) / span:.1f}",
                        "forks/s": f"{8 * len(runs) / span:.0f}",
                        "duplicated": str(dup),
                        "lost": str(lost),
                        "organizer CPU/fork": f"{cpu / (8 * len(runs)) * 1e3:.2f} ms",
                        "episodes": str(len(runs)),
                    },
                    load(),
                )
            )
            print(lines[-1].render(), flush=True)
            stack.stop_organizers()
    return lines


async def run_schedule(args: argparse.Namespace, tmp: Path) -> list[Line]:
    """Critical-path-first against FIFO at a fixed worker pool under load, interleaved rounds."""
    walls: dict[str, list[float]] = {"fifo": [], "critical-path": []}
    latencies: dict[str, list[int]] = {"fifo": [], "critical-path": []}
    loads: dict[str, list[float]] = {"fifo": [], "critical-path": []}
    with Stack(args, tmp) as stack:
        stack.start_worker(args.pool_slots, 1, name="schedule-worker")  # a fixed pool: -c slots
        for rnd in range(args.schedule_rounds):
            order = ("fifo", "critical-path") if rnd % 2 == 0 else ("critical-path", "fifo")
            seeds = [f"mixed-{rnd}.{i}" for i in range(args.schedule_episodes)]
            for policy in order:
                stack.start_organizer(f"schedule-{policy}-{rnd}", "--max-episodes", "64", "--scheduling", policy)
                ids = [f"{seed}--{uuid.uuid4().hex[:16]}" for seed in seeds]
                runs = await stack.run_episodes(ids, gap_s=args.schedule_gap_s)
                walls[policy] += [r.wall for r in runs]
                latencies[policy] += [r.latency for r in runs]
                loads[policy].append(os.getloadavg()[0])
                stack.stop_organizers()
    lines = []
    for policy in ("fifo", "critical-path"):
        w, t = walls[policy], latencies[policy]
        lines.append(
            Line(
                f"scheduling {policy}: {args.pool_slots} worker slots, {args.schedule_episodes} mixed episodes "
                f"every {args.schedule_gap_s:g} s, x {args.schedule_rounds}",
                {
                    "wall mean": f"{statistics.mean(w):.2f} s",
                    "wall p99": f"{pct(w, 0.99):.2f} s",
                    "T mean": f"{statistics.mean(t):.0f}",
                    "T p99": f"{pct(t, 0.99):.0f}",
                },
                " ".join(f"{x:.1f}" for x in loads[policy]),
            )
        )
        print(lines[-1].render(), flush=True)
    return lines


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="inprocess,distributed,concurrent,limits,scaleout,schedule",
                   help="comma-separated: inprocess, distributed, concurrent, limits, scaleout, schedule")
    p.add_argument("--ns", default="16,256,1024", help="workers per episode for inprocess and distributed")
    p.add_argument("--at-once", default="16,32,64", help="episodes of 16 workers submitted at once (concurrent)")
    p.add_argument("--tokens-per-s", type=float, default=2000.0, help="scripted decode rate (default 2000)")
    p.add_argument("--worker-tokens", type=int, default=512, help="tokens each worker decodes (default 512)")
    p.add_argument("--celery-concurrency", type=int, default=64, help="Celery worker threads (default 64)")
    p.add_argument("--celery-prefetch", type=int, default=16,
                   help="Celery --prefetch-multiplier: runs in flight per thread (default 16: -c 64 holds 1,024)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/6", help="a Redis database it may empty")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                   help="PostgreSQL used to create and drop a scratch database")
    p.add_argument("--limits-episodes", type=int, default=128, help="episodes of 16 workers for limits (128)")
    p.add_argument("--organizers", default="1,2,4", help="organizer processes for scaleout (default 1,2,4)")
    p.add_argument("--scaleout-episodes", type=int, default=256, help="episodes of 8 workers for scaleout (256)")
    p.add_argument("--pool-slots", type=int, default=4, help="worker runs in flight for schedule (default 4)")
    p.add_argument("--schedule-episodes", type=int, default=40, help="mixed episodes per schedule run (40)")
    p.add_argument("--schedule-rounds", type=int, default=3, help="interleaved rounds per policy (default 3)")
    p.add_argument("--schedule-gap-s", type=float, default=0.08, help="seconds between schedule submissions (0.08)")
    p.add_argument("--quick", action="store_true", help="small sizes (16 and 64 workers, 4 and 8 episodes)")
    args = p.parse_args(argv)
    args.parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    args.ns = [int(x) for x in args.ns.split(",")]
    args.at_once = [int(x) for x in args.at_once.split(",")]
    args.organizers = [int(x) for x in args.organizers.split(",")]
    if args.quick:
        args.ns, args.at_once = [16, 64], [4, 8]
        args.limits_episodes, args.scaleout_episodes, args.schedule_episodes, args.schedule_rounds = 32, 32, 8, 1
    return args


async def amain(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(
        f"bench.scale: scripted backend at {args.tokens_per_s:g} tokens/s, workers of {args.worker_tokens} tokens; "
        f"{os.cpu_count()} CPUs; load average at start {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    lines: list[Line] = []
    if "inprocess" in args.parts:
        lines += await run_inprocess(args)
    with tempfile.TemporaryDirectory() as d:
        if args.parts & {"distributed", "concurrent"}:
            lines += await run_distributed(args, Path(d))
        if "limits" in args.parts:
            lines += await run_limits(args, Path(d))
        if "scaleout" in args.parts:
            lines += await run_scaleout(args, Path(d))
        if "schedule" in args.parts:
            lines += await run_schedule(args, Path(d))
    print()
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
