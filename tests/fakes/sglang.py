"""``FakeSGLang``: a fake SGLang 0.5.23 HTTP server that is as strict as the real one (a test fixture).

The fake (an ASGI app behind ``httpx.ASGITransport``; it lives under ``tests/``, never on a default path)
follows SGLang 0.5.23's HTTP API as its sources define it: ``/generate`` needs exactly one of ``text`` /
``input_ids`` / ``input_embeds``, rejects unknown or wrongly typed ``sampling_params`` keys with
``400 {"error": str}``, takes an optional integer ``priority`` (recorded in ``priorities``; a value of
another type is a 400, as SGLang's request schema says), reports ``finish_reason`` as SGLang's server does (a regex stop's
``matched`` is the pattern, EOS's is a token id), counts ``cached_tokens`` from a per-replica prefix
cache, and blocks while paused; ``/pause_generation`` and ``/continue_generation`` answer 400 without a
JSON body; ``/update_weights_from_disk`` applies the cache-flush rule of an ``in_place`` pause;
``/health`` is 503 while paused; the API keys are checked per route level. Replicas (e.g. hosts ``r1``
and ``r2``) are served by one app and told apart by the Host header. ``RefusingTransport`` wraps a
transport to simulate refused connections.

Each replica generates its ``script`` (then EOS), token by token. Test knobs per replica: ``abort_next``,
``fail_next_status`` (the next ``/generate`` answers that status), ``delay_s``, ``parked``, ``script_for``
(a script chosen by the prompt's text), and ``resume``
(continue the script after a prompt that ends with its beginning, as a greedy model would; off by
default); ``calls`` records every request and ``generated`` counts the output ids answered.

In-flight requests (``token_delay_s`` > 0): each token then takes that long, and a pause reaches the
requests already generating, as SGLang's pause modes do: ``abort`` ends them at once with
finish ``abort`` and their partial output (the pause answers once none is left), ``in_place`` freezes
them until ``/continue_generation`` and ``retract`` does too, counting ``num_retractions``; tokens
generated after a weight update carry the new version, and ``meta_info.weight_versions`` lists the
spans per version (``weight_version`` is the last token's). ``running`` counts requests generating now,
``live`` holds each one's input and output ids so far, and ``held`` counts new requests waiting out a
pause: tests wait on these (a request has produced k tokens; a request is held) instead of sleeping.

Used by ``tests/unit/backends/test_sglang_contract.py`` and the backend conformance suite.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.fakes import resume_point
from tests.fakes.tokenizer import EOS

# sampling_params keys of SGLang 0.5.23 (its "sampling_params"), by the type the schema gate wants
INT_KEYS = {
    "max_new_tokens",
    "top_k",
    "min_new_tokens",
    "n",
    "stream_interval",
    "sampling_seed",
    "beam_width",
}
FLOAT_KEYS = {"temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"}
BOOL_KEYS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
OTHER_KEYS = {
    "stop", "stop_token_ids", "stop_regex", "json_schema", "regex", "ebnf", "structural_tag",
    "logit_bias", "custom_params", "watermark", "choice",
}  # fmt: skip
SAMPLING_KEYS = INT_KEYS | FLOAT_KEYS | BOOL_KEYS | OTHER_KEYS
ADMIN_PATHS = {
    "/flush_cache", "/update_weights_from_disk", "/pause_generation", "/continue_generation", "/abort_request",
}  # fmt: skip


def bad_request(message: str) -> JSONResponse:
    """FastAPI's 422 remapped by SGLang (its error handling)."""
    return JSONResponse(
        {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}, 400
    )


