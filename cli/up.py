"""``asyncthink up``: the distributed stack on this machine, without Docker, in one command.

It runs, on the local Redis and PostgreSQL:

1. checks that both answer (each error says how to start the server), creates the PostgreSQL database
   when it is missing, and migrates the schema;
2. starts the gateway (``python -m services.gateway``, the Redis bus), ``--organizers`` organizer
   processes (``python -m services.organizer``) and ``--workers`` Celery worker processes
   (``celery -A services.workers.app worker`` on the ``model`` and ``tool`` queues, ``--concurrency``
   threads each), every one with the same environment (``ASYNCTHINK_BUS=redis``, ``DATABASE_URL``,
   ``REDIS_URL``, ``ASYNCTHINK_MODEL`` ...);
3. prefixes each line a process prints with its name (``gateway |``, ``organizer-1 |``, ``worker-1 |``);
4. says ``ready`` only when every process is: the gateway's ``/readyz`` answers 200, each organizer has
   loaded its model and consumes the problems stream, each worker has loaded its model (the workers load
   it at start, not on their first task);
5. stops everything on Ctrl-C (SIGINT, then SIGTERM, then SIGKILL after ``--stop-timeout``), and stops
   everything with exit status 1 when one process dies on its own.

Limits: one machine; processes are not restarted; logs go to this terminal only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from cli import CliError

DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/asyncthink"
READY_MARKERS = {  # a line each process prints once it is ready (see the services' logs)
    "organizer": "consuming asyncthink:problems",
    "worker": "asyncthink worker ready",
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "up",
        help="run the distributed stack here without Docker (gateway, organizers, Celery workers)",
        description="Run the gateway, organizer processes and Celery workers on the local Redis and "
        "PostgreSQL, each log line prefixed with its process's name; ready when every process and its "
        "model are; Ctrl-C stops everything.",
        epilog="example: asyncthink up --workers 2 --concurrency 8   # then submit to http://127.0.0.1:8000",
    )
    p.add_argument("--db", default=None,
                   help=f"PostgreSQL URL (default: DATABASE_URL, else {DEFAULT_DB}; created when missing)")
    p.add_argument("--redis", default=None, help="Redis URL (default: REDIS_URL, else redis://127.0.0.1:6379/0)")
    p.add_argument("--model", default=None, help="model spec for organizers and workers (default: ASYNCTHINK_MODEL "
                   "or the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    p.add_argument("--organizers", type=int, default=1, help="organizer processes (default 1)")
    p.add_argument("--workers", type=int, default=1, help="Celery worker processes (default 1)")
    p.add_argument("--concurrency", type=int, default=4, help="worker threads per Celery worker (default 4)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for every process to be ready (default 300)")
    p.add_argument("--stop-timeout", type=float, default=20.0,
                   help="seconds a process gets to stop after Ctrl-C before it is killed (default 20)")
    p.set_defaults(func=cmd_up)


@dataclass
class Child:
    """One supervised process and how to tell it is ready."""

    name: str
    argv: list[str]
    ready_marker: str | None = None  # a log line that means ready (None: ``ready_probe`` decides)
    ready_probe: Callable[[], bool] | None = None
    proc: subprocess.Popen[str] | None = None
    ready: threading.Event = field(default_factory=threading.Event)


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise CliError(
            f"Redis at {url} does not answer ({exc}); start one, e.g. `redis-server --daemonize yes`, "
            "or pass --redis URL"
        ) from None


def _ensure_database(url: str) -> None:
    """Create the PostgreSQL database named in ``url`` when the server has no such database."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    target = make_url(url)
    if not target.drivername.startswith("postgresql"):
        return
    admin = target.set(database="postgres")
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database})
            if exists.scalar() is None:
                conn.execute(text(f'CREATE DATABASE "{target.database}"'))
                print(f"up | created database {target.database}", flush=True)
    except OperationalError as exc:
        where = target.render_as_string(hide_password=True)
        raise CliError(
            f"PostgreSQL at {where} does not answer ({exc.orig}); start it (e.g. `pg_ctlcluster 15 main "
            "start`) or pass --db URL"
        ) from None
    finally:
        engine.dispose()


