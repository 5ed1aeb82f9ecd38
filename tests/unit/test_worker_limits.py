"""The Celery worker's time bounds derive from the worker timeout (issue 13: no limit, a 1 h visibility)."""

from __future__ import annotations

from services.workers.app import REDIS_RETRY_S, make_app, task_limits
from shared.config import Settings


def test_limits_derive_from_the_worker_timeout() -> None:
    default = task_limits(Settings())
    assert default.worker_timeout_s == 300.0
    assert default.lease_s == 30.0  # a tenth of it, at most 30 s
    assert default.soft_s == 305.0 and default.hard_s == 300.0 + REDIS_RETRY_S + 30.0
    assert task_limits(Settings(worker_timeout_s=20)).lease_s == 5.0  # at least 5 s
    assert task_limits(Settings(worker_timeout_s=120)).lease_s == 12.0
    assert task_limits(Settings(worker_timeout_s=120, task_lease_s=2)).lease_s == 2.0


def test_the_app_uses_them() -> None:
    settings = Settings(worker_timeout_s=60, redis_url="redis://127.0.0.1:1/0")
    conf = make_app(settings=settings).conf
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == 6.0  # not an hour
    assert options["unacked_restore_interval"] == 3 and options["unacked_restore_throttle"] == 1
    assert conf.task_soft_time_limit == 65.0 and conf.task_time_limit == 60.0 + REDIS_RETRY_S + 30.0
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    from services.workers.tasks import run_worker

    assert run_worker.acks_late and run_worker.Request == "services.workers.leases:LeasedRequest"