@dataclass
class Replica:
    host: str
    script: str = "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think."
    weight_version: str = "default"
    model_path: str = "/models/tiny-model"
    max_context: int = 4096
    calls: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, JSON body or None)
    cache: list[list[int]] = field(default_factory=list)  # radix cache, as whole sequences
    paused: str | None = None  # the pause mode while paused
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    parked: int = 0  # requests frozen in the running batch during an in_place pause (a test knob)
    abort_next: bool = False
    fail_next_status: int | None = None
    delay_s: float = 0.0
    resume: bool = False  # continue the script after a prompt that ends with its beginning (resume_point)
    script_for: Any = None  # (prompt text) -> script: a different script per prompt (organizer vs worker)
    generated: int = 0  # output ids answered so far
    token_delay_s: float = 0.0  # > 0: seconds per token, and pauses reach requests in flight
    running: int = 0  # /generate requests generating now (in-flight mode)
    live: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (input ids, output ids so far) of each
    held: int = 0  # new /generate requests waiting for /continue_generation now
    update_delay_s: float = 0.0  # seconds /update_weights_from_disk takes (loading the weights)
    priorities: list[int | None] = field(default_factory=list)  # each /generate's top-level ``priority``

    def cached(self, ids: list[int]) -> int:
        best = 0
        for seq in self.cache:
            n = 0
            while n < min(len(seq), len(ids)) and seq[n] == ids[n]:
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)


