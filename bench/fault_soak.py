"""The fault soak: episodes through the distributed stack while a driver kills and cuts it.

Usage::

    PYTHONPATH=. python -m bench.fault_soak [--episodes 1000] [--organizers 2] [--tokens-per-s 100] \\
        [--concurrency 48] [--seed 1] [--no-resume] [--redis-url redis://127.0.0.1:6379/13] \\
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]

What runs (loopback only): ``--organizers`` organizer processes (``python -m services.organizer``) and one
Celery worker process (``--pool=threads``), both talking to Redis through a :class:`~bench.tcp_proxy.TcpProxy`
and to a scratch PostgreSQL database; the model is the scripted backend (:class:`SoakBackend`), which
replays a script per episode (derived from the episode id: 1-3 forks joined in a random order, about
``--organizer-tokens`` and ``--worker-tokens`` tokens, one character per token) at a fixed
``--tokens-per-s`` in every process, and counts every token it decodes in Redis (directly, not through
the proxy). The driver submits ``--episodes`` episodes as the gateway does (a pending row, then an entry
on the problems stream), at most ``--concurrency`` unfinished at once, and meanwhile, every
``--fault-gap`` seconds, injects one fault (the first three are one of each, then at random): ``kill -9``
of the Celery worker, ``kill -9`` of an organizer (each restarted after ``--restart-after`` seconds), or
a Redis cut of 5-10 s (``reset``: connections broken, or ``blackhole``: nothing answers). Faults stop once
every episode is submitted and at least ``--min-faults`` happened (at most ``--max-faults``).

What it prints: submitted / completed / lost / duplicated / stuck / late, where

* completed: stored ``completed`` with the scripted answer, one segment per agent, the organizer's text
  exactly its script with each worker's takeaway joined in, every worker's text exactly its script;
* lost: finished otherwise (failed, format error, a worker's result missing or replaced by an error);
* duplicated: finished more than once (two ``finished`` events) or stored with segments no run made;
* stuck: not finished when the driver gives up (``--episode-timeout`` after the last fault);
* late: finished more than ``--episode-timeout`` seconds after both its submission and the last fault;

then the work lost per crash: tokens decoded that the stored episodes do not hold (decoded twice), for
organizers per organizer kill and for workers per worker kill, and for comparison what running the
interrupted episodes again from the start would have cost the organizers (their resumed prefixes plus
what was decoded twice anyway). ``--no-resume`` runs the organizers with ``--no-resume`` to measure that
directly. The target line: 0 lost, 0 duplicated, 0 stuck, 0 late.

Limits: one host and two cores, so the tokens/s and the episode sizes are small on purpose (the
scripted model costs no compute; the stack's overhead is what is exercised); decoding is counted every
0.1 s, so a kill leaves at most one slice per running agent uncounted. The
Redis database (default 13) is the soak's own: its keys are deleted at the start. The PostgreSQL
database is created and dropped (``--keep-db`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.stack import celery_worker, organizer, service_env, wait_organizer_ready, wait_worker_ready
from bench.tcp_proxy import TcpProxy
from shared.backends.base import GenerateRequest, GenerateResult
from shared.backends.scripted import ScriptedBackend, ScriptRouter
from shared.protocol import join_result

log = logging.getLogger("fault_soak")

RATE_ENV = "ASYNCTHINK_SOAK_TOKENS_PER_S"
SIZE_ENV = "ASYNCTHINK_SOAK_SIZE"  # "<organizer tokens>,<worker tokens>"
METER_ENV = "ASYNCTHINK_SOAK_METER_URL"  # Redis for the token counts (not behind the proxy)
METER_KEY = "asyncthink-soak:decoded:"  # + episode id: hash agent -> tokens decoded
METER_SLICE_S = 0.1  # the decoding is counted this often (a kill loses at most one slice from the count)
PAYLOAD = {"numbers": [1, 2, 3, 4], "target": 10, "n_solutions": 1}
ANSWER = "1+2+3+4"
CAPACITY = 4  # the organizer and up to 3 workers at once
WORDS = ("add", "try", "check", "the", "sum", "of", "three", "and", "four", "then", "ten", "again", "next")


# ----------------------------------------------------------------------------- scripts
def _filler(rng: random.Random, n: int) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(rng.choice(WORDS))
    return " ".join(out) + " "


def script_for(episode_id: str, organizer_tokens: int = 120, worker_tokens: int = 60) -> dict[str, str]:
    """The scripted text of every agent of a soak episode, a function of its id (so every process agrees):
    1-3 forks, each joined at a random later point (some before the next fork), thinking text between."""
    rng = random.Random(episode_id)
    forks = rng.randint(1, 3)
    think = max(4, organizer_tokens // (2 * forks + 2))
    pieces = ["Plan: " + _filler(rng, think)]
    active: list[int] = []
    for i in range(1, forks + 1):
        pieces.append(f"<FORK-{i}>part {i} of the sum</FORK-{i}>" + _filler(rng, think))
        active.append(i)
        if i < forks and rng.random() < 0.4:  # join one of the running workers before the next fork
            j = active.pop(rng.randrange(len(active)))
            pieces.append(f"<JOIN-{j}>" + _filler(rng, think))
    rng.shuffle(active)
    for j in active:
        pieces.append(f"<JOIN-{j}>" + _filler(rng, think))
    pieces.append(f"<ANSWER>{ANSWER}</ANSWER>")
    script = {"organizer": "".join(pieces)}
    for i in range(1, forks + 1):
        work = _filler(rng, rng.randint(worker_tokens // 2, worker_tokens))
        script[str(i)] = "Work: " + work + f"<RETURN>{takeaway(i)}</RETURN>"
    return script


def takeaway(i: int) -> str:
    return f"part {i} ok"


def expected_organizer_text(script: dict[str, str]) -> str:
    """The organizer's stored text: its script with each join's injected result after ``<JOIN-i>``."""
    text = script["organizer"]
    for i in range(1, len(script)):
        text = text.replace(f"<JOIN-{i}>", f"<JOIN-{i}>" + join_result(i, takeaway(i)), 1)
    return text


def sizes() -> tuple[int, int]:
    org, _, worker = os.environ.get(SIZE_ENV, "120,60").partition(",")
    return int(org), int(worker or 60)


class SoakBackend(ScriptRouter):
    """Every soak episode's scripts, resumable (the position comes from the input), at a fixed rate;
    counts the tokens each agent decodes in Redis when ``meter_url`` is given."""

    model_id = "scripted-soak"

    def __init__(self, tokens_per_s: float, meter_url: str | None = None, size: tuple[int, int] = (120, 60)) -> None:
        self.tokens_per_s = tokens_per_s
        self.size = size
        self.meter_url = meter_url
        self._backends: collections.OrderedDict[str, ScriptedBackend] = collections.OrderedDict()
        self._meter: Any = None
        self._meter_loop: Any = None

    def route(self, request: GenerateRequest) -> ScriptedBackend:
        eid = request.session or ""
        backend = self._backends.get(eid)
        if backend is None:
            backend = ScriptedBackend(script_for(eid, *self.size), resumable=True, model_id=self.model_id)
            self._backends[eid] = backend
            while len(self._backends) > 4096:
                self._backends.popitem(last=False)
        return backend

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """The scripted piece, decoded at the fixed rate in slices of ``METER_SLICE_S``, each slice counted
        as it is decoded (so a process killed mid-call has counted what it decoded before the kill)."""
        result = await super().generate(request)
        n, done = len(result.output_ids), 0
        step = max(1, int(self.tokens_per_s * METER_SLICE_S))
        while done < n:
            k = min(step, n - done)
            await asyncio.sleep(k / self.tokens_per_s)
            done += k
            if self.meter_url:
                await self._count(request.session or "", request.tag, k)
        return result

    async def _count(self, episode_id: str, agent: str, n: int) -> None:
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._meter is None or self._meter_loop is not loop:
            self._meter = aioredis.Redis.from_url(self.meter_url or "", socket_timeout=2, socket_connect_timeout=2)
            self._meter_loop = loop
        with contextlib.suppress(Exception):  # instrumentation must never fail an episode
            await self._meter.hincrby(METER_KEY + episode_id, agent, n)


def backend_factory(settings: object = None) -> SoakBackend:
    """``ASYNCTHINK_BACKEND_FACTORY`` target for the soak's organizer and worker processes."""
    return SoakBackend(float(os.environ.get(RATE_ENV, "100")), os.environ.get(METER_ENV) or None, sizes())


