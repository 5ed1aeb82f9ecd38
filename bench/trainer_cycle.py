"""A trainer cycle on the CPU with the shipped small model: episodes consumed per second, minutes per cycle.

Usage::

    PYTHONPATH=. python -m bench.trainer_cycle [--methods sft,grpo] [--episodes 64] [--eval-problems 16] \\
        [--problems-per-cycle 4] [--group-size 4] [--device cpu]

The embedded setup, as ``asyncthink serve trainer`` runs it: an in-process bus, a SQLite store, the real
organizer service on the small model (in-process transformers backend, workers in process) and the
trainer service publishing to that same backend.

* ``sft``: first ``--episodes`` countdown training problems are submitted through the problems stream
  (temperature 0.7, as users' traffic) and stored; that is the serving fleet's work and is timed apart.
  Then one cycle: read and filter them (accuracy >= 0.25, no format errors), train, gate on
  ``--eval-problems`` held-out problems against the serving version, publish, check after the swap.
* ``grpo``: one cycle that submits ``--problems-per-cycle`` x ``--group-size`` episodes itself (temperature
  1), waits for them, and trains on their group advantages; its data phase is the rollouts.

Printed per method: episodes used, the seconds of each phase, episodes consumed per second (episodes
trained on / (data + train seconds) for SFT; / train seconds too, separately), the cycle's minutes and
its outcome. The machine's load average is printed beside (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "asyncthink-countdown-small"


async def one(method: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from services.organizer.service import OrganizerService
    from services.workers.tools import local_endpoints
    from shared.backends.transformers_backend import TransformersBackend
    from shared.bus.inprocess import InProcessBus
    from shared.episode import EpisodeSettings
    from shared.store import db
    from shared.tasks import get_task
    from trainer.service import LocalPublisher, TrainerMetrics, TrainerService, TrainerServiceConfig

    home = tmp / method
    base = home / "base"
    shutil.copytree(args.model, base)
    url = f"sqlite:///{home / 'store.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    bus = InProcessBus()
    backend = TransformersBackend(base, device=args.device)
    organizer = OrganizerService(bus, factory, backend, endpoints=local_endpoints(), consumer_name="bench",
                                 read_block_ms=50, claim_idle_ms=3_600_000)  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(organizer.run_forever(stop))
    config = TrainerServiceConfig(
        method=method, base_model=base, out=home / "out", min_episodes=1, max_episodes=args.episodes,
        eval_problems=args.eval_problems, post_swap_problems=args.post_swap_problems, device=args.device,
        problems_per_cycle=args.problems_per_cycle, group_size=args.group_size, pool_size=args.problems_per_cycle,
        metrics_port=0, lr=args.lr, episode=EpisodeSettings(temperature=1.0), gate_tolerance=1.0,
    )  # fmt: skip
    trainer = TrainerService(config, bus=bus, session_factory=factory, publisher=LocalPublisher([backend]),
                             metrics=TrainerMetrics())  # fmt: skip
    out: dict[str, Any] = {"method": method}
    try:
        await trainer.start()
        if method == "sft":
            problems = await asyncio.to_thread(get_task("countdown").problems, "train", args.episodes, 1)
            t0 = time.monotonic()
            settings = EpisodeSettings(temperature=0.7)
            ids = await trainer.submit([(p, settings.model_copy(update={"seed": k})) for k, p in enumerate(problems)],
                                       purpose="traffic")  # fmt: skip
            got = await trainer.wait_finished(ids, 3600)
            out["serving_s"] = time.monotonic() - t0
            out["stored"] = len(got)
        report = await trainer.run_cycle()
        out["report"] = report
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await backend.aclose()
        engine.dispose()
    return out


def show(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\ntrainer cycle: model {Path(args.model).name}, device {args.device}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at the end\n")  # fmt: skip
    head = (f"{'method':<6} {'episodes':>8} {'data s':>8} {'train s':>8} {'gate s':>8} {'publish s':>9} {'check s':>8} "
            f"{'cycle min':>9} {'ep/s (data+train)':>17} {'ep/s (train)':>12} {'tokens':>8}  outcome")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in results:
        rep = r["report"]
        ph = rep.get("phases", {})
        window = rep.get("data_window") or {}
        used = int(window.get("used") or 0)
        data_s, train_s = ph.get("data", 0.0), ph.get("train", 0.0)
        tokens = int((rep.get("train") or {}).get("generated_tokens") or 0)
        print(
            f"{r['method']:<6} {used:>8} {data_s:>8.1f} {train_s:>8.1f} {ph.get('gate', 0):>8.1f} "
            f"{ph.get('publish', 0):>9.2f} {ph.get('check', 0):>8.1f} {rep.get('seconds', 0) / 60:>9.2f} "
            f"{used / max(data_s + train_s, 1e-9):>17.2f} {used / max(train_s, 1e-9):>12.2f} "
            f"{tokens:>8}  {rep.get('outcome')}"
        )
    for r in results:
        rep = r["report"]
        gate = rep.get("gate") or {}
        extra = f"serving fleet: {r['stored']} episodes stored in {r['serving_s']:.1f}s" if "stored" in r else ""
        skipped = (rep.get("data_window") or {}).get("skipped")
        if r["method"] == "grpo":
            tokens = int((rep.get("train") or {}).get("generated_tokens") or 0)
            extra = f"rollouts through the serving path: {tokens / max(rep['phases'].get('data', 0), 1e-9):.0f} tokens/s"
        print(f"  {r['method']}: {extra}{'; ' if extra else ''}skipped {skipped}; gate {gate.get('metric')} "
              f"candidate {(gate.get('candidate') or {}).get('accuracy')} vs serving "
              f"{(gate.get('serving') or {}).get('accuracy')}; {rep.get('publish', '')}")  # fmt: skip


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="trainerbench-"))
    results = []
    try:
        for method in args.methods.split(","):
            print(f"running {method} ...", file=sys.stderr, flush=True)
            results.append(await one(method, args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    show(results, args)


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="sft,grpo")
    p.add_argument("--episodes", type=int, default=64, help="sft: stored episodes before the cycle (default 64)")
    p.add_argument("--eval-problems", type=int, default=16)
    p.add_argument("--post-swap-problems", type=int, default=4)
    p.add_argument("--problems-per-cycle", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="cpu")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
