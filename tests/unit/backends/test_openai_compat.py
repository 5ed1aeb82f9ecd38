"""OpenAICompatBackend against fake ``/v1/completions`` servers: a vLLM-like one and a strict hosted one.

The vLLM fake takes token-id prompts, ``stop`` lists of any length, ``include_stop_str_in_output`` and
``return_token_ids`` (answering ``token_ids`` and ``stop_reason`` per choice). The hosted fake behaves like
OpenAI's API: text prompts only, at most 4 stop strings, the matched stop dropped from ``text``, vLLM's
extra fields rejected with 400, and SSE streaming. Both generate a fixed script, token by token.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.backends.base import FinishReason, GenerateRequest, ModelBackend, SamplingParams
from shared.backends.openai_compat import (
    OpenAICompatBackend,
    OpenAIRequestError,
    literal_stops,
)
from shared.protocol import ORGANIZER_STOP_REGEX, WORKER_STOP_REGEX
from tests.unit.backends.test_sglang_contract import EOS, build_tokenizer_dir

BASE = "http://vllm:8000/v1"
STANDARD_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n",
                 "logprobs", "echo", "presence_penalty", "frequency_penalty", "user", "suffix", "best_of"}  # fmt: skip
VLLM_KEYS = {
    "top_k",
    "min_p",
    "include_stop_str_in_output",
    "return_token_ids",
    "stop_token_ids",
    "ignore_eos",
}


class FakeCompletions:
    def __init__(self, tokenizer: Any, *, hosted: bool) -> None:
        self.tok, self.hosted = tokenizer, hosted
        self.eos_id = int(tokenizer.convert_tokens_to_ids(EOS))
        self.script = "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think."
        self.bodies: list[dict[str, Any]] = []
        self.cached = 0
        self.fail: tuple[int, dict[str, Any]] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def _run(self, body: dict[str, Any]) -> tuple[list[int], str, str, Any]:
        """(token ids, text as the server reports it, finish_reason, stop_reason)."""
        prompt = body["prompt"]
        script = self.tok.encode(self.script, add_special_tokens=False) + [self.eos_id]
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        out: list[int] = []
        finish, stop_reason = "length", None
        del prompt
        for tok in script:
            if len(out) >= body.get("max_tokens", 16):
                break
            out.append(tok)
            text = self.tok.decode(out, skip_special_tokens=True)
            hit = next((s for s in stops if s in text), None)
            if hit is not None:
                finish, stop_reason = "stop", hit
                if not body.get("include_stop_str_in_output"):
                    text = text[: text.index(hit)]
                return out, text, finish, stop_reason
            if tok == self.eos_id:
                finish = "stop"
                break
        return out, self.tok.decode(out, skip_special_tokens=True), finish, stop_reason

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if self.fail:
            status, payload = self.fail
            return JSONResponse(payload, status)
        allowed = STANDARD_KEYS if self.hosted else STANDARD_KEYS | VLLM_KEYS
        unknown = set(body) - allowed
        if unknown:
            return JSONResponse({"error": {"message": f"Unrecognized request argument supplied: {sorted(unknown)}",
                                           "type": "invalid_request_error"}}, 400)  # fmt: skip
        prompt = body.get("prompt")
        if self.hosted and not isinstance(prompt, str):
            return JSONResponse(
                {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}}, 400
            )
        if isinstance(prompt, list) and not all(isinstance(i, int) for i in prompt):
            return JSONResponse({"error": {"message": "prompt must be token ids"}}, 400)
        stops = body.get("stop") or []
        if self.hosted and isinstance(stops, list) and len(stops) > 4:
            return JSONResponse(
                {"error": {"message": "stop: at most 4 sequences", "type": "invalid_request_error"}}, 400
            )
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }
        if body.get("stream"):
            ids, _, finish, _ = self._run(body)

            async def events() -> AsyncIterator[bytes]:
                for k, tok in enumerate(ids):
                    last = k == len(ids) - 1
                    choice = {"index": 0, "text": self.tok.decode([tok], skip_special_tokens=True),
                              "finish_reason": finish if last else None}  # fmt: skip
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        ids, text, finish, stop_reason = self._run(body)
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if not self.hosted:
            choice["stop_reason"] = stop_reason
            if body.get("return_token_ids"):
                choice["token_ids"] = ids
        usage["completion_tokens"] = len(ids)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                             "choices": [choice], "usage": usage})  # fmt: skip


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
