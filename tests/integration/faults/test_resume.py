"""An organizer killed with SIGKILL mid-episode: after its restart every episode resumes from its checkpoint.

Issue 13: after an organizer restart every unfinished episode ran again from scratch (and, with the old
self-claiming, some stayed ``running`` for good). Here a real organizer process and a real Celery worker
process run four episodes of the fault soak's scripts (decoded at 60 tokens/s, so each takes seconds);
once every episode has a checkpoint in the store, the organizer is killed with SIGKILL and started again.
Every episode must then complete exactly as scripted, once (one ``finished`` event, one set of
segments), its second run must have resumed from the checkpoint (``resumed_tokens`` on its ``started``
event) instead of decoding the organizer's prefix again, and its workers already joined must not have
been computed again (their done-markers hand back the stored outcomes).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.fault_soak import CAPACITY, METER_ENV, PAYLOAD, RATE_ENV, SIZE_ENV, check_episode, script_for
from bench.stack import (
    ServiceProcess,
    celery_worker,
    organizer,
    service_env,
    wait_organizer_ready,
    wait_worker_ready,
)
from shared.episode import EpisodeSettings
from shared.messages import PROBLEMS_STREAM, SubmitProblem
from shared.store import db, repository
from shared.tasks import get_task

pytestmark = pytest.mark.integration

SIZE = (240, 40)  # organizer ~4-5 s at 60 tokens/s; workers under a second


@pytest.fixture
def stack(tmp_path: Path, faults_redis: str, faults_pg_url: str) -> Iterator[dict[str, Any]]:
    from services.workers.app import make_app

    env = service_env(
        ASYNCTHINK_REDIS_URL=faults_redis, DATABASE_URL=faults_pg_url, ASYNCTHINK_BUS="redis",
        ASYNCTHINK_BACKEND_FACTORY="bench.fault_soak:backend_factory", ASYNCTHINK_WORKER_TIMEOUT_S="30",
        ASYNCTHINK_TASK_LEASE_S="2", **{RATE_ENV: "60", SIZE_ENV: f"{SIZE[0]},{SIZE[1]}", METER_ENV: faults_redis},
    )
    worker = celery_worker(env, tmp_path / "worker.log", concurrency=8, name="resume-worker")
    org = organizer(env, tmp_path / "organizer.log", "--claim-idle-ms", "2000", "--worker-timeout-s", "30",
                    name="resume-organizer")
    engine = db.make_engine(faults_pg_url)
    direct = redis.Redis.from_url(faults_redis)
    try:
        wait_worker_ready(make_app(faults_redis), worker.start())
        org.start()
        wait_organizer_ready(org)
        yield {"worker": worker, "organizer": org, "sessions": db.session_factory(engine), "redis": direct}
    finally:
        org.stop()
        worker.stop()
        engine.dispose()
        direct.close()


def _submit(sessions: Any, client: redis.Redis, n: int) -> list[str]:
    task = get_task("countdown")
    settings = EpisodeSettings(capacity=CAPACITY, worker_budget=200, organizer_budget=2000, worker_timeout_s=30)
    ids = []
    for i in range(n):
        eid = f"resume--{i}--{uuid.uuid4().hex[:8]}"
        sub = SubmitProblem(episode_id=eid, task="countdown", problem_id=eid, payload=PAYLOAD, settings=settings)
        with sessions() as s:
            repository.create_episode(
                s, episode_id=eid, problem=task.problem_from_payload(PAYLOAD, eid), mode="asyncthink",
                capacity=CAPACITY, model_id="scripted-soak", config=sub.stored_config(),
            )
        client.xadd(PROBLEMS_STREAM, {"data": sub.model_dump_json()})
        ids.append(eid)
    return ids


def _checkpointed(sessions: Any, eid: str) -> int:
    """Organizer tokens in the episode's stored checkpoint (0: none yet)."""
    with sessions() as s:
        for seg in repository.episode_segments(s, eid):
            if seg.agent == "organizer" and not seg.wall_end:
                return int(seg.generated_tokens)
    return 0


def _wait(what: str, timeout_s: float, check: Any, *procs: ServiceProcess) -> None:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            logs = "\n".join(f"--- {p.name}\n{p.log_tail(6000)}" for p in procs)
            raise AssertionError(f"{what}: not within {timeout_s:g} s\n{logs}")
        time.sleep(0.1)


def test_a_killed_organizers_episodes_resume_from_their_checkpoints(stack: dict[str, Any]) -> None:
    sessions, client, org = stack["sessions"], stack["redis"], stack["organizer"]
    ids = _submit(sessions, client, 4)
    # every episode past its first fork and, where the script has one, its first join
    _wait("a checkpoint of every episode", 30, lambda: all(_checkpointed(sessions, e) > 60 for e in ids), org)
    at_kill = {e: _checkpointed(sessions, e) for e in ids}
    org.kill9()
    org.start()
    wait_organizer_ready(org)

    def finished() -> bool:
        with sessions() as s:
            return all(repository.is_finished(repository.get_episode(s, e)) for e in ids)

    _wait("every episode finished after the restart", 60, finished, org, stack["worker"])
    with sessions() as s:
        checks = {e: check_episode(s, client, e, *SIZE) for e in ids}
    for eid, c in checks.items():
        assert c.good, f"{eid}: {c.why}"
        assert not c.duplicated, eid
        assert c.reruns == 0, f"{eid} ran again from the start"
        assert len(c.resumed_tokens) == 1 and c.resumed_tokens[0] >= at_kill[eid] > 0, (eid, c.resumed_tokens, at_kill)
        # Decoded twice: only what the organizer decoded after its last checkpoint, never the resumed prefix.
        redone = c.organizer_decoded - c.organizer_kept
        assert 0 <= redone < len(script_for(eid, *SIZE)["organizer"]) - c.resumed_tokens[0], (eid, redone)
        # Workers: each computed once (joined ones come back from their done-markers).
        assert c.worker_decoded == c.worker_kept, eid
