"""POST /v1/problems, GET /v1/episodes/{id} and GET /v1/episodes in embedded mode over scripted agents."""

from __future__ import annotations

from typing import Any

import pytest

from shared.bus.inprocess import InProcessBus
from shared.messages import PROBLEMS_STREAM
from tests.unit.gateway.conftest import (
    ANSWER_TEXT,
    COUNTDOWN,
    EXPECTED_ETA,
    EXPECTED_T,
    ORGANIZER,
    WORKER,
    Gateway,
    GatewayFactory,
)


async def test_submit_then_poll_until_completed(gateway: Gateway) -> None:
    r = await gateway.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    assert r.status_code == 202
    accepted = r.json()
    eid = accepted["episode_id"]
    assert accepted["status"] == "pending"
    assert accepted["links"] == {"self": f"/v1/episodes/{eid}", "events": f"/v1/episodes/{eid}/events"}

    episode = await gateway.wait(eid)
    assert episode["status"] == "completed"
    assert episode["answer"] == ANSWER_TEXT
    assert episode["latency"] == EXPECTED_T
    assert episode["eta"] == pytest.approx(EXPECTED_ETA)
    assert episode["eta_over_c"] == pytest.approx(EXPECTED_ETA / 2)
    assert episode["capacity"] == 2  # countdown's default
    assert episode["accuracy"] == pytest.approx(0.5)  # 2 of the 4 distinct solutions asked for
    assert episode["reward_total"] is not None and episode["reward_concurrency"] is not None
    assert episode["format_errors"] == []
    assert episode["wall_time_s"] >= 0
    assert episode["problem"]["payload"]["numbers"] == [3, 7, 25, 50]

    by_agent = {s["agent"]: s for s in episode["segments"]}
    assert set(by_agent) == {"organizer", "1"}
    organizer, worker = by_agent["organizer"], by_agent["1"]
    assert organizer["generated_tokens"] == len(ORGANIZER)
    assert worker["text"] == WORKER and worker["returned"] == "25+50" and worker["query"] == "25 50"
    # The join injected "25+50</JOIN-1>" into the organizer: counted, masked out of training.
    assert organizer["injected_tokens"] == len("25+50</JOIN-1>")
    assert organizer["completion_tokens"] == len(ORGANIZER) + organizer["injected_tokens"]
    assert organizer["prompt_tokens"] > 0
    assert organizer["prompt_ids"] is None and organizer["completion_mask"] is None


async def test_include_tokens_adds_ids_and_masks(gateway: Gateway) -> None:
    eid = await gateway.submit()
    await gateway.wait(eid)
    r = await gateway.client.get(f"/v1/episodes/{eid}", params={"include_tokens": "true"})
    organizer = next(s for s in r.json()["segments"] if s["agent"] == "organizer")
    assert len(organizer["prompt_ids"]) == organizer["prompt_tokens"]
    assert (
        len(organizer["completion_ids"])
        == len(organizer["completion_mask"])
        == organizer["completion_tokens"]
    )
    assert sum(organizer["completion_mask"]) == len(ORGANIZER)


