"""Fake ``/v1/completions`` servers (test fixtures): a vLLM-like one and a strict hosted one.

The vLLM fake takes token-id prompts, ``stop`` lists of any length, ``include_stop_str_in_output`` and
``return_token_ids`` (answering ``token_ids`` and ``stop_reason`` per choice). The hosted fake behaves like
OpenAI's API: text prompts only, at most 4 stop strings, the matched stop dropped from ``text``, vLLM's
extra fields rejected with 400, and SSE streaming. Both generate a fixed script, token by token.

Test knobs: ``script``, ``cached`` (reported cached tokens), ``fail`` (every request answers that status and
body), ``fail_next_status`` (the next request only), and ``resume`` (continue the script after a prompt
that ends with its beginning, as a greedy model would; off by default); ``bodies`` records every request
and ``generated`` counts the completion ids generated.

Used by ``tests/unit/backends/test_openai_compat.py`` and the backend conformance suite.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import resume_point
from tests.fakes.tokenizer import EOS

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
        self.fail_next_status: int | None = None  # the next request only answers this status
        self.resume = False  # continue the script after a prompt that ends with its beginning (resume_point)
        self.generated = 0  # completion ids generated so far
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
        script = self.tok.encode(self.script, add_special_tokens=False) + [self.eos_id]
        if self.resume:
            prompt = body["prompt"]
            ids = self.tok.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
            script = script[resume_point(ids, script) :]
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        out: list[int] = []
        finish, stop_reason = "length", None
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
        if self.fail_next_status:
            status, self.fail_next_status = self.fail_next_status, None
            return JSONResponse({"error": {"message": "boom", "type": "server_error", "code": status}}, status)
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
            self.generated += len(ids)

            async def events() -> AsyncIterator[bytes]:
                for k, tok in enumerate(ids):
                    last = k == len(ids) - 1
                    choice = {"index": 0, "text": self.tok.decode([tok], skip_special_tokens=True),
                              "finish_reason": finish if last else None}  # fmt: skip
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        ids, text, finish, stop_reason = self._run(body)
        self.generated += len(ids)
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if not self.hosted:
            choice["stop_reason"] = stop_reason
            if body.get("return_token_ids"):
                choice["token_ids"] = ids
        usage["completion_tokens"] = len(ids)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                             "choices": [choice], "usage": usage})  # fmt: skip
