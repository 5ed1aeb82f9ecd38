"""Run the organizer service: ``python -m services.organizer [--consumer NAME] [--max-episodes N]``.

Reads ``Settings`` (``ASYNCTHINK_*`` / ``DATABASE_URL`` / ``REDIS_URL``), connects the Redis Streams bus
and the store, opens the model backend (the organizer decodes; forks go to the Celery queues unless
``--local-workers``), and consumes the problems stream until SIGTERM or SIGINT, then finishes or hands
back its running episodes (see :mod:`services.organizer.service`). The schema must already be migrated
(``asyncthink db upgrade`` / the compose migration job), or pass ``--migrate``.

``--heartbeat-file PATH`` keeps a liveness file fresh while the service runs, for probes (the organizer
has no HTTP port): see :mod:`services.organizer.heartbeat`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any


def add_options(p: argparse.ArgumentParser) -> None:
    """The organizer's options (also ``asyncthink serve organizer``'s)."""
    p.add_argument("--consumer", default=None, help="consumer name in the group (default: organizer-<host>-<pid>)")
    p.add_argument("--max-episodes", type=int, default=64, help="episodes run at once (default 64)")
    p.add_argument("--claim-idle-ms", type=int, default=10_000,
                   help="the lease: a submission its organizer has not renewed for this long is claimed by "
                   "another organizer (default 10000)")
    p.add_argument("--renew-every-ms", type=int, default=None,
                   help="how often this organizer renews the leases of its running submissions "
                   "(default: a quarter of --claim-idle-ms)")
    p.add_argument("--worker-timeout-s", type=float, default=None,
                   help="cap on every episode's worker timeout, in seconds (default: the settings' "
                   "worker_timeout_s, ASYNCTHINK_WORKER_TIMEOUT_S, which the Celery workers' time limits use too)")
    p.add_argument("--scheduling", choices=["critical-path", "fifo"], default=None,
                   help="order of queued worker tasks when workers are scarce (default: the settings' "
                   "scheduling, ASYNCTHINK_SCHEDULING: critical-path)")
    p.add_argument("--redis-max-connections", type=int, default=None,
                   help="Redis connection pool size (default: ASYNCTHINK_REDIS_MAX_CONNECTIONS, or 8 + a "
                   "quarter of --max-episodes)")
    p.add_argument("--no-resume", action="store_true",
                   help="run an interrupted episode again from the start instead of resuming it")
    p.add_argument("--local-workers", action="store_true", help="run workers in this process instead of Celery")
    p.add_argument("--migrate", action="store_true", help="upgrade the database schema before starting")
    p.add_argument("--heartbeat-file", default=None,
                   help="write the time to this file every --heartbeat-interval s while running, for a "
                   "liveness probe (python -m services.organizer.heartbeat PATH); removed on exit")
    p.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds between heartbeats (default 10)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO: every episode's start, "
                   "outcome and time)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.organizer", description=__doc__.splitlines()[0])
    add_options(p)
    return p.parse_args(argv)


def organizer_pool_size(max_episodes: int) -> int:
    """Redis connections for an organizer running ``max_episodes`` at once: its blocking reads (the
    problems stream, every episode's results, the weights stream) and a few writers; episodes share
    the rest, waiting for a free connection rather than opening more."""
    return 8 + max_episodes // 4


async def amain(args: argparse.Namespace) -> None:
    from services.organizer.service import OrganizerService
    from services.runtime import open_service_backend
    from shared.bus.redis_streams import RedisStreamsBus
    from shared.config import get_settings
    from shared.store import db

    settings = get_settings()
    if args.migrate:
        db.migrate(settings.database_url)
    db.check_connection(settings.database_url)
    pool = args.redis_max_connections or settings.redis_max_connections or organizer_pool_size(args.max_episodes)
    bus = RedisStreamsBus(settings.redis_url, max_connections=pool)
    await bus.ping()
    engine = db.make_engine(settings.database_url)
    backend = open_service_backend(settings)
    from services.workers.tools import local_endpoints
    from shared.agents import WorkerEndpoint

    endpoints: dict[str | None, WorkerEndpoint] = local_endpoints()
    celery_endpoint = None
    if not args.local_workers:
        from services.workers.app import app, task_limits
        from services.workers.endpoint import CeleryWorkerEndpoint

        # a task no worker started within two task leases is sent again (see CeleryWorkerEndpoint)
        resend_after_s = max(5.0, 2 * task_limits(settings).lease_s)
        celery_endpoint = CeleryWorkerEndpoint(
            bus, app, resend_after_s=resend_after_s, scheduling=args.scheduling or settings.scheduling
        )
        endpoints = dict(celery_endpoint.endpoints())
    endpoints |= _human_endpoints(bus, db.session_factory(engine), settings, celery_endpoint, backend)  # @human forks
    service = OrganizerService(
        bus,
        db.session_factory(engine),
        backend,
        endpoints=endpoints,
        consumer_name=args.consumer,
        max_concurrent_episodes=args.max_episodes,
        claim_idle_ms=args.claim_idle_ms,
        renew_every_ms=args.renew_every_ms,
        worker_timeout_cap_s=args.worker_timeout_s if args.worker_timeout_s is not None else settings.worker_timeout_s,
        resume=not args.no_resume,
        stream_ttl_s=settings.stream_ttl_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from services.control.listener import WeightControlListener  # follows the trainer's published versions

    weights = WeightControlListener(bus, backend, process=service.consumer_name)
    weights.start()
    heartbeat = None
    if args.heartbeat_file:
        from pathlib import Path

        from services.organizer.heartbeat import run_heartbeat

        heartbeat = asyncio.create_task(run_heartbeat(Path(args.heartbeat_file), args.heartbeat_interval))
    try:
        await service.run_forever(stop)
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        await weights.close()
        if celery_endpoint is not None:
            await celery_endpoint.close()
        await backend.aclose()
        await bus.close()
        engine.dispose()
        logging.getLogger(__name__).info("organizer stopped after %d episodes", service.episodes_done)


def _human_endpoints(bus: Any, sessions: Any, settings: Any, celery_endpoint: Any, backend: Any) -> dict[Any, Any]:
    """The human queue's endpoints (``@human``, ``@human:POOL``; none with ASYNCTHINK_HUMAN_PAGES=false): people
    answer on the gateway's pages; a missed deadline's model fallback runs on the model queue (or here)."""
    if not settings.human_pages:
        return {}
    from services.human.endpoint import human_endpoints
    from services.human.planner import LocalModelWorker

    model = celery_endpoint if celery_endpoint is not None else LocalModelWorker(backend)
    return human_endpoints(sessions, bus, settings, model=model)


def run(args: argparse.Namespace) -> None:
    """Run the organizer with parsed options (logging at ``--log-level``, even if logging was set up)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(args.log_level)
    asyncio.run(amain(args))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
