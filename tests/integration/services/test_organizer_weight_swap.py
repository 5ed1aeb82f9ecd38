"""A real organizer process (``python -m services.organizer``) follows the trainer's weights stream.

The organizer runs on Redis (``ASYNCTHINK_TRAINER_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/14``,
its own control-stream prefix) with the tiny model and its workers in process, storing into a SQLite
file. ``FleetPublisher`` publishes a version: the organizer loads it, answers with the version it serves,
and the episodes it runs afterwards carry that version on every segment.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.control.publisher import FleetPublisher
from shared.control import LoadWeights
from shared.episode import EpisodeSettings
from shared.messages import PROBLEMS_STREAM, SubmitProblem
from shared.store import db, repository
from shared.tasks import get_task
from shared.weights import content_hash, initial_label
from tests.helpers import redis_bus_or_skip
from tests.integration.services.test_celery_weight_swap import REDIS_URL, _variant

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[3]
SETTINGS = EpisodeSettings(organizer_budget=16, worker_budget=8, temperature=1.0, seed=1)


async def _run_episode(bus: object, factory: object, label: str) -> list[str | None]:
    problem = get_task("countdown").problems("test", 1)[0]
    eid = f"orgswap-{label}-{uuid.uuid4().hex[:12]}"
    message = SubmitProblem(episode_id=eid, task="countdown", problem_id=problem.id, payload=problem.payload,
                            settings=SETTINGS)  # fmt: skip
    await bus.publish(PROBLEMS_STREAM, {"data": message.model_dump_json()})  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with factory() as s:  # type: ignore[operator]
            row = repository.get_episode(s, eid)
            if row is not None and repository.is_finished(row):
                return [seg.model_version for seg in repository.episode_segments(s, eid)]
        await asyncio.sleep(0.2)
    raise AssertionError(f"episode {eid} did not finish")


async def test_an_organizer_process_swaps_on_the_weights_stream(tiny_model_dir: Path, tmp_path: Path) -> None:
    bus = await redis_bus_or_skip(REDIS_URL)
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    url = f"sqlite:///{tmp_path / 'org.db'}"
    db.migrate(url)
    prefix = f"orgswap-{uuid.uuid4().hex[:8]}"
    consumer = f"{prefix}-organizer"
    env = dict(os.environ, ASYNCTHINK_REDIS_URL=REDIS_URL, ASYNCTHINK_BUS="redis", DATABASE_URL=url,
               ASYNCTHINK_MODEL=str(base), ASYNCTHINK_CONTROL_PREFIX=prefix, PYTHONPATH=str(REPO))  # fmt: skip
    env.pop("ASYNCTHINK_BACKEND_FACTORY", None)
    log = tmp_path / "organizer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.organizer", "--local-workers", "--consumer", consumer,
             "--claim-idle-ms", "600000"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    publisher = FleetPublisher(bus=bus, prefix=prefix, timeout_s=60)
    try:
        deadline = time.monotonic() + 90
        while consumer not in await publisher.present_organizers():  # its listener's first heartbeat
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the organizer never sent a heartbeat:\n" + log.read_text()[-3000:]
            await asyncio.sleep(0.3)
        init = initial_label(base)
        assert set(await _run_episode(bus, factory, "before")) == {init}

        v2 = _variant(base, tmp_path / "v2", seed=3)
        report = await publisher.publish(LoadWeights(version="v2", path=str(v2), content_hash=content_hash(v2)))
        assert report.ok, report.summary()
        [reply] = report.replies
        assert (reply.process, reply.kind, reply.version, reply.previous) == (consumer, "organizer", "v2", init)
        assert set(await _run_episode(bus, factory, "after")) == {"v2"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        engine.dispose()
        await bus.close()
