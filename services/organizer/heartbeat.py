"""A liveness file for the organizer, which serves no HTTP port a probe could ask.

``python -m services.organizer --heartbeat-file PATH`` writes the current time to PATH every
``--heartbeat-interval`` seconds from the organizer's own event loop, starting once the service is
connected (database, Redis, model loaded) and consuming, and removes the file when it stops.
``python -m services.organizer.heartbeat PATH [--max-age S]`` is the probe (compose healthcheck,
Kubernetes liveness): exit 0 when PATH was written within S seconds, 1 when it is missing or stale.

What a fresh file proves: the process is up, started completely, and its event loop (where the episodes,
the Redis reads and the joins run; model decoding runs in a thread) is not blocked. What it does not
prove: that Redis or the database answer right now (that is readiness, not liveness: restarting the
organizer would not bring them back), or that a running episode makes progress.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0
DEFAULT_MAX_AGE_S = 60.0


def beat(path: Path) -> None:
    """Write the current time to ``path`` atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{time.time():.3f}\n")
    os.replace(tmp, path)


async def run_heartbeat(path: Path, interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Beat every ``interval_s`` seconds until cancelled, then remove the file: a stopped organizer is
    never reported alive by a file it left behind."""
    if interval_s <= 0:
        raise ValueError(f"heartbeat interval must be positive, got {interval_s}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        while True:
            try:
                beat(path)
            except OSError as e:  # the probe will report the file stale; keep the organizer running
                log.warning("cannot write the heartbeat file %s: %s", path, e)
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since ``path`` was last written, or None when it does not exist."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, (time.time() if now is None else now) - mtime)


def check(path: Path, max_age_s: float = DEFAULT_MAX_AGE_S) -> tuple[bool, str]:
    """(alive, a one-line reason) for the probe."""
    age = age_s(path)
    if age is None:
        return False, f"{path} does not exist (organizer not started, still starting, or stopped)"
    if age > max_age_s:
        return False, f"{path} is {age:.0f} s old (> {max_age_s:g} s): the organizer's event loop is stuck or gone"
    return True, f"{path} written {age:.1f} s ago"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.organizer.heartbeat", description="exit 0 if the organizer's heartbeat is fresh"
    )
    p.add_argument("path", type=Path, help="the file the organizer writes (its --heartbeat-file)")
    p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                   help=f"seconds after which the file counts as stale (default {DEFAULT_MAX_AGE_S:g})")
    args = p.parse_args(argv)
    alive, reason = check(args.path, args.max_age)
    print(reason, file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
