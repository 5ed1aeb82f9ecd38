"""Celery model workers take a published version by broadcast, report it, and say when they cannot.

A real Celery worker process (as ``tests/scenarios/conftest.py`` starts one) on the tiny model, on its own
Redis database (``ASYNCTHINK_TRAINER_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/14``; never
flushed: every test uses its own control-stream prefix and episode ids):

* ``FleetPublisher`` broadcasts ``asyncthink_load_weights``; the worker loads the checkpoint, replies with
  the version it serves, and ``asyncthink_weights`` reports it; a worker task run afterwards records the
  new version on its segment;
* a task in flight during a swap finishes without an error, its segment labelled by the versions that
  produced its tokens;
* a checkpoint whose content hash does not match is refused: the worker keeps serving the old version and
  its reply says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.control.publisher import FleetPublisher, fleet_versions
from shared.backends.base import split_version_label
from shared.control import LoadWeights
from shared.messages import WorkerOutcome, WorkerTask, results_stream
from shared.weights import content_hash, initial_label
from tests.helpers import redis_bus_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REDIS_URL = os.environ.get("ASYNCTHINK_TRAINER_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
REPO = Path(__file__).resolve().parents[3]


def _variant(src: Path, dst: Path, seed: int) -> Path:
    """A copy of ``src`` with different (random) weights: another checkpoint of the same architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Path]]:
    import redis

    from services.workers.app import make_app

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Redis at {REDIS_URL} is unreachable: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} unreachable: {exc}")
    root = tmp_path_factory.mktemp("fleet")
    base = root / "base"
    shutil.copytree(tiny_model_dir, base)
    name = f"swaptest-{uuid.uuid4().hex[:8]}@localhost"
    env = dict(os.environ, ASYNCTHINK_REDIS_URL=REDIS_URL, ASYNCTHINK_MODEL=str(base), ASYNCTHINK_BUS="redis",
               ASYNCTHINK_CONTROL_PREFIX=name, PYTHONPATH=str(REPO))  # fmt: skip
    env.pop("ASYNCTHINK_BACKEND_FACTORY", None)
    log = root / "worker.log"
    celery = str(Path(sys.executable).with_name("celery"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [celery, "-A", "services.workers.app", "worker", "-Q", "model", "--pool=threads", "-c", "2", "-n", name,
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    app = make_app(REDIS_URL)
    try:
        deadline = time.monotonic() + 120
        while True:  # ready once the model is loaded and it answers the version command
            if proc.poll() is not None:
                pytest.fail(f"celery worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            answers = app.control.broadcast("asyncthink_weights", destination=[name], reply=True, timeout=1.0)
            if answers:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"celery worker did not answer in 120 s:\n{log.read_text()[-3000:]}")
        yield app, name, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _outcome(bus: Any, app: Any, *, budget: int, episode_id: str) -> WorkerOutcome:
    task = WorkerTask(episode_id=episode_id, agent="1", fork_id=1, parent="organizer", query="3+4",
                      task="countdown", budget=budget, temperature=0.0, worker_timeout_s=60)  # fmt: skip
    app.send_task("asyncthink.run_worker", args=[task.model_dump_json()], queue="model")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entries = await bus.read(results_stream(episode_id), after="0", block_ms=500)
        outcomes = [e for e in entries if "data" in e.fields]  # a worker's "started" notice comes first
        if outcomes:
            return WorkerOutcome.model_validate_json(outcomes[0].fields["data"])
    raise AssertionError(f"no outcome for {episode_id}")


async def test_celery_workers_swap_on_a_broadcast_and_report_their_version(
    worker: tuple[Any, str, Path], tmp_path: Path
) -> None:
    app, name, base = worker
    bus = await redis_bus_or_skip(REDIS_URL)
    prefix = name  # the worker's ASYNCTHINK_CONTROL_PREFIX
    try:
        assert fleet_versions(app)[name]["version"] == initial_label(base)
        v2 = _variant(base, tmp_path / "v2", seed=1)
        publisher = FleetPublisher(bus=bus, celery_app=app, prefix=prefix, timeout_s=60)
        report = await publisher.publish(LoadWeights(version="v2", path=str(v2), content_hash=content_hash(v2)))
        assert report.ok, report.summary()
        [reply] = [r for r in report.replies if r.process == name]
        assert reply.kind == "celery" and reply.version == "v2" and reply.previous == initial_label(base)
        assert reply.seconds > 0
        assert fleet_versions(app)[name]["version"] == "v2"
        done = await _outcome(bus, app, budget=8, episode_id=f"swaptest-{uuid.uuid4().hex}")
        assert done.error is None and done.segments[0].model_version == "v2"

        # a task in flight while the worker swaps: it finishes, labelled by the versions of its tokens
        v3 = _variant(base, tmp_path / "v3", seed=2)
        episode = f"swaptest-{uuid.uuid4().hex}"
        import asyncio

        running = asyncio.create_task(_outcome(bus, app, budget=600, episode_id=episode))
        await asyncio.sleep(0.5)
        report = await publisher.publish(LoadWeights(version="v3", path=str(v3), content_hash=content_hash(v3)))
        assert report.ok, report.summary()
        outcome = await running
        assert outcome.error is None
        assert set(split_version_label(outcome.segments[0].model_version)) <= {"v2", "v3"}

        # a checkpoint that is not what it claims: refused, the worker keeps v3 and says so
        bad = LoadWeights(version="v4", path=str(v2), content_hash="0" * 64)
        report = await publisher.publish(bad)
        assert not report.ok
        [reply] = [r for r in report.replies if r.process == name]
        assert not reply.ok and reply.version == "v3" and "does not hold version v4" in (reply.error or "")
        assert fleet_versions(app)[name]["version"] == "v3"
    finally:
        await bus.close()