# ----------------------------------------------------------------------------- the driver
@dataclass
class Fault:
    kind: str  # "worker kill -9" | "organizer kill -9" | "redis cut"
    start: float
    end: float = 0.0
    detail: str = ""


@dataclass
class Report:
    submitted: int = 0
    completed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    resumed: int = 0  # runs that continued from a checkpoint
    rerun: int = 0  # runs that started again from the prompt after an interruption
    resumed_tokens: int = 0  # organizer tokens those resumed runs did not decode again
    organizer_decoded: int = 0
    organizer_kept: int = 0
    worker_decoded: int = 0
    worker_kept: int = 0
    slowest_after_last_fault_s: float = 0.0
    durations_s: list[float] = field(default_factory=list)  # submission to stored result, per finished episode
    wall_s: float = 0.0
    last_fault_s: float = 0.0  # when the last fault ended, seconds after the start
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.completed == self.submitted
            and not self.lost and not self.duplicated and not self.stuck and not self.late
        )

    def kills(self, kind: str) -> int:
        return sum(1 for f in self.faults if f.kind == kind)


@dataclass
class SoakConfig:
    episodes: int = 1000
    organizers: int = 2
    concurrency: int = 48
    tokens_per_s: float = 100.0
    organizer_tokens: int = 120
    worker_tokens: int = 60
    celery_threads: int = 32
    seed: int = 1
    resume: bool = True
    fault_gap: tuple[float, float] = (4.0, 10.0)
    cut_s: tuple[float, float] = (5.0, 10.0)
    restart_after: tuple[float, float] = (0.5, 3.0)
    min_faults: int = 6
    max_faults: int = 1000
    lease_ms: int = 3000
    task_lease_s: float = 3.0
    worker_timeout_s: float = 45.0
    episode_timeout_s: float = 90.0
    redis_url: str = "redis://127.0.0.1:6379/13"
    pg_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    keep_db: bool = False
    workdir: Path | None = None


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.report = Report()
        self.submitted_at: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.done_submitting = asyncio.Event()
        self.stop_faults = asyncio.Event()

    # -------------------------------------------------------------- setup and teardown
    def _create_db(self) -> str:
        import psycopg
        from sqlalchemy.engine import make_url

        from shared.store import db

        admin = make_url(self.cfg.pg_url)
        self._conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
        if admin.password:
            self._conninfo += f" password={admin.password}"
        self._dbname = f"asyncthink_soak_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self._dbname}"')
        url = admin.set(database=self._dbname).render_as_string(hide_password=False)
        db.migrate(url)
        return url

    def _drop_db(self) -> None:
        import psycopg

        if self.cfg.keep_db:
            print(f"kept database {self._dbname}")
            return
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self._dbname}" WITH (FORCE)')

    async def run(self) -> Report:
        import redis

        from services.workers.app import make_app
        from shared.bus.redis_streams import RedisStreamsBus
        from shared.config import Settings
        from shared.store import db

        cfg = self.cfg
        direct = redis.Redis.from_url(cfg.redis_url, socket_timeout=10)
        keys = list(direct.scan_iter(count=1000))  # the soak's own database
        for i in range(0, len(keys), 1000):
            direct.delete(*keys[i : i + 1000])
        pg_url = self._create_db()
        parts = urlsplit(cfg.redis_url)
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
        workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="fault-soak-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        env = service_env(
            ASYNCTHINK_REDIS_URL=proxy.url(path=parts.path or "/0"),
            DATABASE_URL=pg_url,
            ASYNCTHINK_BUS="redis",
            ASYNCTHINK_BACKEND_FACTORY="bench.fault_soak:backend_factory",
            ASYNCTHINK_WORKER_TIMEOUT_S=str(cfg.worker_timeout_s),
            ASYNCTHINK_TASK_LEASE_S=str(cfg.task_lease_s),
            **{RATE_ENV: str(cfg.tokens_per_s), SIZE_ENV: f"{cfg.organizer_tokens},{cfg.worker_tokens}",
               METER_ENV: cfg.redis_url},
        )
        self.worker = celery_worker(env, workdir / "worker.log", concurrency=cfg.celery_threads, name="soak-worker")
        org_args = [
            "--claim-idle-ms", str(cfg.lease_ms), "--worker-timeout-s", str(cfg.worker_timeout_s),
            "--max-episodes", str(cfg.concurrency), "--log-level", "INFO",
        ] + ([] if cfg.resume else ["--no-resume"])
        self.organizers = [
            organizer(env, workdir / f"organizer-{i}.log", *org_args, name=f"soak-organizer-{i}")
            for i in range(cfg.organizers)
        ]
        settings = Settings(redis_url=cfg.redis_url, worker_timeout_s=cfg.worker_timeout_s, task_lease_s=cfg.task_lease_s)
        app = make_app(cfg.redis_url, settings)
        engine = db.make_engine(pg_url)
        self.sessions = db.session_factory(engine)
        bus = RedisStreamsBus(cfg.redis_url)
        try:
            wait_worker_ready(app, self.worker.start())
            for o in self.organizers:
                o.start()
            for o in self.organizers:
                wait_organizer_ready(o)
            self.t0 = time.monotonic()
            faults = asyncio.create_task(self._faults(proxy))
            await self._submit_all(bus)
            self.done_submitting.set()
            await faults
            self.report.last_fault_s = max((f.end for f in self.report.faults), default=self.t0) - self.t0
            await self._wait_finished()
            self.report.wall_s = time.monotonic() - self.t0
        finally:
            for o in self.organizers:
                o.stop()
            self.worker.stop()
            proxy.close()
        try:
            self._collect(direct)
        finally:
            await bus.close()
            engine.dispose()
            direct.close()
            self._drop_db()
        return self.report

    # -------------------------------------------------------------- submissions
    def _unfinished(self) -> int:
        from sqlalchemy import func, select

        from shared.store.models import Episode

        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Episode).where(Episode.status.in_(("pending", "running")))) or 0)

    async def _submit_all(self, bus: Any) -> None:
        from shared.episode import EpisodeSettings
        from shared.messages import PROBLEMS_STREAM, SubmitProblem
        from shared.store import repository
        from shared.tasks import get_task

        task = get_task("countdown")
        settings = EpisodeSettings(
            capacity=CAPACITY, worker_budget=2 * self.cfg.worker_tokens + 64,
            organizer_budget=4 * self.cfg.organizer_tokens + 256,
            worker_timeout_s=self.cfg.worker_timeout_s, temperature=0.0,
        )
        for n in range(self.cfg.episodes):
            while await asyncio.to_thread(self._unfinished) >= self.cfg.concurrency:
                await asyncio.sleep(0.2)
            eid = f"soak--{n:05d}--{uuid.uuid4().hex[:10]}"
            sub = SubmitProblem(episode_id=eid, task="countdown", problem_id=f"soak-{n}", payload=PAYLOAD, settings=settings)
            problem = task.problem_from_payload(sub.payload, sub.problem_id)

            def create(sub: SubmitProblem = sub, problem: Any = problem) -> None:
                with self.sessions() as s:
                    repository.create_episode(
                        s, episode_id=sub.episode_id, problem=problem, mode=settings.mode, capacity=CAPACITY,
                        model_id="scripted-soak", config=sub.stored_config(),
                    )

            await asyncio.to_thread(create)
            await bus.publish(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
            self.submitted_at[eid] = time.time()
            self.report.submitted += 1
            if (n + 1) % 100 == 0:
                log.info("submitted %d episodes (%.0f s)", n + 1, time.monotonic() - self.t0)

    async def _wait_finished(self) -> None:
        last_fault = max((f.end for f in self.report.faults), default=self.t0)
        deadline = max(last_fault, time.monotonic()) + self.cfg.episode_timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._unfinished) == 0:
                return
            await asyncio.sleep(0.5)

    # -------------------------------------------------------------- faults
    async def _faults(self, proxy: TcpProxy) -> None:
        kinds = ["worker kill -9", "organizer kill -9", "redis cut"]
        self.rng.shuffle(kinds)
        n = 0
        while n < self.cfg.max_faults and not (self.done_submitting.is_set() and n >= self.cfg.min_faults):
            await asyncio.sleep(self.rng.uniform(*self.cfg.fault_gap))
            kind = kinds[n] if n < len(kinds) else self.rng.choice(kinds)
            fault = Fault(kind, time.monotonic())
            if kind == "redis cut":
                mode = self.rng.choice(["reset", "blackhole"])
                seconds = self.rng.uniform(*self.cfg.cut_s)
                fault.detail = f"{mode} {seconds:.1f}s"
                proxy.cut(mode)
                await asyncio.sleep(seconds)
                proxy.restore()
            else:
                proc = self.worker if kind.startswith("worker") else self.rng.choice(self.organizers)
                proc.kill9()
                wait = self.rng.uniform(*self.cfg.restart_after)
                fault.detail = f"{proc.name}, restarted after {wait:.1f}s"
                await asyncio.sleep(wait)
                proc.start()
            fault.end = time.monotonic()
            self.report.faults.append(fault)
            log.info("fault %d at %.1f s: %s (%s)", n + 1, fault.start - self.t0, kind, fault.detail)
            n += 1

    # -------------------------------------------------------------- the verdict
    def _collect(self, direct: Any) -> None:
        r = self.report
        last_fault_wall = time.time() - (time.monotonic() - max((f.end for f in r.faults), default=self.t0))
        with self.sessions() as session:
            for eid, submitted in self.submitted_at.items():
                c = check_episode(session, direct, eid, self.cfg.organizer_tokens, self.cfg.worker_tokens)
                r.resumed += len(c.resumed_tokens)
                r.resumed_tokens += sum(c.resumed_tokens)
                r.rerun += c.reruns
                r.organizer_decoded += c.organizer_decoded
                r.worker_decoded += c.worker_decoded
                r.organizer_kept += c.organizer_kept
                r.worker_kept += c.worker_kept
                if not c.finished:
                    r.stuck.append(eid)
                    continue
                if c.duplicated:
                    r.duplicated.append(eid)
                if c.good:
                    r.completed += 1
                else:
                    r.lost.append(eid)
                    if len(r.notes) < 5:
                        r.notes.append(f"{eid}: {c.why}")
                if c.finished_at is not None:
                    r.durations_s.append(c.finished_at - submitted)
                    after = c.finished_at - max(submitted, last_fault_wall)
                    r.slowest_after_last_fault_s = max(r.slowest_after_last_fault_s, after)
                    if after > self.cfg.episode_timeout_s:
                        r.late.append(eid)


