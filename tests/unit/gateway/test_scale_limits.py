"""Issue 19 at the gateway: capacity as an operator setting (up to thousands), backpressure instead of errors.

* ``capacity`` above the operator's ``max_capacity`` is a 422 (400 on the OpenAI routes) and writes nothing;
  ``capacity=1024`` is accepted and an episode with 1,023 workers at once runs to its end;
* past ``max_episodes_in_flight`` (or ``max_queued_episodes``) a submission is a 429 with ``Retry-After``
  and writes nothing, on both APIs;
* ``/metrics`` carries the scaling gauges an autoscaler reads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from services.gateway import submission
from shared.backends.scripted import ScriptedBackend
from shared.bus.base import Backlog
from tests.unit.gateway.conftest import COUNTDOWN, GatewayFactory, settings_for

N = 1023  # workers forked at once: c = 1024


def fan(agent: str, prompt: str) -> str:
    """Fork N workers, join them all, answer (countdown: 25+50 reaches 75)."""
    if agent == "organizer":
        forks = "".join(f"<FORK-{i}>q</FORK-{i}>" for i in range(1, N + 1))
        joins = "".join(f"<JOIN-{i}>" for i in range(1, N + 1))
        return forks + joins + "<ANSWER>25+50</ANSWER>"
    return "<RETURN>25+50</RETURN>"


async def test_capacity_above_the_operator_limit_is_refused(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await make_gateway(settings=settings_for(tmp_path, max_capacity=16))
    r = await gw.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN, "capacity": 17})
    assert r.status_code == 422
    assert "above this gateway's limit of 16" in str(r.json()["detail"])
    r = await gw.client.post(
        "/v1/chat/completions",
        json={"model": "asyncthink-countdown", "messages": [{"role": "user", "content": "numbers: 3 7 25 50 target: 75"}],
              "capacity": 17},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "capacity"
    assert (await gw.client.get("/v1/episodes")).json()["total"] == 0
    # the schema's own bound is shared.episode.MAX_CAPACITY (4096): above it is a 422 from validation
    r = await gw.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN, "capacity": 5000})
    assert r.status_code == 422


async def test_capacity_1024_is_accepted_and_runs(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ScriptedBackend(fan))
    eid = await gw.submit(capacity=1024, organizer_budget=40_000, worker_budget=64)
    episode = await gw.wait(eid, timeout_s=120)
    assert episode["status"] == "completed", episode.get("format_errors")
    assert episode["capacity"] == 1024 and episode["forks"] == N
    assert len(episode["segments"]) == N + 1
    assert all(s["returned"] == "25+50" for s in episode["segments"] if s["agent"] != "organizer")


def slow(agent: str, prompt: str) -> str:
    return "thinking " * 200 + "<ANSWER>25+50</ANSWER>"


async def test_past_the_in_flight_bound_a_submission_is_429_with_retry_after(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, max_episodes_in_flight=2, retry_after_s=3)
    gw = await make_gateway(ScriptedBackend(slow, tokens_per_s=50), settings=settings)
    first = [await gw.submit(mode="sequential") for _ in range(2)]
    await asyncio.sleep(submission.BACKLOG_CHECK_S + 0.1)  # the depth is read at most this often
    r = await gw.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert "2 episodes are in flight (limit 2)" in r.json()["detail"]
    r = await gw.client.post(
        "/v1/chat/completions",
        json={"model": "asyncthink", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"
    listing = (await gw.client.get("/v1/episodes")).json()
    assert sorted(i["id"] for i in listing["items"]) == sorted(first)  # the refused ones wrote nothing
    text = (await gw.client.get("/metrics")).text
    assert 'asyncthink_gateway_backpressure_total{reason="in_flight"} 2.0' in text
    assert "asyncthink_episodes_in_flight 2.0" in text and "asyncthink_problems_queued" in text


async def test_past_the_queue_bound_a_submission_is_429(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await make_gateway(settings=settings_for(tmp_path, max_queued_episodes=5))
    state: Any = gw.app.state.gateway

    async def deep(stream: str, group: str) -> Backlog:
        return Backlog(lag=5, pending=3)  # five waiting for an organizer

    state.bus.backlog = deep
    state.backlog_checked = None
    r = await gw.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert "5 episodes are waiting for an organizer (limit 5)" in r.json()["detail"]
    assert (await gw.client.get("/v1/episodes")).json()["total"] == 0
