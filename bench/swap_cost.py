"""Swap cost with episodes in flight: how long each backend holds generation to take new weights, and
whether any episode fails because of it.

Usage::

    PYTHONPATH=. python -m bench.swap_cost [--backends transformers,slot,sglang,celery] [--swaps 20] \\
        [--concurrency 8] [--interval-s 1.0] [--model models/asyncthink-countdown-small]

For each backend, ``--concurrency`` countdown episodes run back to back through the core engine (so that
many are always in flight, organizer and workers decoding) while the weights are swapped ``--swaps``
times, every ``--interval-s`` seconds, alternating between the model and a copy with slightly perturbed
weights (so every swap really copies new tensors and every episode still behaves). Then the episodes
still running finish.

* ``transformers``: the in-process transformers backend (``update_weights(path=...)``; the checkpoint is
  read in a thread, then copied between two forward passes);
* ``slot``: the trainer's slot-engine backend on the same model (copied between two engine steps);
* ``sglang-<mode>``: the SGLang client against the contract fixture (``tests/fakes/sglang.py``) with
  in-flight requests (a token every ``--sglang-token-ms``): pause (``retract``, ``in_place``, ``abort``) ->
  update_weights_from_disk -> continue on two replicas. The fixture loads nothing, so this is the
  protocol's own cost (three HTTP calls, requests parked and resumed); a real server adds its load time;
* ``celery``: a real Celery worker process (``--redis-url``, default db 14, never flushed) on the model,
  worker tasks kept in flight, swapped by the trainer's broadcast (``FleetPublisher``).

Printed per backend: the pause (generation held: measured by the backend itself around the copy; for
SGLang from the pause request to the continue answer, per replica) at p50 / p99 / max in ms; the whole
swap call (for in-process backends: reading the checkpoint, waiting for the step to end, copying; for
Celery: the broadcast round trip); episodes (or worker tasks) finished, how many ran across a swap
(a segment labelled with two versions), how many failed (target 0) and how many workers ended with an
error. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "asyncthink-countdown-small"
BENIGN = {"cancelled"}


@dataclass
class Row:
    backend: str
    pauses: list[float] = field(default_factory=list)  # seconds generation was held, per swap (per replica)
    calls: list[float] = field(default_factory=list)  # seconds per swap call
    in_flight: list[int] = field(default_factory=list)  # episodes running when each swap began
    episodes: int = 0
    spanned: int = 0  # episodes with a segment labelled by two versions
    failed: int = 0
    worker_errors: int = 0
    format_errors: int = 0
    wall_s: float = 0.0
    note: str = ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def perturbed_copy(src: Path, dst: Path, scale: float = 1e-4) -> Path:
    """``src`` with every weight nudged by relative noise: a different checkpoint that behaves the same."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + scale * torch.randn_like(p))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
    return dst


def count_results(row: Row, results: list[Any]) -> None:
    from shared.messages import EpisodeStatus
    from shared.protocol import ErrorKind

    format_kinds = {k.value for k in ErrorKind}
    for r in results:
        row.episodes += 1
        row.failed += r.status is EpisodeStatus.FAILED
        row.format_errors += r.status is EpisodeStatus.FORMAT_ERROR
        row.spanned += any("+" in (s.model_version or "") for s in r.segments)
        row.worker_errors += any(
            s.role == "worker" and s.error and s.error not in BENIGN and s.error not in format_kinds for s in r.segments
        )


async def drive(
    backend: Any, row: Row, swap: Any, *, swaps: int, interval_s: float, concurrency: int, settings: Any
) -> None:
    """Keep ``concurrency`` episodes in flight on ``backend`` while ``swap(k)`` runs ``swaps`` times."""
    from shared.engine import Engine, EngineConfig
    from shared.tasks import get_task

    task = get_task("countdown")
    problems = task.problems("test", 400)
    results: list[Any] = []
    running = 0
    stop = asyncio.Event()

    async def lane(k: int) -> None:
        nonlocal running
        n = 0
        while not stop.is_set():
            problem = problems[(k * 37 + n) % len(problems)]
            config = EngineConfig.of(settings.model_copy(update={"seed": k * 1000 + n}))
            running += 1
            try:
                results.append(await Engine(backend, task, config).run(problem, episode_id=f"b{k}-{n}"))
            finally:
                running -= 1
            n += 1

    t0 = time.monotonic()
    lanes = [asyncio.create_task(lane(k)) for k in range(concurrency)]
    await asyncio.sleep(interval_s)
    for k in range(swaps):
        row.in_flight.append(running)
        t = time.perf_counter()
        pause = await swap(k)
        row.calls.append(time.perf_counter() - t)
        row.pauses += pause
        await asyncio.sleep(interval_s)
    stop.set()
    await asyncio.gather(*lanes)
    row.wall_s = time.monotonic() - t0
    count_results(row, results)


