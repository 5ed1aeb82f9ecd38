"""GET /v1/episodes/{id}/events: Server-Sent Events, live, replayed, resumed with Last-Event-ID."""

from __future__ import annotations

import json
from typing import Any

import httpx

from services.gateway.sse import sse_comment, sse_event
from shared.backends.scripted import ScriptedBackend
from tests.unit.gateway.conftest import ANSWER_TEXT, Gateway, GatewayFactory, script


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Events as dicts with ``id``, ``event`` and ``data`` (parsed JSON); comments are dropped."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        data: list[str] = []
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(": ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
        if data:
            fields["data"] = json.loads("\n".join(data))
            events.append(fields)
    return events


def order_of(kinds: list[str], *wanted: str) -> list[int]:
    return [kinds.index(k) for k in wanted]


def test_sse_framing() -> None:
    assert sse_event('{"a": 1}', event="fork", id="1-0") == b'id: 1-0\nevent: fork\ndata: {"a": 1}\n\n'
    assert sse_event("a\nb") == b"data: a\ndata: b\n\n"
    assert sse_comment("heartbeat") == b": heartbeat\n\n"


async def test_live_stream_yields_fork_join_answer_finished_in_order(make_gateway: GatewayFactory) -> None:
    # 200 tokens/s: the episode takes ~0.4 s, so the client connects while it runs.
    gw = await make_gateway(ScriptedBackend(script, tokens_per_s=200))
    eid = await gw.submit()
    r = await gw.client.get(f"/v1/episodes/{eid}/events")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished"
    started, fork, join, result, answer, finished = order_of(
        kinds, "started", "fork", "join", "worker_result", "answer", "finished"
    )
    assert started < fork < join < result < answer < finished
    for e in events:
        assert e["data"]["kind"] == e["event"] and e["data"]["episode_id"] == eid
        assert e["id"]  # the stream entry id
    assert events[fork]["data"]["data"]["query"] == "25 50"
    assert events[result]["data"]["data"]["returned"] == "25+50"
    assert events[answer]["data"]["data"]["text"] == ANSWER_TEXT
    assert events[-1]["data"]["data"]["status"] == "completed"
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))


async def test_finished_episode_replays_then_resumes_then_204(gateway: Gateway) -> None:
    eid = await gateway.submit()
    await gateway.wait(eid)
    replay = parse_sse((await gateway.client.get(f"/v1/episodes/{eid}/events")).text)
    kinds = [e["event"] for e in replay]
    assert kinds[0] == "started" and kinds[-1] == "finished"

    answer_at = kinds.index("answer")
    resumed = await gateway.client.get(
        f"/v1/episodes/{eid}/events", headers={"Last-Event-ID": replay[answer_at]["id"]}
    )
    assert [e["id"] for e in parse_sse(resumed.text)] == [e["id"] for e in replay[answer_at + 1 :]]

    done = await gateway.client.get(f"/v1/episodes/{eid}/events", params={"after": replay[-1]["id"]})
    assert done.status_code == 204  # EventSource stops reconnecting

    bad = await gateway.client.get(f"/v1/episodes/{eid}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422


async def test_stream_without_events_ends_with_the_stored_result(make_gateway: GatewayFactory) -> None:
    from tests.unit.gateway.test_problems import FailingBus

    gw = await make_gateway(bus=FailingBus())
    r = await gw.client.post(
        "/v1/problems", json={"task": "countdown", "payload": {"numbers": [1], "target": 1}}
    )
    assert r.status_code == 503
    eid = (await gw.client.get("/v1/episodes")).json()["items"][0]["id"]
    events = parse_sse((await gw.client.get(f"/v1/episodes/{eid}/events")).text)
    assert [e["event"] for e in events] == ["finished"]
    assert events[0]["data"]["data"]["status"] == "failed" and events[0]["data"]["data"]["from_store"]


async def test_heartbeats_while_idle(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ScriptedBackend(script, tokens_per_s=100))
    gw.app.state.gateway.sse_heartbeat_s = 0.05
    eid = await gw.submit()
    async with gw.client.stream("GET", f"/v1/episodes/{eid}/events") as r:
        text = (await r.aread()).decode()
    assert ": heartbeat" in text
    assert parse_sse(text)[-1]["event"] == "finished"


async def test_events_of_a_pending_episode_wait_for_it(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ScriptedBackend(script, tokens_per_s=100))
    eid = await gw.submit()
    timeout = httpx.Timeout(10.0)
    r = await gw.client.get(f"/v1/episodes/{eid}/events", timeout=timeout)
    assert parse_sse(r.text)[-1]["data"]["data"]["answer"] == ANSWER_TEXT