@dataclass
class EpisodeCheck:
    """What the store and Redis say about one soak episode (see :func:`check_episode`)."""

    finished: bool = False
    good: bool = False  # completed, with exactly the scripted trace
    duplicated: bool = False  # finished more than once, or segments no run made
    why: str = ""
    finished_at: float | None = None  # unix time
    resumed_tokens: list[int] = field(default_factory=list)  # per resumed run: tokens it did not decode again
    reruns: int = 0  # runs after an interruption that started from the prompt
    organizer_decoded: int = 0
    worker_decoded: int = 0
    organizer_kept: int = 0  # generated tokens in the stored segments
    worker_kept: int = 0


def check_episode(session: Any, redis_client: Any, eid: str, organizer_tokens: int = 120, worker_tokens: int = 60) -> EpisodeCheck:
    """Check one soak episode against its script: the stored row and segments, its event stream (how
    many runs started, resumed or not, and finished) and the tokens decoded for it."""
    from shared.messages import events_stream
    from shared.store import repository

    c = EpisodeCheck()
    script = script_for(eid, organizer_tokens, worker_tokens)
    events = [json.loads(f[b"data"]) for _, f in redis_client.xrange(events_stream(eid))]
    finished = [e for e in events if e["kind"] == "finished" and e["agent"] == "organizer"]
    for e in [e for e in events if e["kind"] == "started"][1:]:
        if "resumed_tokens" in e["data"]:
            c.resumed_tokens.append(int(e["data"]["resumed_tokens"]))
        else:
            c.reruns += 1
    decoded = {k.decode(): int(v) for k, v in redis_client.hgetall(METER_KEY + eid).items()}
    c.organizer_decoded = decoded.get("organizer", 0)
    c.worker_decoded = sum(v for k, v in decoded.items() if k != "organizer")
    episode = repository.get_episode(session, eid)
    if episode is None or episode.status in ("pending", "running"):
        c.why = f"status {episode.status if episode else 'missing'}"
        return c
    c.finished = True
    c.finished_at = episode.finished_at.timestamp() if episode.finished_at else None
    segments = {seg.agent: seg for seg in repository.episode_segments(session, eid)}
    org = segments.get("organizer")
    c.organizer_kept = org.generated_tokens if org is not None else 0
    c.worker_kept = sum(seg.generated_tokens for a, seg in segments.items() if a != "organizer")
    c.duplicated = len(finished) > 1 or bool(set(segments) - set(script))
    workers_ok = all(
        a in segments and segments[a].text == text and segments[a].error is None and segments[a].returned == takeaway(int(a))
        for a, text in script.items()
        if a != "organizer"
    )
    c.good = (
        episode.status == "completed"
        and episode.answer == ANSWER
        and set(segments) == set(script)
        and org is not None
        and org.text == expected_organizer_text(script)
        and workers_ok
    )
    if not c.good:
        bad = sorted(a for a, seg in segments.items() if seg.error)
        c.why = f"status {episode.status}, error {episode.error!r}, answer {episode.answer!r}, segments with errors {bad}"
    return c