class FakeSGLang:
    """Two (or more) strict SGLang 0.5.23 replicas in one ASGI app, told apart by the Host header."""

    def __init__(
        self, tokenizer: Any, hosts: list[str], *, api_key: str | None = None, admin_key: str | None = None
    ):
        self.tok = tokenizer
        self.eos_id = int(tokenizer.convert_tokens_to_ids(EOS))
        self.replicas = {h: Replica(h) for h in hosts}
        self.api_key, self.admin_key = api_key, admin_key
        routes = [
            Route("/generate", self.generate, methods=["POST", "PUT"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/health_generate", self.health, methods=["GET"]),
            Route("/model_info", self.model_info, methods=["GET"]),
            Route("/get_model_info", self.model_info, methods=["GET"]),
            Route("/flush_cache", self.flush_cache, methods=["GET", "POST"]),
            Route("/update_weights_from_disk", self.update_weights, methods=["POST"]),
            Route("/pause_generation", self.pause, methods=["POST"]),
            Route("/continue_generation", self.continue_, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    def replica(self, host: str) -> Replica:
        return self.replicas[host]

    async def _enter(self, request: Request) -> tuple[Replica, Any, Response | None]:
        """Find the replica, record the call, check auth, parse the body (None when absent)."""
        rep = self.replicas[request.url.hostname or ""]
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            rep.calls.append((request.method, request.url.path, raw.decode(errors="replace")))
            return rep, None, bad_request("Expecting value: line 1 column 1 (char 0)")
        rep.calls.append((request.method, request.url.path, body))
        path = request.url.path
        if not path.startswith("/health"):
            key = (self.admin_key or self.api_key) if path in ADMIN_PATHS else self.api_key
            if key and request.headers.get("authorization") != f"Bearer {key}":
                return rep, body, JSONResponse({"error": "Unauthorized"}, 401)
        return rep, body, None

    async def generate(self, request: Request) -> Response:
        rep, body, err = await self._enter(request)
        if err:
            return err
        if rep.paused:  # new requests block until /continue_generation (SGLang's pause semantics)
            rep.held += 1
            try:
                await rep.resumed.wait()
            finally:
                rep.held -= 1
        if rep.delay_s:
            await asyncio.sleep(rep.delay_s)
        if rep.fail_next_status:
            status, rep.fail_next_status = rep.fail_next_status, None
            return JSONResponse({"object": "error", "message": "boom", "type": str(status), "param": None,
                                 "code": status}, status)  # fmt: skip
        if not isinstance(body, dict):
            return bad_request("Field required")
        given = [k for k in ("text", "input_ids", "input_embeds") if body.get(k) is not None]
        if not given or len(given) == 3:
            return JSONResponse(
                {"error": {"message": "Either text, input_ids or input_embeds should be provided."}}, 400
            )
        ids = body.get("input_ids")
        if "text" in given:
            ids = self.tok.encode(body["text"], add_special_tokens=False)  # text wins over input_ids
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return bad_request("Input should be a valid list")
        if not ids:
            return JSONResponse({"error": {"message": "input_ids cannot be empty."}}, 400)
        priority = body.get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            return JSONResponse({"error": f"invalid type: `{priority!r}`, expected i64"}, 400)
        rep.priorities.append(priority)
        sp = body.get("sampling_params") or {}
        for key, value in sp.items():
            if key not in SAMPLING_KEYS:
                expected = ", ".join(f"`{k}`" for k in sorted(SAMPLING_KEYS))
                return JSONResponse({"error": f"unknown field `{key}`, expected one of {expected}"}, 400)
            if value is None:
                continue
            if key in INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
                return JSONResponse({"error": f"invalid type: `{value!r}`, expected i64"}, 400)
            if key in FLOAT_KEYS and (isinstance(value, bool) or not isinstance(value, int | float)):
                return JSONResponse({"error": f"invalid type: `{value!r}`, expected f32"}, 400)
            if key in BOOL_KEYS and not isinstance(value, bool):
                return JSONResponse({"error": f"invalid type: `{value!r}`, expected a boolean"}, 400)
        patterns = sp.get("stop_regex") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if len(patterns) > 32 or any(len(p.encode()) > 256 for p in patterns):
            return JSONResponse({"error": {"message": "stop_regex: at most 32 patterns of 256 bytes"}}, 400)
        if sp.get("top_p") is not None and not 0 < sp["top_p"] <= 1:
            return JSONResponse({"error": {"message": f"top_p must be in (0, 1], got {sp['top_p']}."}}, 400)
        if len(ids) > rep.max_context:
            msg = f"The input ({len(ids)} tokens) is longer than the model's context length ({rep.max_context} tokens)."
            return JSONResponse({"error": {"message": msg}}, 400)
        max_new = sp.get("max_new_tokens")
        max_new = 128 if max_new is None else max_new
        cached = rep.cached(ids)
        text = rep.script_for(self.tok.decode(ids)) if rep.script_for is not None else rep.script
        script = self.tok.encode(text, add_special_tokens=False) + [self.eos_id]
        if rep.resume:
            script = script[resume_point(ids, script) :]
        out: list[int] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        versions: list[str] = []  # the version that produced each output id
        retractions = 0
        rep.running += 1
        rep.live.append((ids, out))
        try:
            for tok in script:
                if len(out) >= max_new:
                    break
                if rep.token_delay_s:
                    await asyncio.sleep(rep.token_delay_s)
                    if rep.paused == "abort":
                        finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
                        break
                    if rep.paused in ("in_place", "retract"):
                        retractions += rep.paused == "retract"
                        await rep.resumed.wait()
                out.append(tok)
                versions.append(rep.weight_version)
                text = self.tok.decode(out, skip_special_tokens=True)
                hit = next((p for p in patterns if re.search(p, text)), None)
                if hit is not None:  # order: stop string -> stop token / EOS -> length (0.5.20+)
                    finish = {"type": "stop", "matched": hit}
                    break
                if tok == self.eos_id:
                    finish = {"type": "stop", "matched": self.eos_id}
                    break
        finally:
            rep.running -= 1
            rep.live.remove((ids, out))
        return self._answer(rep, sp, ids, out, versions, finish, cached, retractions)

    def _answer(
        self, rep: Replica, sp: dict[str, Any], ids: list[int], out: list[int], versions: list[str],
        finish: dict[str, Any], cached: int, retractions: int,
    ) -> Response:  # fmt: skip
        if rep.abort_next:
            rep.abort_next = False
            finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
        text = self.tok.decode(out, skip_special_tokens=True)
        if finish["type"] == "stop" and not sp.get("no_stop_trim"):
            if isinstance(finish["matched"], str):
                m = re.search(finish["matched"], text)
                text = text[: m.start()] if m else text
            else:
                text = self.tok.decode(out[:-1], skip_special_tokens=True)
        rep.cache.append(ids + out[:-1])
        rep.generated += len(out)
        spans: list[dict[str, Any]] = []
        for k, v in enumerate(versions):  # runs of one version over output positions
            if spans and spans[-1]["version"] == v:
                spans[-1]["end"] = k + 1
            else:
                spans.append({"version": v, "start": k, "end": k + 1})
        last = versions[-1] if versions else rep.weight_version
        meta = {
            "id": "rid", "finish_reason": finish, "prompt_tokens": len(ids), "weight_version": last,
            "num_retractions": retractions, "reasoning_tokens": 0, "completion_tokens": len(out),
            "cached_tokens": cached, "weight_versions": spans or [{"version": last, "start": 0, "end": 0}],
            "e2e_latency": 0.01, "response_sent_to_client_ts": 1795620000.1,
        }  # fmt: skip
        return JSONResponse({"text": text, "output_ids": out, "meta_info": meta})

    async def health(self, request: Request) -> Response:
        rep, _, _ = await self._enter(request)
        return Response(status_code=503 if rep.paused else 200)

    async def model_info(self, request: Request) -> Response:
        rep, _, err = await self._enter(request)
        if err:
            return err
        return JSONResponse({
            "model_path": rep.model_path, "served_model_name": rep.model_path, "tokenizer_path": rep.model_path,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": rep.weight_version,
            "load_format": "auto", "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        })  # fmt: skip

    async def flush_cache(self, request: Request) -> Response:
        rep, _, err = await self._enter(request)
        if err:
            return err
        if rep.parked or rep.running:
            return PlainTextResponse("Flush cache failed.\n", 400)
        rep.cache.clear()
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n")

    async def update_weights(self, request: Request) -> Response:
        rep, body, err = await self._enter(request)
        if err:
            return err
        if not isinstance(body, dict) or "model_path" not in body:
            return bad_request("1 validation error: model_path Field required")
        if rep.update_delay_s:
            await asyncio.sleep(rep.update_delay_s)
        if "missing" in body["model_path"]:
            msg = f"Failed to get weights iterator: {body['model_path']} (repository not found)."
            return JSONResponse({"success": False, "message": msg, "num_paused_requests": 0}, 400)
        rep.model_path = body["model_path"]
        version = body.get("weight_version")
        if version is not None:
            rep.weight_version = version
        if body.get("flush_cache", True):
            if rep.paused == "in_place" and (rep.parked or rep.running):
                msg = ("Weights were updated, but the cache was not flushed because requests are still running "
                       "or queued. Retract or finish them, then call /flush_cache.")  # fmt: skip
                return JSONResponse({"success": False, "message": msg, "num_paused_requests": 0}, 400)
            rep.cache.clear()
        msg = "Succeeded to update model weights." + (
            f" Weight version updated to {version}." if version else ""
        )
        return JSONResponse({"success": True, "message": msg, "num_paused_requests": 0})

    async def pause(self, request: Request) -> Response:
        rep, body, err = await self._enter(request)
        if err:
            return err
        if not isinstance(body, dict):
            return bad_request("1 validation error: body Field required")
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return bad_request(f"Input should be 'abort', 'retract' or 'in_place', got {mode!r}")
        rep.paused = mode
        rep.resumed = asyncio.Event()
        while mode == "abort" and rep.running:  # abort: answers once no request holds the model
            await asyncio.sleep(0.001)
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_(self, request: Request) -> Response:
        rep, body, err = await self._enter(request)
        if err:
            return err
        if not isinstance(body, dict):
            return bad_request("1 validation error: body Field required")
        rep.paused = None
        rep.parked = 0
        rep.resumed.set()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})


class RefusingTransport(httpx.AsyncBaseTransport):
    """Wraps a transport; hosts in ``down`` refuse the connection (``failures[host]`` times, or always)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down: dict[str, int | None] = {}  # host -> refusals left (None: forever)
        self.attempts: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.attempts[host] = self.attempts.get(host, 0) + 1
        if host in self.down:
            left = self.down[host]
            if left is None or left > 0:
                if left is not None:
                    self.down[host] = left - 1
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await self.inner.handle_async_request(request)