async def test_options_reach_the_engine(gateway: Gateway) -> None:
    eid = await gateway.submit(mode="parallel", parallel_k=3, capacity=3, seed=7, temperature=0.5, top_p=0.9)
    episode = await gateway.wait(eid)
    assert episode["status"] == "completed"
    assert episode["mode"] == "parallel" and episode["capacity"] == 3
    assert sorted(s["agent"] for s in episode["segments"]) == ["trace-1", "trace-2", "trace-3"]
    assert episode["answer"] == "25+50"
    assert episode["config"]["seed"] == 7 and episode["config"]["parallel_k"] == 3


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        ({"task": "chess", "payload": COUNTDOWN}, "task", "unknown task 'chess'"),
        ({"task": "countdown", "payload": {"numbers": [3, 7]}}, "payload", "target"),
        ({"task": "countdown", "payload": {"numbers": "3 7", "target": 5}}, "payload", "numbers"),
        (
            {"task": "countdown", "payload": COUNTDOWN, "capacity": 0},
            "capacity",
            "greater than or equal to 1",
        ),
        (
            {"task": "countdown", "payload": COUNTDOWN, "worker_budget": -5},
            "worker_budget",
            "greater than or equal",
        ),
        (
            {"task": "countdown", "payload": COUNTDOWN, "organizer_budget": 0},
            "organizer_budget",
            "greater than",
        ),
        ({"task": "countdown", "payload": COUNTDOWN, "mode": "telepathy"}, "mode", "asyncthink"),
        ({"task": "countdown", "payload": COUNTDOWN, "top_p": 0}, "top_p", "greater than 0"),
        ({"task": "countdown", "payload": COUNTDOWN, "capcity": 2}, "capcity", "Extra inputs"),
        ({"task": "sudoku", "payload": {"puzzle": "11.............."}}, "payload", "no solution"),
        ({"task": "math", "payload": {"problem": "  "}}, "payload", "non-empty"),
    ],
)
async def test_invalid_input_is_422_and_writes_nothing(
    gateway: Gateway, body: dict[str, Any], where: str, says: str
) -> None:
    r = await gateway.client.post("/v1/problems", json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(where in [str(p) for p in e["loc"]] and says in e["msg"] for e in errors), errors
    listing = (await gateway.client.get("/v1/episodes")).json()
    assert listing["total"] == 0


class FailingBus(InProcessBus):
    """The in-process bus, except that submissions cannot be published."""

    async def publish(self, stream: str, fields: dict[str, str], *, maxlen: int | None = None) -> str:
        if stream == PROBLEMS_STREAM:
            raise ConnectionError("bus down")
        return await super().publish(stream, fields, maxlen=maxlen)


async def test_publish_failure_is_503_and_marks_the_episode_failed(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(bus=FailingBus())
    r = await gw.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    assert r.status_code == 503
    # the kind of error, not its text (which may name a host): that goes to the log
    assert "could not queue" in r.json()["detail"] and "ConnectionError" in r.json()["detail"]
    listing = (await gw.client.get("/v1/episodes")).json()
    assert listing["total"] == 1
    (item,) = listing["items"]
    assert item["status"] == "failed"
    episode = (await gw.client.get(f"/v1/episodes/{item['id']}")).json()
    assert "ConnectionError" in episode["error"]


async def test_unknown_episode_is_404_with_a_message(gateway: Gateway) -> None:
    for path in ("/v1/episodes/nope", "/v1/episodes/nope/events"):
        r = await gateway.client.get(path)
        assert r.status_code == 404
        assert "no episode 'nope'" in r.json()["detail"]


async def test_list_filters_and_pagination(gateway: Gateway) -> None:
    ids = [await gateway.submit() for _ in range(3)]
    # Sequential thinking forbids forks: the same organizer script is a format error there.
    seq = await gateway.submit(mode="sequential")
    for eid in ids:
        assert (await gateway.wait(eid))["status"] == "completed"
    seq_status = (await gateway.wait(seq))["status"]
    assert seq_status == "format_error"  # a fork in sequential mode

    async def page(**params: Any) -> dict[str, Any]:
        r = await gateway.client.get("/v1/episodes", params=params)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    everything = await page()
    assert everything["total"] == 4 and len(everything["items"]) == 4
    assert {i["id"] for i in everything["items"]} == {*ids, seq}
    first, second = await page(limit=2), await page(limit=2, offset=2)
    assert first["total"] == second["total"] == 4
    assert len(first["items"]) == len(second["items"]) == 2
    assert {i["id"] for i in first["items"]}.isdisjoint({i["id"] for i in second["items"]})
    assert (await page(offset=4))["items"] == []

    sequential = await page(mode="sequential")
    assert [i["id"] for i in sequential["items"]] == [seq] and sequential["total"] == 1
    errors = await page(status=seq_status)
    assert [i["id"] for i in errors["items"]] == [seq]
    assert (await page(status="completed", mode="asyncthink"))["total"] == 3
    assert (await page(task="math"))["total"] == 0
    assert (await page(model_version="scripted"))["total"] == 4
    assert (await page(model_version="v-none"))["total"] == 0

    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"mode": "nope"}, {"status": "done"}):
        r = await gateway.client.get("/v1/episodes", params=bad)
        assert r.status_code == 422, bad
