"""The fault soak, small (issue 13): about 50 episodes through the distributed stack while a driver kills
the Celery worker and an organizer with SIGKILL and cuts Redis, at least once each.

Two organizer processes and a Celery worker process on the fault tests' Redis database (behind the soak's
TCP proxy) and a scratch PostgreSQL database; the full-size run is ``python -m bench.fault_soak``
(see its module docstring). Target, asserted: 0 lost, 0 duplicated, 0 stuck, every episode finished
within its timeout after the last fault.
"""

from __future__ import annotations

import pytest

from bench.fault_soak import SoakConfig, format_report, soak
from tests.integration.faults.conftest import FAULTS_PG_URL

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
async def test_small_fault_soak_loses_nothing(faults_redis: str, faults_pg_url: str, tmp_path: object) -> None:
    cfg = SoakConfig(
        episodes=50,
        organizers=2,
        concurrency=24,
        celery_threads=16,
        seed=13,
        fault_gap=(2.0, 4.0),
        cut_s=(5.0, 7.0),
        min_faults=3,  # one of each kind
        max_faults=4,
        episode_timeout_s=60.0,
        redis_url=faults_redis,
        pg_url=FAULTS_PG_URL,
        workdir=tmp_path,  # type: ignore[arg-type]
    )
    report = await soak(cfg)
    text = format_report(report, cfg)
    print(text)
    kinds = {f.kind for f in report.faults}
    assert kinds == {"worker kill -9", "organizer kill -9", "redis cut"}, text
    assert report.submitted == 50
    assert report.ok, text
