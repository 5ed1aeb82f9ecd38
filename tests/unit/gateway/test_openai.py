"""The OpenAI-compatible API, driven by the official ``openai`` client against a real uvicorn server."""

from __future__ import annotations

import httpx
import openai
import pytest

from services.gateway.chat_input import payload_from_text
from shared.backends.scripted import ScriptedBackend
from tests.unit.gateway.conftest import ANSWER_TEXT, EXPECTED_T, ORGANIZER, WORKER, GatewayFactory, script

PROBLEM_TEXT = "numbers: 3 7 25 50 target: 75"


@pytest.fixture
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="not-needed", max_retries=0, timeout=30)


def test_models_are_listed(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"asyncthink", "asyncthink-chat", "asyncthink-countdown", "asyncthink-math", "asyncthink-sudoku"}
    assert (models["asyncthink-math"].model_extra or {})["task"] == "math"
    assert client.models.retrieve("asyncthink-sudoku").id == "asyncthink-sudoku"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion_returns_the_answer_and_the_episode(client: openai.OpenAI, live_server: str) -> None:
    resp = client.chat.completions.create(
        model="asyncthink-countdown",
        messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": PROBLEM_TEXT}],
    )
    extra = resp.model_extra or {}
    episode_id = extra["episode_id"]
    assert resp.id == f"chatcmpl-{episode_id}"
    assert resp.object == "chat.completion" and resp.model == "asyncthink-countdown"
    assert resp.choices[0].message.content == ANSWER_TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(ORGANIZER) + len(WORKER)
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    info = extra["asyncthink"]
    assert info["latency"] == EXPECTED_T and info["forks"] == 1 and info["status"] == "completed"
    assert info["eta"] > 1.0 and info["mode"] == "asyncthink"

    stored = httpx.get(f"{live_server}/v1/episodes/{episode_id}").json()
    assert stored["answer"] == ANSWER_TEXT and stored["status"] == "completed"


def test_extra_body_options_pick_the_mode(client: openai.OpenAI, live_server: str) -> None:
    resp = client.chat.completions.create(
        model="asyncthink-countdown",
        messages=[{"role": "user", "content": '{"numbers": [3, 7, 25, 50], "target": 75}'}],
        max_tokens=300,
        extra_body={"mode": "parallel", "parallel_k": 2},
    )
    extra = resp.model_extra or {}
    assert resp.choices[0].message.content == "25+50"
    assert extra["asyncthink"]["mode"] == "parallel"
    stored = httpx.get(f"{live_server}/v1/episodes/{extra['episode_id']}").json()
    assert stored["config"]["organizer_budget"] == 300 and len(stored["segments"]) == 2


def test_streaming_chunks_end_with_done(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="asyncthink-countdown",
        messages=[{"role": "user", "content": PROBLEM_TEXT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    episode_id = (chunks[0].model_extra or {})["episode_id"]
    assert {c.id for c in chunks} == {f"chatcmpl-{episode_id}"}
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == ANSWER_TEXT
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert (with_choices[-1].model_extra or {})["asyncthink"]["latency"] == EXPECTED_T
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.completion_tokens == len(ORGANIZER) + len(WORKER)


def test_raw_stream_is_openai_sse(live_server: str) -> None:
    body = {
        "model": "asyncthink-countdown",
        "messages": [{"role": "user", "content": PROBLEM_TEXT}],
        "stream": True,
    }
    with httpx.stream("POST", f"{live_server}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_errors_have_openai_shape(client: openai.OpenAI, live_server: str) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": PROBLEM_TEXT}])
    assert "asyncthink-countdown" in str(not_found.value)

    with pytest.raises(openai.BadRequestError) as bad_text:
        client.chat.completions.create(
            model="asyncthink-countdown", messages=[{"role": "user", "content": "hi"}]
        )
    assert "numbers: 3 7 25 50 target: 75" in str(bad_text.value)

    with pytest.raises(openai.BadRequestError) as bad_payload:
        client.chat.completions.create(
            model="asyncthink-countdown",
            messages=[{"role": "user", "content": "numbers: 3 7 target: 5 solutions: 0"}],
        )
    assert "n_solutions" in str(bad_payload.value)

    with pytest.raises(openai.BadRequestError) as bad_option:
        client.chat.completions.create(
            model="asyncthink-countdown",
            messages=[{"role": "user", "content": PROBLEM_TEXT}],
            extra_body={"capacity": 0},
        )
    assert bad_option.value.body is not None

    r = httpx.post(f"{live_server}/v1/chat/completions", json={"model": "asyncthink-math", "messages": []})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert httpx.get(f"{live_server}/v1/episodes").json()["total"] == 0  # nothing was stored


async def test_timeout_is_504_naming_the_episode(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ScriptedBackend(script, tokens_per_s=100))  # ~1 s per episode
    body = {
        "model": "asyncthink-countdown",
        "messages": [{"role": "user", "content": PROBLEM_TEXT}],
        "timeout_s": 0.1,
    }
    r = await gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "episode_timeout"
    (item,) = (await gw.client.get("/v1/episodes")).json()["items"]
    assert item["id"] in error["message"]
    assert (await gw.wait(item["id"]))["answer"] == ANSWER_TEXT  # the episode kept running

    async with gw.client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
        text = (await s.aread()).decode()
    assert '"code": "episode_timeout"' in text and text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("task", "text", "payload"),
    [
        ("countdown", "numbers: 3 7 25 50 target: 75", {"numbers": [3, 7, 25, 50], "target": 75}),
        ("countdown", "Target = 24, numbers = [1, 2, 3, 4]", {"numbers": [1, 2, 3, 4], "target": 24}),
        (
            "countdown",
            "numbers: 1 2 target: 3 solutions: 2",
            {"numbers": [1, 2], "target": 3, "n_solutions": 2},
        ),
        ("countdown", '{"numbers": [1], "target": 1}', {"numbers": [1], "target": 1}),
        ("sudoku", "puzzle: 1.3. ..2. 3... .4.1", {"puzzle": "1.3...2.3....4.1"}),
        ("math", "What is 1+1?", {"problem": "What is 1+1?"}),
    ],
)
def test_payload_from_text(task: str, text: str, payload: dict[str, object]) -> None:
    assert payload_from_text(task, text) == payload


def test_payload_from_text_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="target"):
        payload_from_text("countdown", "numbers: 1 2 3")
    with pytest.raises(ValueError, match="JSON"):
        payload_from_text("math", "{not json")
