"""The chat endpoint answers any prompt: free-form chat by default, the organizer's text streamed as it is
decoded, a system message honoured, and models that never saw the protocol taught it by a system prompt.

Driven by the official ``openai`` client against real uvicorn servers in embedded mode: over the scripted
backend (exact texts, so T and the streamed text are known), over the tiny random transformers model
(token-by-token streaming), and over the SGLang client talking to the SGLang contract fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared.backends.scripted import ScriptedBackend
from tests.unit.gateway.conftest import (
    ANSWER_TEXT,
    EXPECTED_T,
    FORK,
    JOIN,
    ORGANIZER,
    WORKER,
    LiveServerFactory,
    script,
)

QUESTION = "What is 17 * 23? Think step by step."
# the organizer's whole text: what it decoded, and the join's injected result up to </JOIN-1>
ORGANIZER_TEXT = FORK + JOIN + "25+50</JOIN-1>" + f"<ANSWER>{ANSWER_TEXT}</ANSWER>"


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture
def scripted(make_live_server: LiveServerFactory) -> Iterator[tuple[openai.OpenAI, str, list[str]]]:
    """A server over the scripted backend that also records every prompt the organizer was given."""
    prompts: list[str] = []

    def recording(agent: str, prompt: str) -> str:
        if agent == "organizer":
            prompts.append(prompt)
        return script(agent, prompt)

    url = make_live_server(ScriptedBackend(recording))
    yield client_for(url), url, prompts


def test_a_plain_question_is_a_free_form_chat(scripted: tuple[openai.OpenAI, str, list[str]]) -> None:
    client, url, prompts = scripted
    models = {m.id: (m.model_extra or {})["task"] for m in client.models.list()}
    assert models["asyncthink"] == "auto" and models["asyncthink-chat"] == "chat"
    resp = client.chat.completions.create(
        model="asyncthink",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
    )
    message = resp.choices[0].message
    assert message.content == ANSWER_TEXT and resp.choices[0].finish_reason == "stop"
    assert (message.model_extra or {})["reasoning_content"] == ORGANIZER_TEXT  # forks and joins visible
    usage = resp.usage
    assert usage is not None and (usage.model_extra or {})["critical_path_tokens"] == EXPECTED_T
    assert usage.completion_tokens == len(ORGANIZER) + len(WORKER)
    episode = httpx.get(f"{url}/v1/episodes/{(resp.model_extra or {})['episode_id']}").json()
    assert episode["task"] == "chat" and episode["status"] == "completed"
    assert episode["accuracy"] is None  # nothing to grade
    # the whole conversation, system message included, reached the organizer (trained prompt style)
    assert set(prompts) == {f"System: Be brief.\nUser: {QUESTION}\nYou may fork workers.\n"}


def test_the_text_still_picks_a_graded_task(scripted: tuple[openai.OpenAI, str, list[str]]) -> None:
    client, url, _ = scripted
    resp = client.chat.completions.create(
        model="asyncthink", messages=[{"role": "user", "content": "numbers: 3 7 25 50 target: 75"}]
    )
    episode = httpx.get(f"{url}/v1/episodes/{(resp.model_extra or {})['episode_id']}").json()
    assert episode["task"] == "countdown" and episode["accuracy"] is not None


def test_streaming_sends_the_organizer_text_then_the_answer(
    scripted: tuple[openai.OpenAI, str, list[str]],
) -> None:
    client, _, _ = scripted
    chunks = list(
        client.chat.completions.create(
            model="asyncthink",
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [(d.model_extra or {}).get("reasoning_content") for d in deltas]
    content = [d.content for d in deltas if d.content]
    assert "".join(r for r in reasoning if r) == ORGANIZER_TEXT
    assert content == [ANSWER_TEXT]
    # the answer comes after all the text that led to it
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert all(r is None for r in reasoning[first_answer + 1 :] if r and "</ANSWER>" not in r)
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.model_extra or {})["critical_path_tokens"] == EXPECTED_T


def test_bad_chat_requests_are_4xx_with_a_message(scripted: tuple[openai.OpenAI, str, list[str]]) -> None:
    client, url, _ = scripted
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": "asyncthink", "messages": []}, 400, "messages"),
        ({"model": "asyncthink", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user message"),
        ({"model": "asyncthink-chat", "messages": [{"role": "tool", "content": "x"}]}, 400, "role 'tool'"),
        ({"model": "asyncthink", "messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
        ({"model": "asyncthink", "messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "characters"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "asyncthink-chat"),
        ({"model": "asyncthink", "messages": [{"role": "user", "content": "hi"}], "capacity": 0}, 400, "capacity"),
    ]
    for body, status, says in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert says in r.json()["error"]["message"], (body, r.text)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="asyncthink", messages=[{"role": "assistant", "content": "hi"}])
    assert httpx.get(f"{url}/v1/episodes").json()["total"] == 0  # nothing was stored


def test_the_in_process_model_streams_token_by_token(
    make_live_server: LiveServerFactory, tiny_model_dir: Path
) -> None:
    from shared.backends.transformers_backend import TransformersBackend

    url = make_live_server(TransformersBackend(tiny_model_dir))
    chunks = list(
        client_for(url).chat.completions.create(
            model="asyncthink", messages=[{"role": "user", "content": QUESTION}], stream=True, max_tokens=24,
        )
    )
    pieces = [
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices
    ]
    pieces = [p for p in pieces if p]
    episode_id = (chunks[0].model_extra or {})["episode_id"]
    stored = httpx.get(f"{url}/v1/episodes/{episode_id}").json()
    organizer = next(s for s in stored["segments"] if s["agent"] == "organizer")
    assert "".join(pieces) == organizer["text"]
    assert len(pieces) >= 5  # streamed as decoded, not in one piece at the end
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- a prompted served model
WORKER_REPLY = "<RETURN>340</RETURN>"
ORGANIZER_REPLY = "Split it.<FORK-1>What is 17*20?</FORK-1>17*3 = 51.<JOIN-1>340</JOIN-1> So 340 + 51.<ANSWER>391</ANSWER>"


@pytest.fixture
def sglang_server(make_live_server: LiveServerFactory, tmp_path: Path) -> tuple[str, Any]:
    """A server whose model is the SGLang client in front of the SGLang contract fixture, playing an
    organizer script or a worker script by what the prompt says."""
    from transformers import AutoTokenizer

    from shared.backends.sglang import SGLangBackend
    from tests.fakes.sglang import FakeSGLang
    from tests.fakes.tokenizer import build_tokenizer_dir

    tok_dir = build_tokenizer_dir(tmp_path / "served-model")
    fake = FakeSGLang(AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True), ["r1"])
    replica = fake.replica("r1")
    replica.resume = True
    replica.script_for = lambda prompt: WORKER_REPLY if "You are a worker" in prompt else ORGANIZER_REPLY
    backend = SGLangBackend(["http://r1:30000"], tok_dir, transport=httpx.ASGITransport(app=fake.app))
    return make_live_server(backend), fake


def _prompts(fake: Any) -> list[str]:
    return [fake.tok.decode(body["input_ids"]) for _, path, body in fake.replica("r1").calls if path == "/generate"]


def test_a_served_model_is_taught_the_protocol(sglang_server: tuple[str, Any]) -> None:
    url, fake = sglang_server
    client = client_for(url)
    resp = client.chat.completions.create(
        model="asyncthink",
        messages=[{"role": "system", "content": "Answer in digits."}, {"role": "user", "content": QUESTION}],
    )
    assert resp.choices[0].message.content == "391"
    assert (resp.choices[0].message.model_extra or {})["reasoning_content"] == ORGANIZER_REPLY
    prompts = _prompts(fake)
    organizer = prompts[0]
    assert "You are the organizer" in organizer and "<FORK-1>" in organizer and "<ANSWER>" in organizer
    assert "Answer in digits." in organizer and QUESTION in organizer
    worker = next(p for p in prompts if "You are a worker" in p)
    assert "What is 17*20?" in worker and "<RETURN>" in worker and QUESTION not in worker
    info = (resp.model_extra or {})["asyncthink"]
    assert info["status"] == "completed" and info["forks"] == 1

    chunks = list(
        client.chat.completions.create(
            model="asyncthink", messages=[{"role": "user", "content": QUESTION}], stream=True
        )
    )
    text = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert text == ORGANIZER_REPLY
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == ["391"]