async def run_local(name: str, backend: Any, paths: list[Path], args: argparse.Namespace, settings: Any) -> Row:
    from shared.backends.base import WeightUpdate

    row = Row(name)

    async def swap(k: int) -> list[float]:
        await backend.update_weights(WeightUpdate(f"w{k + 1}", path=str(paths[(k + 1) % 2])))
        return [float(backend.last_swap_pause_s)]

    try:
        await drive(backend, row, swap, swaps=args.swaps, interval_s=args.interval_s, concurrency=args.concurrency,
                    settings=settings)  # fmt: skip
    finally:
        await backend.aclose()
    return row


async def run_sglang(mode: str, args: argparse.Namespace, tmp: Path) -> Row:
    import httpx
    from transformers import AutoTokenizer

    from shared.backends.sglang import SGLangBackend
    from shared.episode import EpisodeSettings
    from shared.tasks.prompts import PromptStyle
    from tests.fakes.sglang import FakeSGLang
    from tests.fakes.tokenizer import build_tokenizer_dir

    tok_dir = tmp / "sglang-tok"
    if not tok_dir.exists():
        build_tokenizer_dir(tok_dir)
    fake = FakeSGLang(AutoTokenizer.from_pretrained(str(tok_dir)), ["r1", "r2"])
    organizer = "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think.<JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>"
    worker = "Worker thinks about 3+4 and returns.<RETURN>7</RETURN>"
    for rep in fake.replicas.values():
        rep.resume = True
        rep.token_delay_s = args.sglang_token_ms / 1000
        rep.script_for = lambda prompt: worker if "Find 3+4" in prompt and "Countdown" not in prompt else organizer
    backend = SGLangBackend(["http://r1:30000", "http://r2:30000"], tok_dir, timeout_s=60,
                            transport=httpx.ASGITransport(app=fake.app), prompt_style=PromptStyle.TRAINED)  # fmt: skip
    row = Row(f"sglang-{mode}", note="contract fixture: protocol cost only, no weight load")

    async def swap(k: int) -> list[float]:
        paused = await backend.hot_swap(f"/ckpt/w{k + 1}", weight_version=f"w{k + 1}", pause_mode=mode,  # type: ignore[arg-type]
                                        flush_timeout_s=0)  # fmt: skip
        return list(paused.values())

    try:
        await drive(backend, row, swap, swaps=args.swaps, interval_s=args.interval_s, concurrency=args.concurrency,
                    settings=EpisodeSettings(organizer_budget=256, worker_budget=128))  # fmt: skip
    finally:
        await backend.aclose()
    return row


