"""Fixtures for the conformance suites: every implementation of an interface, behind one fixture.

The Redis variant is marked ``integration``. When the server at ``ASYNCTHINK_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) cannot be reached the test is skipped with the reason, except in CI
(env ``CI`` set), where an unreachable Redis is a failure: CI must start it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from shared.bus.base import Bus
from shared.bus.inprocess import InProcessBus
from tests.helpers import redis_bus_or_skip

REDIS_URL = (
    os.environ.get("ASYNCTHINK_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
)
MAX_DELIVERIES = 3


@dataclass
class BusUnderTest:
    bus: Bus
    prefix: str  # every stream a test uses starts with this, so tests never share keys

    def stream(self, name: str = "s") -> str:
        return f"{self.prefix}{name}"


@pytest.fixture(
    params=["inprocess", pytest.param("redis", marks=pytest.mark.integration)],
)
async def bus_case(request: pytest.FixtureRequest) -> AsyncIterator[BusUnderTest]:
    prefix = f"asyncthink-test:{uuid.uuid4().hex[:12]}:"
    if request.param == "inprocess":
        yield BusUnderTest(InProcessBus(max_deliveries=MAX_DELIVERIES), prefix)
        return
    bus = await redis_bus_or_skip(REDIS_URL, max_deliveries=MAX_DELIVERIES)
    try:
        yield BusUnderTest(bus, prefix)
    finally:
        await bus.delete_prefix(prefix)
        await bus.close()