def _per(total: int, n: int) -> str:
    return f"{total / n:.0f}" if n else "-"


def format_report(r: Report, cfg: SoakConfig) -> str:
    lines: list[str] = []
    mode = "resume" if cfg.resume else "re-run (--no-resume)"
    lines.append(
        f"fault soak: {r.submitted} episodes, {cfg.organizers} organizer process(es), 1 Celery worker process "
        f"(--pool=threads -c {cfg.celery_threads}), scripted backend at {cfg.tokens_per_s:g} tokens/s "
        f"(organizer ~{cfg.organizer_tokens}, workers ~{cfg.worker_tokens} tokens), interrupted episodes: {mode}"
    )
    cuts = [f for f in r.faults if f.kind == "redis cut"]
    lines.append(
        f"faults: {len(r.faults)} ({r.kills('worker kill -9')} Celery worker kill -9, "
        f"{r.kills('organizer kill -9')} organizer kill -9, {len(cuts)} Redis cuts: "
        + (", ".join(f.detail for f in cuts) or "none")
        + f"); the last one ended {r.last_fault_s:.0f} s after the start"
    )
    head = f"{'submitted':>9} | {'completed':>9} | {'lost':>4} | {'duplicated':>10} | {'stuck':>5} | {'late':>4}"
    lines.append(head)
    lines.append("-" * len(head))
    lines.append(
        f"{r.submitted:>9} | {r.completed:>9} | {len(r.lost):>4} | {len(r.duplicated):>10} | {len(r.stuck):>5} | {len(r.late):>4}"
    )
    org_redone = r.organizer_decoded - r.organizer_kept
    worker_redone = r.worker_decoded - r.worker_kept
    org_kills, worker_kills = r.kills("organizer kill -9"), r.kills("worker kill -9")
    lines.append(
        f"interrupted episodes: {r.resumed} resumed from a checkpoint ({r.resumed_tokens} organizer tokens not decoded "
        f"again), {r.rerun} run again from the start"
    )
    lines.append(
        f"work lost (tokens decoded twice): organizers {org_redone} = {_per(org_redone, org_kills)} per organizer "
        f"kill; workers {worker_redone} = {_per(worker_redone, worker_kills)} per worker kill "
        f"(Redis cuts included: a task running through one may be delivered again)"
    )
    if cfg.resume:
        rerun_cost = org_redone + r.resumed_tokens
        lines.append(
            f"the same organizer crashes with re-run instead of resume: {rerun_cost} organizer tokens = "
            f"{_per(rerun_cost, org_kills)} per organizer kill (the resumed prefixes decoded again)"
        )
    d = sorted(r.durations_s) or [0.0]
    lines.append(
        f"episode time, submission to stored result: p50 {d[len(d) // 2]:.1f} s, p99 {d[min(len(d) - 1, round(0.99 * (len(d) - 1)))]:.1f} s, "
        f"max {d[-1]:.1f} s; slowest after max(its submission, the last fault): {r.slowest_after_last_fault_s:.1f} s "
        f"(limit {cfg.episode_timeout_s:g} s); wall {r.wall_s:.0f} s"
    )
    for note in r.notes:
        lines.append(f"  not completed: {note}")
    verdict = "MET" if r.ok else "MISSED"
    lines.append(f"target: 0 lost, 0 duplicated, 0 stuck, every episode within its timeout after the last fault: {verdict}")
    return "\n".join(lines)


