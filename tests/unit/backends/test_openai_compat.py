"""OpenAICompatBackend against fake ``/v1/completions`` servers: a vLLM-like one and a strict hosted one.

The vLLM fake takes token-id prompts, ``stop`` lists of any length, ``include_stop_str_in_output`` and
``return_token_ids`` (answering ``token_ids`` and ``stop_reason`` per choice). The hosted fake behaves like
OpenAI's API: text prompts only, at most 4 stop strings, the matched stop dropped from ``text``, vLLM's
extra fields rejected with 400, and SSE streaming. Both generate a fixed script, token by token. The fake
(``FakeCompletions``) lives in ``tests/fakes/openai.py``, shared with the backend conformance suite.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.backends.base import FinishReason, GenerateRequest, ModelBackend, SamplingParams
from shared.backends.openai_compat import (
    OpenAICompatBackend,
    OpenAIRequestError,
    literal_stops,
)
from shared.protocol import ORGANIZER_STOP_REGEX, WORKER_STOP_REGEX
from tests.fakes.openai import VLLM_KEYS, FakeCompletions
from tests.fakes.tokenizer import build_tokenizer_dir

BASE = "http://vllm:8000/v1"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tiny-model")


@pytest.fixture
async def vllm(tokenizer_dir: Path) -> AsyncIterator[tuple[FakeCompletions, OpenAICompatBackend]]:
    from transformers import AutoTokenizer

    fake = FakeCompletions(
        AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), hosted=False
    )
    backend = OpenAICompatBackend(
        BASE, "tiny", tokenizer_dir, max_fork_id=4, transport=httpx.ASGITransport(app=fake.app)
    )
    yield fake, backend
    await backend.aclose()


@pytest.fixture
async def hosted(tokenizer_dir: Path) -> AsyncIterator[tuple[FakeCompletions, OpenAICompatBackend]]:
    from transformers import AutoTokenizer

    fake = FakeCompletions(
        AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), hosted=True
    )
    backend = OpenAICompatBackend(
        BASE, "tiny", tokenizer_dir, api_key="sk-test", token_prompts=False, vllm_extensions=False,
        transport=httpx.ASGITransport(app=fake.app),
    )  # fmt: skip
    yield fake, backend
    await backend.aclose()


def req(backend: OpenAICompatBackend, **kw: Any) -> GenerateRequest:
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("stop_regex", ORGANIZER_STOP_REGEX)
    return GenerateRequest(input_ids=backend.encode("Find 3+4 please"), **kw)


def test_literal_stops_enumerates_fork_ids() -> None:
    assert literal_stops(ORGANIZER_STOP_REGEX, 2) == [
        "</FORK-1>",
        "</FORK-2>",
        "<JOIN-1>",
        "<JOIN-2>",
        "</ANSWER>",
    ]
    assert literal_stops(WORKER_STOP_REGEX, 9) == ["</RETURN>"]
    assert len(literal_stops(ORGANIZER_STOP_REGEX, 32)) == 65
    with pytest.raises(ValueError, match="literal"):
        literal_stops(r"</FORK-\w+>", 3)
    with pytest.raises(ValueError, match="literal"):
        literal_stops(r"(a|b)c", 3)


async def test_vllm_body_and_token_round_trip(vllm: tuple[FakeCompletions, OpenAICompatBackend]) -> None:
    fake, b = vllm
    assert isinstance(b, ModelBackend)
    request = req(b, sampling=SamplingParams(temperature=0.5, top_p=0.8, top_k=10, seed=3))
    result = await b.generate(request)
    [body] = fake.bodies
    assert body == {
        "model": "tiny",
        "prompt": request.input_ids,
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.8,
        "seed": 3,
        "top_k": 10,
        "return_token_ids": True,
        "include_stop_str_in_output": True,
        "stop": literal_stops(ORGANIZER_STOP_REGEX, 4),
    }
    assert result.finish is FinishReason.STOP and result.matched == "</FORK-1>"
    assert result.text.endswith("</FORK-1>") and result.text == b.decode(result.output_ids)
    assert b.weight_version == "tiny"


async def test_vllm_eos_length_and_cached_tokens(vllm: tuple[FakeCompletions, OpenAICompatBackend]) -> None:
    fake, b = vllm
    fake.script, fake.cached = "no tags here", 4
    r = await b.generate(req(b))
    assert r.finish is FinishReason.EOS and r.text == "no tags here" and r.cached_tokens == 4
    r = await b.generate(req(b, max_new_tokens=2))
    assert r.finish is FinishReason.LENGTH and len(r.output_ids) == 2


async def test_max_stops_falls_back_to_client_side_stop(
    vllm: tuple[FakeCompletions, OpenAICompatBackend],
) -> None:
    fake, b = vllm
    b.max_stops = 4
    r = await b.generate(req(b))
    assert fake.bodies[-1]["stream"] is True and "stop" not in fake.bodies[-1]
    assert r.finish is FinishReason.STOP and r.text.endswith("</FORK-1>")


async def test_hosted_streams_and_cuts_at_the_stop(
    hosted: tuple[FakeCompletions, OpenAICompatBackend],
) -> None:
    fake, b = hosted
    r = await b.generate(req(b))
    [body] = fake.bodies
    assert body["prompt"] == "Find 3+4 please" and body["stream"] is True
    assert not set(body) & VLLM_KEYS and "stop" not in body
    assert r.finish is FinishReason.STOP and r.matched == "</FORK-1>"
    assert r.text == "Let me split the problem.<FORK-1>Find 3+4</FORK-1>"
    assert r.output_ids == b.encode(r.text)  # re-tokenized in this mode
    r = await b.generate(req(b, stop_regex=WORKER_STOP_REGEX))  # no stop in the script: runs to EOS
    assert r.finish is FinishReason.EOS and r.text == fake.script
    r = await b.generate(req(b, stop_regex=None))
    assert "stream" not in fake.bodies[-1] and r.finish is FinishReason.EOS


async def test_hosted_sends_the_api_key(tokenizer_dir: Path) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(401, json={"error": {"message": "Incorrect API key provided"}})

    b = OpenAICompatBackend(
        BASE, "tiny", tokenizer_dir, api_key="sk-x", transport=httpx.MockTransport(handler)
    )
    try:
        with pytest.raises(OpenAIRequestError, match="unauthorized"):
            await b.generate(req(b))
    finally:
        await b.aclose()
    assert seen == ["Bearer sk-x"]


async def test_errors_are_clear(
    vllm: tuple[FakeCompletions, OpenAICompatBackend], tokenizer_dir: Path
) -> None:
    fake, b = vllm
    fake.fail = (
        400,
        {"object": "error", "message": "This model's maximum context length is 8 tokens", "code": 400},
    )
    with pytest.raises(OpenAIRequestError, match="maximum context length"):
        await b.generate(req(b))
    with pytest.raises(ValueError, match="empty"):
        await b.generate(GenerateRequest([], 4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = OpenAICompatBackend(
        f"http://127.0.0.1:{port}/v1", "tiny", tokenizer_dir, retries=1, backoff_s=0.01
    )
    try:
        with pytest.raises(ConnectionError, match="vllm serve") as info:
            await down.generate(req(down))
        assert f"127.0.0.1:{port}" in str(info.value)
        with pytest.raises(ConnectionError, match="vllm serve"):
            await down.check_server()
    finally:
        await down.aclose()


async def test_check_server_lists_models(vllm: tuple[FakeCompletions, OpenAICompatBackend]) -> None:
    _, b = vllm
    await b.check_server()
    b.model = "other"
    with pytest.raises(ConnectionError, match="does not serve model 'other'"):
        await b.check_server()


def test_registry_opens_openai_specs(tokenizer_dir: Path) -> None:
    from shared.backends.registry import open_backend
    from shared.config import Settings

    settings = Settings(request_timeout_s=9.0)
    b = open_backend(f"openai:http://h:8000/v1#tiny?tokenizer={tokenizer_dir}", settings)
    assert isinstance(b, OpenAICompatBackend)
    assert (b.base_url, b.model, b.timeout_s, b.vllm_extensions, b.token_prompts) == (
        "http://h:8000/v1", "tiny", 9.0, True, True,
    )  # fmt: skip
    h = open_backend(f"openai:https://api.example/v1#gpt-x?tokenizer={tokenizer_dir}&mode=hosted", settings)
    assert isinstance(h, OpenAICompatBackend) and not h.vllm_extensions and not h.token_prompts
    with pytest.raises(ValueError, match="model-name"):
        open_backend(f"openai:http://h:8000/v1?tokenizer={tokenizer_dir}", settings)
    with pytest.raises(ValueError, match="unknown option"):
        open_backend(f"openai:http://h/v1#m?tokenizer={tokenizer_dir}&colour=red", settings)
