"""``asyncthink serve trainer`` / ``asyncthink trainer ...``: the trainer service and its operator verbs.

Verbs (``asyncthink trainer VERB``):

    serve                 run the trainer service (the same as ``asyncthink serve trainer``)
    versions              list the model versions (model_versions), oldest first
    show CYCLE|VERSION    one cycle's (or version's) metrics: data window, update, gate, swaps, events
    status                ask the running trainer: paused, cycle, phase, serving version
    pause | resume        stop training after the running cycle / go on
    promote VERSION       serve VERSION everywhere (operator's choice, gate or not)
    rollback VERSION      serve an earlier VERSION everywhere, bit for bit its registered weights

``versions`` and ``show`` read the database (``--db``, default ``DATABASE_URL``); the others send a
command to the running trainer over the bus (``ASYNCTHINK_BUS=redis``: Redis at ``REDIS_URL``). With
``--url http://gateway:8000`` every verb goes through the gateway's admin routes instead (the only way to
reach an embedded setup, where one process holds the in-process bus).

``serve`` options are generated from :class:`trainer.service.config.TrainerServiceConfig`. With the
embedded default (``ASYNCTHINK_BUS=inprocess``) it runs the whole loop in one process: the gateway on
``--host``/``--port`` (REST, admin routes), its organizer on the local model, and the trainer swapping
that model in place. With ``ASYNCTHINK_BUS=redis`` it runs the trainer alone and publishes through
:class:`services.control.publisher.FleetPublisher` (SGLang when ``ASYNCTHINK_MODEL`` is an ``sglang:``
spec, Celery model workers by broadcast, organizers by the weights stream). Its own Prometheus
``/metrics`` is on ``--metrics-port``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cli import CliError
from cli.options import add_options, collect

SubParsers = Any

SERVE_HELP = """Run the trainer service: consume stored episodes (sft) or submit GRPO groups (grpo), train a
candidate on the serving version, gate it on held-out problems, publish it to every serving process,
check the fleet after the swap, roll back when that fails.

examples:
  asyncthink serve trainer --method sft --min-episodes 64                   # embedded: gateway + organizer + trainer
  ASYNCTHINK_BUS=redis asyncthink serve trainer --method grpo --group-size 8 --out /checkpoints
  asyncthink trainer versions ; asyncthink trainer show 3 ; asyncthink trainer rollback <version>
"""


TRAINER_HELP = """The trainer service and its operator verbs. versions and show read the database (--db);
status, pause, resume, promote and rollback ask the running trainer over the bus (ASYNCTHINK_BUS=redis),
or go through a gateway's admin routes with --url (the way to reach an embedded setup).

examples:
  asyncthink trainer versions
  asyncthink trainer show 3
  asyncthink trainer rollback 3fa9c1d27b6e --reason "worse on math" --url http://127.0.0.1:8000
  ASYNCTHINK_BUS=redis asyncthink trainer pause
"""


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The trainer service's options, from its config (a group of the ``serve`` parser)."""
    from trainer.service.config import TrainerServiceConfig  # no torch: the config dataclass only

    add_options(p.add_argument_group("trainer service (serve trainer)"), TrainerServiceConfig)


def register(sub: SubParsers) -> None:
    p = sub.add_parser("trainer", help="the trainer service: serve it, list versions, promote, roll back, pause",
                       description=TRAINER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    verbs = p.add_subparsers(dest="trainer_verb", metavar="VERB", required=True)
    s = verbs.add_parser("serve", help="run the trainer service", description=SERVE_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="embedded: gateway bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="embedded: gateway port (default 8000)")
    add_serve_options(s)
    s.set_defaults(func=cmd_serve_trainer)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--url", help="a gateway's base URL: go through its admin routes (/v1/admin)")
        q.add_argument("--model-id", help="the model lineage (default: all / the trainer's)")
        q.add_argument("--json", action="store_true", help="print JSON")

    q = verbs.add_parser("versions", help="list the model versions, oldest first")
    common(q)
    q.add_argument("--db", help="database URL (default: DATABASE_URL or sqlite:///asyncthink.db)")
    q.set_defaults(func=cmd_versions)
    q = verbs.add_parser("show", help="a cycle's (or a version's) metrics")
    q.add_argument("which", help="a cycle number, or a version label")
    common(q)
    q.add_argument("--db", help="database URL (default: DATABASE_URL or sqlite:///asyncthink.db)")
    q.set_defaults(func=cmd_show)
    for name, text in (("status", "the running trainer's status"), ("pause", "pause training after the running cycle"),
                       ("resume", "resume training")):  # fmt: skip
        q = verbs.add_parser(name, help=text)
        common(q)
        q.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the trainer (default 15)")
        q.set_defaults(func=cmd_command, op=name)
    for name, text in (("promote", "serve VERSION everywhere"), ("rollback", "roll the fleet back to VERSION")):
        q = verbs.add_parser(name, help=text)
        q.add_argument("version", help="the version label (see `asyncthink trainer versions`)")
        q.add_argument("--reason", default="", help="why (recorded with the version's events)")
        common(q)
        q.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the swap (default 300)")
        q.set_defaults(func=cmd_command, op=name)


# ----------------------------------------------------------------------------- reading
def _session_factory(url: str | None) -> Any:
    from shared.config import get_settings
    from shared.store import db

    url = url or get_settings().database_url
    try:
        db.check_connection(url)
    except db.StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    return db.session_factory(db.make_engine(url))


def _get(url: str, path: str, **params: Any) -> Any:
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + path, params={k: v for k, v in params.items() if v is not None}, timeout=60)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from None
    if r.status_code >= 400:
        raise CliError(f"{url}{path} answered {r.status_code}: {r.text[:500]}")
    return r.json()


def cmd_versions(args: argparse.Namespace) -> int:
    if args.url:
        rows = _get(args.url, "/v1/admin/versions", model_id=args.model_id, full="true" if args.json else None)
    else:
        from shared.store import versions as registry

        with _session_factory(args.db)() as session:
            rows = [registry.public(r) for r in registry.list_versions(session, model_id=args.model_id)]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no versions yet (the trainer registers the base model when it starts)")
        return 0
    print(f"{'version':<28} {'kind':<5} {'status':<12} {'cycle':>5} {'parent':<28} {'gate Δ':>8} {'episodes':>8}  created")
    for row in rows:
        metrics = row.get("metrics") or {}
        gate = row.get("gate") or metrics.get("gate") or {}
        episodes = row.get("episodes", (metrics.get("data_window") or {}).get("used"))
        delta = gate.get("delta")
        print(
            f"{row['version']:<28} {row['kind']:<5} {row.get('status') or '':<12} {row.get('cycle') or 0:>5} "
            f"{row.get('parent_version') or '-':<28} {'' if delta is None else f'{delta:+.3f}':>8} "
            f"{'' if episodes is None else episodes:>8}  {str(row.get('created_at') or '')[:19]}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    by_cycle = args.which.isdigit()
    if args.url:
        path = f"/v1/admin/cycles/{args.which}" if by_cycle else f"/v1/admin/versions/{args.which}"
        got = _get(args.url, path, model_id=args.model_id)
        rows = got if isinstance(got, list) else [got]
    else:
        from shared.store import versions as registry

        with _session_factory(args.db)() as session:
            if by_cycle:
                found = registry.by_cycle(session, cycle=int(args.which), model_id=args.model_id)
            else:
                one = registry.find_version(session, version=args.which, model_id=args.model_id)
                found = [one] if one is not None else []
            rows = [registry.public(r) for r in found]
    if not rows:
        raise CliError(f"no {'cycle' if by_cycle else 'version'} {args.which} in model_versions")
    if args.json:
        print(json.dumps(rows if by_cycle else rows[0], indent=2, default=str))
        return 0
    for row in rows:
        _print_version(row)
    return 0


def _print_version(row: dict[str, Any]) -> None:
    m = row.get("metrics") or {}
    print(f"{row['version']}  ({row['kind']}, {m.get('status')}, cycle {m.get('cycle')}, parent {row.get('parent_version')})")
    print(f"  path          {row['path']}")
    print(f"  content hash  {m.get('content_hash')}")
    window = m.get("data_window") or {}
    if window:
        print(f"  data          {window.get('used')} episodes used of {window.get('seen')} seen, "
              f"{window.get('from')} .. {window.get('to')}; skipped {window.get('skipped')}; "
              f"from versions {window.get('versions')}")  # fmt: skip
    train = m.get("train") or {}
    if train:
        nll = (f"NLL {train['nll_before']:.3f} -> {train['nll_after']:.3f}" if train.get("nll_before") is not None
               else f"loss {train.get('loss')}")  # fmt: skip
        print(f"  update        {train.get('method')}: {train.get('sequences')} sequences, {train.get('trained_tokens')} "
              f"tokens, {nll}, {train.get('train_s', 0):.1f}s")  # fmt: skip
    gate = m.get("gate") or {}
    if gate:
        c, s = gate.get("candidate") or {}, gate.get("serving") or {}
        metric = gate.get("metric")
        print(f"  gate          {metric}: candidate {c.get(metric)} vs serving {s.get(metric)} "
              f"(Δ {gate.get('delta'):+.3f}, tolerance {gate.get('tolerance')}): {'passed' if gate.get('passed') else 'failed'}")  # fmt: skip
    if m.get("phases"):
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in m["phases"].items())
        print(f"  timing        {m.get('cycle_seconds', 0):.1f}s: {phases}")
    if m.get("post_swap"):
        ps = m["post_swap"]
        print(f"  after swap    {'passed' if ps.get('passed') else 'failed: ' + str(ps.get('why'))}")
    for event in m.get("events") or []:
        detail = {k: v for k, v in event.items() if k not in ("ts", "event")}
        print(f"  event         {event['event']} {detail if detail else ''}")


# ----------------------------------------------------------------------------- commands
def cmd_command(args: argparse.Namespace) -> int:
    op = args.op
    version = getattr(args, "version", None)
    if args.url:
        import httpx

        paths = {"status": ("GET", "/v1/admin/trainer"), "pause": ("POST", "/v1/admin/trainer/pause"),
                 "resume": ("POST", "/v1/admin/trainer/resume"),
                 "promote": ("POST", f"/v1/admin/versions/{version}/promote"),
                 "rollback": ("POST", f"/v1/admin/versions/{version}/rollback")}  # fmt: skip
        method, path = paths[op]
        try:
            r = httpx.request(method, args.url.rstrip("/") + path, params={"timeout_s": args.timeout},
                              json={"reason": getattr(args, "reason", "")} if version else None,
                              timeout=args.timeout + 10)  # fmt: skip
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {args.url}: {exc}") from None
        if r.status_code >= 500 or r.status_code == 404:
            raise CliError(f"{args.url}{path} answered {r.status_code}: {r.text[:500]}")
        data = r.json()
    else:
        data = _ask_bus(op, version, getattr(args, "reason", ""), args.timeout)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(("ok: " if data.get("ok") else "refused: ") + str(data.get("message")))
        status = {k: v for k, v in (data.get("data") or {}).items() if k not in ("report", "last")}
        if status:
            print("  " + ", ".join(f"{k}={v}" for k, v in status.items()))
    return 0 if data.get("ok") else 1


def _ask_bus(op: str, version: str | None, reason: str, timeout: float) -> dict[str, Any]:
    import asyncio

    from shared.config import get_settings
    from shared.control import TrainerCommand, ask_trainer

    settings = get_settings()
    if settings.bus != "redis":
        raise CliError(
            "the embedded setup runs the trainer inside one process: pass --url of its gateway "
            "(e.g. --url http://127.0.0.1:8000), or set ASYNCTHINK_BUS=redis for the distributed setup"
        )

    async def go() -> dict[str, Any]:
        from shared.bus.redis_streams import RedisStreamsBus

        bus = RedisStreamsBus(settings.redis_url)
        try:
            reply = await ask_trainer(bus, TrainerCommand(op=op, version=version, reason=reason),  # type: ignore[arg-type]
                                      timeout_s=timeout)  # fmt: skip
        finally:
            await bus.close()
        return reply.model_dump(mode="json")

    try:
        return asyncio.run(go())
    except (TimeoutError, ConnectionError) as exc:
        raise CliError(str(exc)) from None


# ----------------------------------------------------------------------------- serve
def cmd_serve_trainer(args: argparse.Namespace) -> int:
    import asyncio

    from trainer.service.config import TrainerServiceConfig

    try:
        config = TrainerServiceConfig(**collect(args, TrainerServiceConfig))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    from shared.config import get_settings

    settings = get_settings()
    try:
        config = resolve_config(config, settings.model)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    asyncio.run(serve_trainer(config, settings, host=args.host, port=args.port))
    return 0


def resolve_config(config: Any, model: str) -> Any:
    """Fill ``base_model`` from the serving model spec (a directory, or an sglang:/openai: spec's tokenizer)."""
    import dataclasses
    from urllib.parse import parse_qs

    if config.base_model is None:
        head, _, query = model.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if head.startswith(("sglang:", "openai:")):
            if "tokenizer" not in params:
                raise ValueError(f"ASYNCTHINK_MODEL {model!r} names no tokenizer= directory; pass --base-model")
            base = Path(params["tokenizer"])
        else:
            base = Path(head)
        config = dataclasses.replace(config, base_model=base)
    import os

    from shared.control import DEFAULT_PREFIX, PREFIX_ENV

    if config.control_prefix == DEFAULT_PREFIX and os.environ.get(PREFIX_ENV):  # as the serving processes read it
        config = dataclasses.replace(config, control_prefix=os.environ[PREFIX_ENV])
    if not (Path(config.base_model) / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {config.base_model} is not a model directory (no config.json): pass --base-model, the "
            "directory the fleet started from"
        )
    return config


async def serve_trainer(config: Any, settings: Any, *, host: str, port: int) -> None:
    """Run the trainer service until SIGTERM/SIGINT (see the module docstring for the two setups)."""
    import asyncio
    import logging
    import signal

    from shared.store import db
    from trainer.service import TrainerMetrics, TrainerService

    log = logging.getLogger("asyncthink.trainer")
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    metrics = TrainerMetrics()
    http = metrics.serve(config.metrics_port) if config.metrics_port else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if settings.bus == "inprocess":
            await _serve_embedded(config, settings, metrics, stop, host=host, port=port)
        else:
            db.check_connection(settings.database_url)
            from services.control.publisher import FleetPublisher
            from services.workers.app import make_app
            from shared.bus.redis_streams import RedisStreamsBus

            bus = RedisStreamsBus(settings.redis_url)
            await bus.ping()
            sglang: Any = None
            if settings.model.startswith("sglang:"):  # the fleet's servers: swapped from here
                from shared.backends.registry import open_backend

                sglang = open_backend(settings.model, settings)
                versions = await sglang.sync_version()
                if config.init_version is None:
                    import dataclasses

                    config = dataclasses.replace(config, init_version=next(iter(versions.values())))
            publisher = FleetPublisher(bus=bus, celery_app=make_app(settings.redis_url), sglang=sglang,
                                       prefix=config.control_prefix, timeout_s=config.swap_timeout_s,
                                       pause_mode=config.pause_mode)  # fmt: skip
            engine = db.make_engine(settings.database_url)
            trainer = TrainerService(config, bus=bus, session_factory=db.session_factory(engine),
                                     publisher=publisher, metrics=metrics)  # fmt: skip
            log.info("trainer service (distributed): metrics on :%s", config.metrics_port)
            try:
                await trainer.run_forever(stop)
            finally:
                if sglang is not None:
                    await sglang.aclose()
                await bus.close()
                engine.dispose()
    finally:
        if http is not None:
            http.shutdown()


async def _serve_embedded(config: Any, settings: Any, metrics: Any, stop: Any, *, host: str, port: int) -> None:
    """Gateway (with its organizer) and trainer in this process, on one in-process bus and one backend."""
    import asyncio

    import uvicorn

    from services.gateway.app import create_app
    from services.runtime import open_service_backend
    from shared.bus.inprocess import InProcessBus
    from shared.store import db
    from trainer.service import LocalPublisher, TrainerService

    await asyncio.to_thread(db.migrate, settings.database_url)
    engine = db.make_engine(settings.database_url)
    factory = db.session_factory(engine)
    bus = InProcessBus()
    backend = await asyncio.to_thread(open_service_backend, settings)
    app = create_app(settings, bus=bus, session_factory=factory, embedded_backend=backend)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    trainer = TrainerService(config, bus=bus, session_factory=factory, publisher=LocalPublisher([backend]),
                             metrics=metrics)  # fmt: skip
    serving = asyncio.create_task(server.serve(), name="gateway")
    training = asyncio.create_task(trainer.run_forever(stop), name="trainer")
    try:
        await asyncio.wait([serving, training, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        server.should_exit = True
        await asyncio.gather(serving, training, return_exceptions=True)
        await backend.aclose()
        engine.dispose()
