"""The organizer's liveness file: written while it runs, removed when it stops, judged by its age."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.organizer.__main__ import parse_args
from services.organizer.heartbeat import beat, check, main, run_heartbeat
from tests.helpers import until

ROOT = Path(__file__).resolve().parents[2]


def test_a_fresh_file_is_alive_a_stale_or_missing_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    assert check(path)[0] is False and "does not exist" in check(path)[1]
    beat(path)
    assert check(path, max_age_s=60)[0] is True
    old = time.time() - 120
    os.utime(path, (old, old))
    alive, reason = check(path, max_age_s=60)
    assert alive is False and "120 s old" in reason
    assert main([str(path), "--max-age", "60"]) == 1
    assert main([str(path), "--max-age", "300"]) == 0


async def test_the_heartbeat_keeps_the_file_fresh_and_removes_it_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "hb"
    task = asyncio.create_task(run_heartbeat(path, interval_s=0.05))
    await until(path.exists, "the heartbeat file to be written")
    first = path.read_text()
    await until(lambda: path.read_text() != first, "the heartbeat file to be rewritten")
    assert float(path.read_text()) > float(first)  # a later time, not just another write of the same
    assert check(path, max_age_s=60)[0] is True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not path.exists()
    assert not list(path.parent.iterdir())  # no temporary file left behind


async def test_an_unwritable_file_does_not_stop_the_heartbeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "hb"
    path.mkdir()  # a directory where the file should be: every write fails
    task = asyncio.create_task(run_heartbeat(path, interval_s=0.01))

    def failures() -> int:
        return sum("cannot write the heartbeat file" in r.getMessage() for r in caplog.records)

    await until(lambda: failures() >= 3, "the heartbeat to keep trying after a failed write")
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_bad_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        await run_heartbeat(tmp_path / "hb", interval_s=0)


def test_the_organizer_takes_the_flags() -> None:
    args = parse_args(["--heartbeat-file", "/tmp/x.heartbeat", "--heartbeat-interval", "5"])
    assert args.heartbeat_file == "/tmp/x.heartbeat" and args.heartbeat_interval == 5
    assert parse_args([]).heartbeat_file is None


def test_the_probe_runs_as_a_module_without_heavy_imports(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    beat(path)
    code = (
        "import sys, runpy; sys.argv = ['x', sys.argv[1]]\n"
        "try:\n    runpy.run_module('services.organizer.heartbeat', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    heavy = sorted(m for m in ('torch', 'transformers', 'redis', 'sqlalchemy') if m in sys.modules)\n"
        "    print(e.code, heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr
