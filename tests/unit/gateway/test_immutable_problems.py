"""Problems are immutable (an id is bound to its content) and a model name is stored only if it is served."""

from __future__ import annotations

import httpx

from tests.unit.gateway.conftest import COUNTDOWN, Gateway

REWRITE = {"numbers": [1, 1, 1, 1], "target": 999}


async def test_a_used_problem_id_with_another_payload_is_409_and_changes_nothing(gateway: Gateway) -> None:
    first = await gateway.submit(problem_id="p-1")
    done = await gateway.wait(first)
    assert done["status"] == "completed"

    # the same id and the same payload reuse the stored problem
    again = await gateway.submit(problem_id="p-1")
    assert (await gateway.wait(again))["problem"]["problem_id"] == "p-1"

    r = await gateway.client.post(
        "/v1/problems", json={"task": "countdown", "payload": REWRITE, "problem_id": "p-1"}
    )
    assert r.status_code == 409, r.text
    assert "p-1" in r.json()["detail"] and "different payload" in r.json()["detail"]
    assert "999" not in r.text  # neither payload is echoed

    stored = (await gateway.client.get(f"/v1/episodes/{first}")).json()
    assert stored["problem"]["payload"]["target"] == 75 and stored["problem"]["payload"]["numbers"] == [3, 7, 25, 50]
    listing = (await gateway.client.get("/v1/episodes")).json()
    assert listing["total"] == 2  # the refused submission stored no episode


async def test_a_derived_id_never_conflicts(gateway: Gateway) -> None:
    """Without a problem_id the task derives one; a payload it maps to a used id gets its own row."""
    a = await gateway.submit(payload={"numbers": [3, 7, 25, 50], "target": 75})
    b = await gateway.submit(payload={"numbers": [50, 25, 7, 3], "target": 75})
    ea, eb = await gateway.wait(a), await gateway.wait(b)
    assert ea["problem"]["payload"]["numbers"] == [3, 7, 25, 50]
    assert eb["problem"]["payload"]["numbers"] == [50, 25, 7, 3]
    assert ea["problem"]["problem_id"] != eb["problem"]["problem_id"]


async def test_chat_with_a_used_problem_id_is_409_in_openai_shape(gateway: Gateway) -> None:
    await gateway.wait(await gateway.submit(problem_id="p-2"))
    r = await gateway.client.post(
        "/v1/chat/completions",
        json={
            "model": "asyncthink-countdown",
            "messages": [{"role": "user", "content": "numbers: 1 1 1 1 target: 999"}],
            "problem_id": "p-2",
        },
    )
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["type"] == "conflict_error" and error["param"] == "problem_id" and "p-2" in error["message"]


async def test_an_unserved_model_name_is_refused_with_the_served_ones(gateway: Gateway) -> None:
    r = await gateway.client.post(
        "/v1/problems", json={"task": "countdown", "payload": COUNTDOWN, "model": "gpt-4-turbo"}
    )
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "model"]
    assert "gpt-4-turbo" in error["msg"] and "scripted" in error["msg"] and "asyncthink" in error["msg"]
    assert (await gateway.client.get("/v1/episodes")).json()["total"] == 0


async def test_a_served_model_name_is_accepted_and_the_served_weights_are_stored(gateway: Gateway) -> None:
    for name in ("scripted", "asyncthink-countdown"):
        r = await gateway.client.post(
            "/v1/problems", json={"task": "countdown", "payload": COUNTDOWN, "model": name}
        )
        assert r.status_code == 202, r.text
        eid = r.json()["episode_id"]
        pending = (await gateway.client.get(f"/v1/episodes/{eid}")).json()
        assert pending["model_id"] == "scripted"  # the weights that run it, never the client's text
        assert pending["config"]["model"] == name
        await gateway.wait(eid)


def test_openai_error_keeps_the_conflict_status() -> None:
    from services.gateway.errors import OpenAIError, SubmissionError

    err = OpenAIError.from_submission(SubmissionError(409, "used", param="problem_id"))
    assert err.status == 409 and err.type == "conflict_error"
    assert httpx.codes(err.status) == httpx.codes.CONFLICT