async def soak(cfg: SoakConfig) -> Report:
    return await Soak(cfg).run()


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    p = argparse.ArgumentParser(prog="python -m bench.fault_soak", description=__doc__.splitlines()[0])
    d = SoakConfig()
    p.add_argument("--episodes", type=int, default=d.episodes)
    p.add_argument("--organizers", type=int, default=d.organizers, help="organizer processes")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="unfinished episodes at most")
    p.add_argument("--tokens-per-s", type=float, default=d.tokens_per_s, help="scripted decode rate")
    p.add_argument("--organizer-tokens", type=int, default=d.organizer_tokens)
    p.add_argument("--worker-tokens", type=int, default=d.worker_tokens)
    p.add_argument("--celery-threads", type=int, default=d.celery_threads)
    p.add_argument("--seed", type=int, default=d.seed, help="fault schedule")
    p.add_argument("--no-resume", action="store_true", help="organizers run interrupted episodes from the start")
    p.add_argument("--fault-gap", type=float, nargs=2, default=d.fault_gap, metavar=("MIN", "MAX"))
    p.add_argument("--restart-after", type=float, nargs=2, default=d.restart_after, metavar=("MIN", "MAX"))
    p.add_argument("--min-faults", type=int, default=d.min_faults)
    p.add_argument("--max-faults", type=int, default=d.max_faults)
    p.add_argument("--lease-ms", type=int, default=d.lease_ms, help="organizer lease (--claim-idle-ms)")
    p.add_argument("--task-lease-s", type=float, default=d.task_lease_s, help="Celery task lease")
    p.add_argument("--worker-timeout-s", type=float, default=d.worker_timeout_s)
    p.add_argument("--episode-timeout", type=float, default=d.episode_timeout_s)
    p.add_argument("--redis-url", default=d.redis_url, help="a Redis database of the soak's own (emptied)")
    p.add_argument("--pg-url", default=d.pg_url, help="PostgreSQL used to create and drop a scratch database")
    p.add_argument("--keep-db", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="where the service logs go (default: a temp dir)")
    a = p.parse_args(argv)
    return SoakConfig(
        episodes=a.episodes, organizers=a.organizers, concurrency=a.concurrency, tokens_per_s=a.tokens_per_s,
        organizer_tokens=a.organizer_tokens, worker_tokens=a.worker_tokens, celery_threads=a.celery_threads,
        seed=a.seed, resume=not a.no_resume, fault_gap=tuple(a.fault_gap), restart_after=tuple(a.restart_after),
        min_faults=a.min_faults, max_faults=a.max_faults, lease_ms=a.lease_ms, task_lease_s=a.task_lease_s,
        worker_timeout_s=a.worker_timeout_s, episode_timeout_s=a.episode_timeout, redis_url=a.redis_url,
        pg_url=a.pg_url, keep_db=a.keep_db, workdir=a.workdir,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("shared", "services", "celery", "kombu", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = parse_args(argv)
    soak_obj = Soak(cfg)
    report = asyncio.run(soak_obj.run())
    print(format_report(report, cfg))
    print(f"service logs: {soak_obj.workdir}")


if __name__ == "__main__":
    main()
