"""``asyncthink up`` end to end: the real gateway, organizer and Celery worker processes on the local Redis
and PostgreSQL, a REST submission answered, and Ctrl-C stopping every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REDIS_HINT
from tests.missing import missing
from tests.unit.gateway.conftest import free_port

pytestmark = pytest.mark.integration

REDIS_DB_URL = "redis://127.0.0.1:6379/13"  # a database of its own: its streams and Celery queues


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_runs_the_stack_answers_and_stops_on_ctrl_c(
    tiny_model_dir: Path, postgres_url: str, tmp_path: Path
) -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_DB_URL, socket_connect_timeout=2).flushdb()
    except redis.RedisError as exc:
        missing(f"Redis is unreachable: {exc}", REDIS_HINT)
    port = free_port()
    db = postgres_url.rsplit("/", 1)[0] + f"/asyncthink_up_{uuid.uuid4().hex[:8]}"  # up creates it
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port), "--db", db, "--redis", REDIS_DB_URL,
         "--model", str(tiny_model_dir), "--concurrency", "2", "--ready-timeout", "180"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("up | ready in"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(200), "\n".join(lines[-40:])
        base = f"http://127.0.0.1:{port}"
        accepted = _post(f"{base}/v1/problems", {"task": "countdown", "payload": {"numbers": [3, 7, 25, 50],
                         "target": 75}, "organizer_budget": 48, "worker_budget": 24})
        episode_id = accepted["episode_id"]
        deadline = time.monotonic() + 300  # generous: CI's 2 cores may be busy with other tests
        episode = _get(f"{base}/v1/episodes/{episode_id}")
        while episode["status"] in ("pending", "running"):
            assert time.monotonic() < deadline, (episode, "\n".join(lines[-40:]))
            time.sleep(0.5)
            episode = _get(f"{base}/v1/episodes/{episode_id}")
        assert episode["status"] in ("completed", "format_error")  # the stack ran it end to end
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(60)
        reader.join(10)
    assert code == 0, "\n".join(lines[-40:])
    names = {line.split("|", 1)[0].strip() for line in lines if "|" in line}
    assert {"gateway", "organizer-1", "worker-1", "up"} <= names
    text = "\n".join(lines)
    # readiness waited for the worker's model and the organizer's stream
    assert text.index("asyncthink worker ready") < text.index("up | ready in")
    assert text.index("consuming asyncthink:problems") < text.index("up | ready in")
    pids = [int(line.split("(pid ")[1].split(")")[0]) for line in lines if line.startswith("up | started ")]
    assert len(pids) == 3
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a process outlived Ctrl-C"


@pytest.fixture(autouse=True)
def _drop_created_databases(postgres_url: str) -> Iterator[None]:
    """Drop the databases ``up`` created for the test."""
    yield
    from sqlalchemy import create_engine, text

    from tests.integration.conftest import POSTGRES_ADMIN_URL

    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            names = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'asyncthink_up_%'"))
            for (name,) in list(names):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
