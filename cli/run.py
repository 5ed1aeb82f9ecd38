"""``asyncthink solve``, ``eval``, ``trace`` and ``serve``.

The episode options (``--mode``, ``--capacity``, the budgets, sampling, ``--worker-timeout-s`` ...) are
generated from :class:`shared.episode.EpisodeSettings`, the one place they are declared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from cli import CliError
from cli.options import add_options, collect

if TYPE_CHECKING:
    from shared.backends.base import ModelBackend
    from shared.config import Settings
    from shared.engine import EngineConfig
    from shared.tasks.base import Problem, Task

ENGINE_ALIASES = {"worker_timeout_s": ["--worker-timeout"]}  # the older name keeps working


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("solve", help="solve one problem and show the trace", description=SOLVE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _problem_args(p)
    _engine_args(p, many_modes=False)
    p.add_argument("--json", action="store_true", help="print the episode as JSON")
    p.add_argument("--db", help="also store the episode in this database (SQLAlchemy URL)")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("eval", help="evaluate a task in one or more modes and store every episode",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown", help="countdown | sudoku | math (default countdown)")
    p.add_argument("--split", default="test",
                   help="test (the fixed held-out split), train, a JSONL file of problems (any task), "
                   "countdown's second held-out split test2, or for math aime24 | amc23")
    p.add_argument("-n", "--n", type=int, default=20, help="number of problems (default 20)")
    p.add_argument("--seed", type=int, default=0, help="problem generation and sampling seed (default 0)")
    _engine_args(p, many_modes=True)
    p.add_argument("--concurrency", type=int, default=16, help="episodes run at once (default 16)")
    p.add_argument("--db", help="database URL (default: DATABASE_URL or sqlite:///asyncthink.db)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--plot", metavar="PNG", help="write an accuracy-vs-latency plot across the modes")
    p.add_argument("--budgets", metavar="B1,B2,...",
                   help="sweep: run every mode once per organizer budget B (each parallel trace's budget; "
                   "workers keep --worker-budget, capped at B) and plot accuracy against mean T, one "
                   "curve per mode (with --plot)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("trace", help="show a stored episode")
    p.add_argument("episode_id", help="the episode id printed by solve/eval or returned by the REST API")
    p.add_argument("--db", help="database URL (default: DATABASE_URL or sqlite:///asyncthink.db)")
    p.add_argument("--json", action="store_true", help="print the stored episode as JSON")
    p.add_argument("--png", metavar="PNG",
                   help="also draw its timeline to this PNG: agents as lanes, forks and joins as arrows, in "
                   "organizer-token time with the critical path highlighted, and in wall time")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("serve", help="run one service: gateway, organizer or trainer",
                       description="Run one service of the system in this process, logging at INFO (each "
                       "request, each episode's start, outcome and time). `asyncthink up` runs them all.")
    services = p.add_subparsers(dest="service", metavar="SERVICE", required=True)
    g = services.add_parser("gateway", help="the REST, OpenAI-compatible and SSE gateway (uvicorn)",
                            description="The gateway. With ASYNCTHINK_BUS=inprocess (the default) it also runs an "
                            "organizer and the model in this process.")
    g.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; any other needs API keys, see ASYNCTHINK_AUTH)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.set_defaults(func=cmd_serve)
    from services.organizer.__main__ import add_options as add_organizer_options  # argparse only

    o = services.add_parser("organizer", help="the organizer service (consumes the problems stream)",
                            description="The organizer service: consumes asyncthink:problems on Redis, runs each "
                            "episode, sends forks to the Celery queues (or runs them here with --local-workers).")
    add_organizer_options(o)
    o.add_argument("--organizer-args", default="", help=argparse.SUPPRESS)  # older form: options in one string
    o.set_defaults(func=cmd_serve)
    from cli.trainer import add_serve_options  # trainer: options from its config (cli/trainer.py)

    t = services.add_parser("trainer", help="the trainer service (learns from stored episodes, hot-swaps)",
                            description="The trainer service; see `asyncthink trainer serve --help` for what it "
                            "does in the embedded and distributed setups.")
    t.add_argument("--host", default="127.0.0.1", help="embedded: gateway bind address (default 127.0.0.1)")
    t.add_argument("--port", type=int, default=8000, help="embedded: gateway port (default 8000)")
    add_serve_options(t)
    t.set_defaults(func=cmd_serve)


SOLVE_HELP = """Solve one problem with the organizer/worker protocol and print the answer, the trace
(organizer text with its forks and joins, each worker's takeaway), T, η and wall time.

examples:
  asyncthink solve                                   # the first held-out countdown problem
  asyncthink solve --numbers 3 7 25 50 --target 75
  asyncthink solve --task sudoku --puzzle 1..4.4.....2.3..
  asyncthink solve --task math --problem "What is 7*6?" --model sglang:http://127.0.0.1:30000
"""

EVAL_HELP = """Run n problems in each mode, store every episode, and print accuracy, mean
critical-path latency T (decoded tokens), mean η/c and wall time.

With --budgets, every mode runs once per organizer budget and the plot shows one accuracy-vs-T curve
per mode, so the modes can be compared at equal critical-path latency.

examples:
  asyncthink eval --task countdown -n 50 --mode asyncthink --mode sequential --mode parallel --plot cd.png
  asyncthink eval --task countdown --split shared/tasks/data/countdown_test2.jsonl -n 100
  asyncthink eval -n 100 --mode asyncthink --mode sequential --budgets 128,256,512,768 --plot curve.png
  asyncthink eval --task math --split amc23 -n 40 --model sglang:http://127.0.0.1:30000 --json
"""


def _problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="countdown", help="countdown | sudoku | math (default countdown)")
    p.add_argument("--numbers", type=int, nargs="+", help="countdown: the numbers")
    p.add_argument("--target", type=int, help="countdown: the target")
    p.add_argument("--puzzle", help="sudoku: 16 characters, digits 1-4 and . for blanks")
    p.add_argument("--problem", help="math: the problem text")
    p.add_argument("--payload", help="the task's payload as JSON (any task)")
    p.add_argument("--index", type=int, default=0, help="with no problem given: which held-out problem (default 0)")


def _engine_args(p: argparse.ArgumentParser, *, many_modes: bool) -> None:
    from shared.episode import EpisodeSettings

    group = p.add_argument_group("episode settings")
    if many_modes:  # eval runs each --mode given; its --seed seeds problems and sampling alike
        group.add_argument("--mode", action="append", choices=[m.value for m in _modes()],
                           help="asyncthink | sequential | parallel; repeat for several (default asyncthink)")
        add_options(group, EpisodeSettings, exclude=("mode", "seed"), aliases=ENGINE_ALIASES)
    else:
        add_options(group, EpisodeSettings, aliases=ENGINE_ALIASES)
    p.add_argument("--model", help="a model directory, sglang:URL or openai:URL#name (default: the shipped model)")
    p.add_argument("--device", help="torch device for a local model (default: ASYNCTHINK_DEVICE or cpu)")


def _modes() -> list[Any]:
    from shared.tasks.base import Mode

    return list(Mode)


# ----------------------------------------------------------------------------- helpers
def _settings(args: argparse.Namespace) -> Settings:
    from shared.config import get_settings

    settings = get_settings()
    updates: dict[str, Any] = {}
    if getattr(args, "db", None):
        updates["database_url"] = args.db
    if getattr(args, "model", None):
        updates["model"] = args.model
    if getattr(args, "device", None):
        updates["device"] = args.device
    return settings.model_copy(update=updates) if updates else settings


def _task(name: str) -> Task:
    from shared.tasks import get_task

    try:
        return get_task(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _open_backend(settings: Settings) -> ModelBackend:
    from shared.backends.registry import open_backend

    try:
        return open_backend(settings.model, settings)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise CliError(str(exc)) from None


def _engine_config(
    args: argparse.Namespace, mode: str, seed: int | None, budget: int | None = None
) -> EngineConfig:
    from pydantic import ValidationError

    from shared.engine import EngineConfig
    from shared.episode import EpisodeSettings

    values = collect(args, EpisodeSettings) | {"mode": mode, "seed": seed}
    if budget is not None:  # a budget sweep: the organizer gets B, workers at most B
        values |= {"organizer_budget": budget, "worker_budget": min(values["worker_budget"], budget)}
    try:
        return EngineConfig(**values)
    except ValidationError as exc:
        raise CliError(_validation_message(exc)) from None


def _validation_message(exc: Any) -> str:
    """A pydantic ValidationError as one line per field, named as its option."""
    parts = []
    for err in exc.errors():
        where = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-") if err["loc"] else ""
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _budgets(text: str | None) -> list[int | None]:
    """``--budgets 128,256`` as a list of budgets; ``[None]`` (no sweep) when not given."""
    if not text:
        return [None]
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise CliError(f"--budgets takes comma-separated token counts, got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise CliError(f"--budgets needs positive token counts, got {text!r}")
    return list(budgets)


def _endpoints() -> dict[Any, Any]:
    """The in-process tool endpoints (``@python``, ``@verify``), as the embedded organizer has them."""
    from shared.tools import local_endpoints

    return dict(local_endpoints())


def _problem(args: argparse.Namespace, task: Task) -> Problem:
    payload: dict[str, Any] | None = None
    if args.payload:
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            raise CliError(f"--payload is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise CliError("--payload must be a JSON object")
    elif args.numbers or args.target is not None:
        if not args.numbers or args.target is None:
            raise CliError("countdown needs both --numbers and --target")
        payload = {"numbers": args.numbers, "target": args.target, "n_solutions": 4}
    elif args.puzzle:
        payload = {"puzzle": args.puzzle}
    elif args.problem:
        payload = {"problem": args.problem}
    if payload is None:
        split = "aime24" if task.name == "math" else "test"
        problems = task.problems(split, args.index + 1)
        if args.index >= len(problems):
            raise CliError(f"--index {args.index} is past the end of the {split} split ({len(problems)} problems)")
        return problems[args.index]
    try:
        return task.problem_from_payload(payload)
    except ValueError as exc:
        raise CliError(f"bad {task.name} problem: {exc}") from None


def _open_store(url: str) -> Any:
    from shared.store import db

    try:
        db.check_connection(url)
        db.migrate(url)
    except db.StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    return db.session_factory(db.make_engine(url))


# ----------------------------------------------------------------------------- verbs
def cmd_solve(args: argparse.Namespace) -> int:
    from cli.render import print_episode
    from shared.engine import Engine
    from shared.messages import EpisodeStatus

    settings = _settings(args)
    task = _task(args.task)
    problem = _problem(args, task)
    sessions = _open_store(settings.database_url) if args.db else None
    backend = _open_backend(settings)
    engine = Engine(backend, task, _engine_config(args, args.mode, args.seed), endpoints=_endpoints())

    async def go() -> Any:
        try:
            return await engine.run(problem)
        finally:
            await backend.aclose()

    result = asyncio.run(go())
    if sessions is not None:
        from shared.store import repository

        with sessions() as session:
            repository.save_episode(session, result=result)
    if args.json:
        from cli.render import episode_json

        print(json.dumps(episode_json(result), indent=2))
    else:
        print_episode(result)
    return 0 if result.status is not EpisodeStatus.FAILED else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.render import summary_table
    from shared.engine import Engine
    from shared.evaluation import plot_accuracy_latency, plot_accuracy_latency_curves, run_episodes, summarize
    from shared.store import repository

    if args.n < 1:
        raise CliError(f"-n must be at least 1, got {args.n}")
    if args.concurrency < 1:
        raise CliError(f"--concurrency must be at least 1, got {args.concurrency}")
    modes = args.mode or ["asyncthink"]
    budgets = _budgets(args.budgets)
    settings = _settings(args)
    task = _task(args.task)
    try:
        problems = task.problems(args.split, args.n, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    sessions = _open_store(settings.database_url)
    backend = _open_backend(settings)
    console = Console(stderr=True)
    summaries: dict[str, dict[str, Any]] = {}
    episode_ids: dict[str, list[str]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}

    async def go() -> None:
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, disable=args.json or not console.is_terminal) as bar:
                for budget in budgets:
                    for mode in modes:
                        name = mode if budget is None else f"{mode}@{budget}"
                        config = _engine_config(args, mode, args.seed, budget)
                        engine = Engine(backend, task, config, endpoints=_endpoints())
                        job = bar.add_task(f"{task.name} {name}", total=len(problems))

                        def store(result: Any, job: Any = job) -> None:
                            with sessions() as session:
                                repository.save_episode(session, result=result)
                            bar.advance(job)

                        results = await run_episodes(engine, problems, concurrency=args.concurrency,
                                                     on_result=store)
                        summaries[name] = summarize(task.name, results)
                        episode_ids[name] = [r.episode_id for r in results]
                        if budget is not None:
                            curves.setdefault(mode, []).append(
                                {"organizer_budget": config.organizer_budget,
                                 "worker_budget": config.worker_budget, **summaries[name]})
        finally:
            await backend.aclose()

    asyncio.run(go())
    if args.plot:
        title = f"{task.name} ({backend.model_id})"
        if curves:
            metrics = ("at_least_1", "all_correct") if task.name == "countdown" else ("accuracy",)
            path = plot_accuracy_latency_curves(curves, args.plot, title=title, metrics=metrics)
        else:
            path = plot_accuracy_latency(summaries, args.plot, title=title)
        console.print(f"wrote {path}")
    if args.json:
        print(json.dumps({"task": task.name, "split": args.split, "n": len(problems), "model": backend.model_id,
                          "model_version": backend.weight_version, "modes": summaries,
                          **({"curves": curves} if curves else {}), "episode_ids": episode_ids}, indent=2))
    else:
        out = Console()
        if not out.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
            out = Console(width=140)
        out.print(summary_table(task.name, backend.model_id, summaries))
        print(f"stored {sum(len(v) for v in episode_ids.values())} episodes in {_masked(settings.database_url)}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from cli.render import print_stored_episode
    from shared.store import repository

    settings = _settings(args)
    sessions = _open_store(settings.database_url)
    with sessions() as session:
        episode = repository.get_episode(session, args.episode_id)
        if episode is None:
            raise CliError(f"no episode {args.episode_id!r} in {_masked(settings.database_url)}")
        segments = repository.episode_segments(session, args.episode_id)
        if args.json:
            from shared.store.schemas import EpisodePublic

            data = EpisodePublic.model_validate(episode).model_dump(mode="json")
            data["segments"] = [
                {c: getattr(s, c) for c in ("agent", "role", "fork_id", "parent", "query", "text", "returned",
                                            "generated_tokens", "clock_start", "clock_end", "error")}
                for s in segments
            ]
            print(json.dumps(data, indent=2, default=str))
        else:
            print_stored_episode(episode, segments)
        if args.png:
            from shared.trace import stored_layout
            from shared.trace_plot import plot_trace

            layout = stored_layout(episode.timeline, segments, mode=episode.mode)
            out = plot_trace(layout, args.png, title=f"episode {episode.id} · {episode.task} · {episode.status}")
            print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service == "trainer":
        from cli.trainer import cmd_serve_trainer

        return cmd_serve_trainer(args)
    if args.service == "gateway":
        import uvicorn
        from pydantic import ValidationError

        from services.gateway.app import create_app
        from shared.config import InsecureSettings, settings_error

        try:
            app = create_app(bind_host=args.host)
        except (InsecureSettings, ValidationError) as exc:
            raise CliError(settings_error(exc)) from None
        uvicorn.run(app, host=args.host, port=args.port)
        return 0
    from services.organizer.__main__ import parse_args, run

    if args.organizer_args:  # the older form: every option in one string
        import shlex

        args = parse_args(shlex.split(args.organizer_args))
    run(args)
    return 0


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url