async def run_celery(args: argparse.Namespace, model: Path, paths: list[Path], tmp: Path) -> Row:
    from services.control.publisher import FleetPublisher
    from services.workers.app import make_app
    from shared.bus.redis_streams import RedisStreamsBus
    from shared.control import LoadWeights
    from shared.messages import WorkerOutcome, WorkerTask, results_stream

    row = Row("celery", note="1 worker process, --pool=threads -c 4; pause measured in the worker")
    name = f"swapbench-{uuid.uuid4().hex[:8]}@localhost"
    env = dict(os.environ, ASYNCTHINK_REDIS_URL=args.redis_url, ASYNCTHINK_MODEL=str(model), ASYNCTHINK_BUS="redis",
               ASYNCTHINK_CONTROL_PREFIX=name, PYTHONPATH=str(REPO))  # fmt: skip
    env.pop("ASYNCTHINK_BACKEND_FACTORY", None)
    celery = str(Path(sys.executable).with_name("celery"))
    log = (tmp / "celery.log").open("wb")
    proc = subprocess.Popen([celery, "-A", "services.workers.app", "worker", "-Q", "model", "--pool=threads", "-c",
                             "4", "-n", name, "--without-gossip", "--without-mingle", "--without-heartbeat"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    app = make_app(args.redis_url)
    bus = RedisStreamsBus(args.redis_url)
    try:
        deadline = time.monotonic() + 180
        while not app.control.broadcast("asyncthink_weights", destination=[name], reply=True, timeout=1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start; see {tmp / 'celery.log'}")
        publisher = FleetPublisher(bus=bus, celery_app=app, prefix=name, timeout_s=120)
        outcomes: list[WorkerOutcome] = []
        stop = asyncio.Event()
        running = 0

        async def lane(k: int) -> None:
            nonlocal running
            n = 0
            while not stop.is_set():
                eid = f"swapbench-{uuid.uuid4().hex}"
                task = WorkerTask(episode_id=eid, agent="1", fork_id=1, parent="organizer", query="75 - 25 = 50",
                                  task="countdown", budget=256, temperature=0.0, worker_timeout_s=120)  # fmt: skip
                running += 1
                app.send_task("asyncthink.run_worker", args=[task.model_dump_json()], queue="model")
                try:
                    while True:
                        entries = await bus.read(results_stream(eid), after="0", block_ms=1000)
                        if entries:
                            outcomes.append(WorkerOutcome.model_validate_json(entries[0].fields["data"]))
                            break
                finally:
                    running -= 1
                n += 1

        t0 = time.monotonic()
        lanes = [asyncio.create_task(lane(k)) for k in range(args.concurrency)]
        await asyncio.sleep(args.interval_s)
        for k in range(args.swaps):
            row.in_flight.append(running)
            t = time.perf_counter()
            report = await publisher.publish(LoadWeights(version=f"w{k + 1}", path=str(paths[(k + 1) % 2])))
            row.calls.append(time.perf_counter() - t)
            row.pauses += [r.seconds for r in report.replies if r.kind == "celery"]
            if not report.ok:
                row.note += f"; swap {k + 1}: {report.summary()}"
            await asyncio.sleep(args.interval_s)
        stop.set()
        await asyncio.gather(*lanes)
        row.wall_s = time.monotonic() - t0
        for o in outcomes:
            row.episodes += 1
            row.failed += o.error is not None
            row.spanned += any("+" in (s.model_version or "") for s in o.segments)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        await bus.close()
        log.close()
    return row


def print_rows(rows: list[Row]) -> None:
    head = (f"{'backend':<18} {'swaps':>5} {'pause p50':>10} {'p99':>8} {'max':>8} {'call p50':>9} {'call p99':>9} "
            f"{'in flight':>9} {'episodes':>8} {'across':>6} {'failed':>6} {'wk err':>6} {'FE':>4}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = [x * 1000 for x in r.pauses]
        calls = [x * 1000 for x in r.calls]
        inflight = statistics.mean(r.in_flight) if r.in_flight else 0.0
        print(
            f"{r.backend:<18} {len(r.calls):>5} {pct(ms, 50):>9.2f}m {pct(ms, 99):>7.2f}m {max(ms or [0]):>7.2f}m "
            f"{pct(calls, 50):>8.1f}m {pct(calls, 99):>8.1f}m {inflight:>9.1f} {r.episodes:>8} {r.spanned:>6} "
            f"{r.failed:>6} {r.worker_errors:>6} {r.format_errors:>4}"
        )
    print("\nms: pause = generation held by the swap (p50/p99/max over swaps, per replica for SGLang); call = the "
          "whole swap call; in flight = episodes (Celery: worker tasks) running when a swap began (mean); across = "
          "episodes with a segment generated by two versions; failed = episodes failed (target 0); wk err = "
          "episodes with a worker that ended in an error; FE = format errors (the model's, not the swap's)")
    for r in rows:
        if r.note:
            print(f"  {r.backend}: {r.note.strip('; ')}; wall {r.wall_s:.1f}s")


async def main_async(args: argparse.Namespace) -> None:
    from shared.episode import EpisodeSettings

    model = Path(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="swapbench-"))
    rows: list[Row] = []
    try:
        paths = [tmp / "a", perturbed_copy(model, tmp / "b")]
        shutil.copytree(model, paths[0])
        settings = EpisodeSettings(organizer_budget=args.organizer_budget, worker_budget=args.worker_budget,
                                   temperature=0.7)  # fmt: skip
        for name in args.backends.split(","):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name == "transformers":
                from shared.backends.transformers_backend import TransformersBackend

                rows.append(await run_local(name, TransformersBackend(paths[0], version="w0"), paths, args, settings))
            elif name == "slot":
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig

                hf = AutoModelForCausalLM.from_pretrained(str(paths[0]), dtype=torch.float32).eval()
                tok = AutoTokenizer.from_pretrained(str(paths[0]))
                engine = SlotEngine(hf, tok, SlotEngineConfig(max_slots=4 * args.concurrency, max_len=2048),
                                    device=args.device)  # fmt: skip
                backend = SlotEngineBackend(engine, tok, model_id="small", weight_version="w0")
                with torch.no_grad():
                    rows.append(await run_local(name, backend, paths, args, settings))
            elif name.startswith("sglang"):
                for mode in ("retract", "in_place", "abort"):
                    rows.append(await run_sglang(mode, args, tmp))
            elif name == "celery":
                rows.append(await run_celery(args, paths[0], paths, tmp))
            else:
                raise SystemExit(f"unknown backend {name!r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nswap cost: {args.swaps} swaps every {args.interval_s:g}s, {args.concurrency} episodes kept in flight, "
          f"model {model.name}, organizer/worker budget {args.organizer_budget}/{args.worker_budget}, "
          f"{os.cpu_count()} CPUs\n")  # fmt: skip
    print_rows(rows)


def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)  # resent calls after an abort pause are expected here
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="transformers,slot,sglang", help="comma-separated: transformers, slot, "
                   "sglang, celery (default: transformers,slot,sglang)")  # fmt: skip
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between swaps (default 1)")
    p.add_argument("--concurrency", type=int, default=8, help="episodes kept in flight (default 8)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="cpu")
    p.add_argument("--organizer-budget", type=int, default=512)
    p.add_argument("--worker-budget", type=int, default=256)
    p.add_argument("--sglang-token-ms", type=float, default=2.0, help="fixture: ms per generated token")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="celery: a Redis db (never flushed)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