def _gateway_ready(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:  # noqa: S310 - loopback URL we built
                return bool(r.status == 200)
        except OSError:
            return False

    return probe


def _pump(child: Child, stream: IO[str], width: int) -> None:
    """Print the child's lines with its name in front; mark it ready at its marker line."""
    for line in stream:
        print(f"{child.name:<{width}} | {line.rstrip()}", flush=True)
        if child.ready_marker and child.ready_marker in line:
            child.ready.set()


def plan(args: argparse.Namespace, gateway_url: str) -> list[Child]:
    py = sys.executable
    children = [
        Child("gateway", [py, "-m", "services.gateway", "--host", args.host, "--port", str(args.port)],
              ready_probe=_gateway_ready(gateway_url)),
    ]
    for k in range(1, args.organizers + 1):
        children.append(Child(f"organizer-{k}", [py, "-m", "services.organizer", "--consumer", f"organizer-{k}"],
                              ready_marker=READY_MARKERS["organizer"]))
    for k in range(1, args.workers + 1):
        children.append(Child(
            f"worker-{k}",
            [py, "-m", "celery", "-A", "services.workers.app", "worker", "-Q", "model,tool", "--pool=threads",
             "-c", str(args.concurrency), "-n", f"worker{k}@%h", "--loglevel", "INFO"],
            ready_marker=READY_MARKERS["worker"],
        ))
    return children


def _environment(args: argparse.Namespace, db: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DATABASE_URL=db, REDIS_URL=redis_url, ASYNCTHINK_BUS="redis", PYTHONUNBUFFERED="1")
    if args.model:
        env["ASYNCTHINK_MODEL"] = args.model
    return env


def _stop(children: list[Child], timeout_s: float) -> None:
    running = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        for c in running:
            assert c.proc is not None
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(sig)
        deadline = time.monotonic() + (timeout_s if sig is not signal.SIGKILL else 5.0)
        while running and time.monotonic() < deadline:
            running = [c for c in running if c.proc is not None and c.proc.poll() is None]
            time.sleep(0.1)
        if not running:
            return
        print(f"up | {', '.join(c.name for c in running)} still running after {sig.name}", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    for name in ("organizers", "workers", "concurrency"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1, got {getattr(args, name)}")
    db = args.db or os.environ.get("DATABASE_URL") or DEFAULT_DB
    redis_url = args.redis or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    t0 = time.monotonic()
    _check_redis(redis_url)
    _ensure_database(db)
    from shared.store import db as store

    try:
        store.migrate(db)
    except store.StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    gateway_url = f"http://{args.host if args.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{args.port}"
    children = plan(args, gateway_url)
    env = _environment(args, db, redis_url)
    width = max(len(c.name) for c in children)
    stop_requested = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    try:
        for c in children:
            c.proc = subprocess.Popen(  # each in its own process group: Ctrl-C reaches it through us only
                c.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                start_new_session=True,
            )
            assert c.proc.stdout is not None
            threading.Thread(target=_pump, args=(c, c.proc.stdout, width), daemon=True).start()
            print(f"up | started {c.name} (pid {c.proc.pid}): {' '.join(c.argv[1:])}", flush=True)
        code = _supervise(children, args, gateway_url, t0, stop_requested)
    finally:
        _stop(children, args.stop_timeout)
        signal.signal(signal.SIGINT, previous)
    print(f"up | stopped after {time.monotonic() - t0:.1f}s", flush=True)
    return code


def _supervise(
    children: list[Child], args: argparse.Namespace, gateway_url: str, t0: float, stop: threading.Event
) -> int:
    announced = False
    deadline = t0 + args.ready_timeout
    while not stop.is_set():
        for c in children:
            assert c.proc is not None
            if c.proc.poll() is not None:
                print(f"up | {c.name} exited with status {c.proc.returncode}; stopping the others", flush=True)
                return 1
            if c.ready_probe is not None and not c.ready.is_set() and c.ready_probe():
                c.ready.set()
        if not announced:
            waiting = [c.name for c in children if not c.ready.is_set()]
            if not waiting:
                announced = True
                print(f"up | ready in {time.monotonic() - t0:.1f}s: gateway {gateway_url} "
                      f"({args.organizers} organizer(s), {args.workers} worker(s) x {args.concurrency} threads); "
                      "Ctrl-C stops everything", flush=True)
            elif time.monotonic() > deadline:
                print(f"up | not ready after {args.ready_timeout:g}s: {', '.join(waiting)}", flush=True)
                return 1
        stop.wait(0.5)
    print("up | stopping", flush=True)
    return 0
