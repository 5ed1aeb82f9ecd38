"""SGLangBackend against a contract fixture: a fake SGLang 0.5.23 HTTP server that is as strict as the real one.

The fake (``FakeSGLang``, an ASGI app behind ``httpx.ASGITransport``; it lives here, never on a default
path) follows ``shared/reference/sglang-http-api.md``: ``/generate`` needs exactly one of ``text`` /
``input_ids`` / ``input_embeds``, rejects unknown or wrongly typed ``sampling_params`` keys with
``400 {"error": str}``, reports ``finish_reason`` as the reference's table says (a regex stop's
``matched`` is the pattern, EOS's is a token id), counts ``cached_tokens`` from a per-replica prefix
cache, and blocks while paused; ``/pause_generation`` and ``/continue_generation`` answer 400 without a
JSON body; ``/update_weights_from_disk`` applies the cache-flush rule of an ``in_place`` pause;
``/health`` is 503 while paused; the API keys are checked per route level. Hosts ``r1`` and ``r2`` are two
replicas served by one app. A wrapping transport simulates refused connections.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from shared.backends.base import FinishReason, GenerateRequest, ModelBackend, SamplingParams
from shared.backends.sglang import (
    SGLangBackend,
    SGLangRequestError,
    SGLangServerError,
    WeightUpdateError,
    rendezvous_order,
)
from shared.protocol import ORGANIZER_STOP_REGEX, WORKER_STOP_REGEX

EOS = "<|eos|>"
R1, R2 = "http://r1:30000", "http://r2:30000"

# -- a small local tokenizer ---------------------------------------------------------------------------

CORPUS = [
    "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think.<JOIN-1>7</JOIN-1>",
    "<ANSWER>7</ANSWER> the answer is seven, so we are done.",
    "Worker thinks about 3+4 and returns.<RETURN>7</RETURN>",
]


def build_tokenizer_dir(path: Path) -> Path:
    """A byte-level BPE tokenizer trained on a few lines, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tiny-model")


# -- the contract fixture --------------------------------------------------------------------------------

# sampling_params keys of SGLang 0.5.23 (reference, "sampling_params"), by the type the schema gate wants
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
    """FastAPI's 422 remapped by SGLang (reference, Errors, first row)."""
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
        if rep.paused:  # new requests block until /continue_generation (reference, pause semantics)
            await rep.resumed.wait()
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
        script = self.tok.encode(rep.script, add_special_tokens=False) + [self.eos_id]
        out: list[int] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        for tok in script:
            if len(out) >= max_new:
                break
            out.append(tok)
            text = self.tok.decode(out, skip_special_tokens=True)
            hit = next((p for p in patterns if re.search(p, text)), None)
            if hit is not None:  # order: stop string -> stop token / EOS -> length (0.5.20+)
                finish = {"type": "stop", "matched": hit}
                break
            if tok == self.eos_id:
                finish = {"type": "stop", "matched": self.eos_id}
                break
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
        meta = {
            "id": "rid", "finish_reason": finish, "prompt_tokens": len(ids), "weight_version": rep.weight_version,
            "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": len(out), "cached_tokens": cached,
            "weight_versions": [{"version": rep.weight_version, "start": 0, "end": len(out)}],
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
        if rep.parked:
            return PlainTextResponse("Flush cache failed.\n", 400)
        rep.cache.clear()
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n")

    async def update_weights(self, request: Request) -> Response:
        rep, body, err = await self._enter(request)
        if err:
            return err
        if not isinstance(body, dict) or "model_path" not in body:
            return bad_request("1 validation error: model_path Field required")
        if "missing" in body["model_path"]:
            msg = f"Failed to get weights iterator: {body['model_path']} (repository not found)."
            return JSONResponse({"success": False, "message": msg, "num_paused_requests": 0}, 400)
        rep.model_path = body["model_path"]
        version = body.get("weight_version")
        if version is not None:
            rep.weight_version = version
        if body.get("flush_cache", True):
            if rep.paused == "in_place" and rep.parked:
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


@dataclass
class Cluster:
    fake: FakeSGLang
    transport: RefusingTransport
    backend: SGLangBackend

    def calls(self, host: str, path: str | None = None) -> list[tuple[str, str, Any]]:
        return [c for c in self.fake.replica(host).calls if path is None or c[1] == path]


@pytest.fixture
async def cluster(tokenizer_dir: Path) -> AsyncIterator[Cluster]:
    from transformers import AutoTokenizer

    fake = FakeSGLang(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), ["r1", "r2"])
    transport = RefusingTransport(httpx.ASGITransport(app=fake.app))
    backend = SGLangBackend([R1, R2], tokenizer_dir, timeout_s=5.0, backoff_s=0.001, transport=transport)
    yield Cluster(fake, transport, backend)
    await backend.aclose()


def req(backend: SGLangBackend, prompt: str = "Find 3+4 please", **kw: Any) -> GenerateRequest:
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("stop_regex", ORGANIZER_STOP_REGEX)
    kw.setdefault("session", "episode-1")
    return GenerateRequest(input_ids=backend.encode(prompt), **kw)


# -- the fixture is as strict as the reference ------------------------------------------------------------


async def test_fixture_rejects_what_sglang_rejects(cluster: Cluster) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cluster.fake.app), base_url=R1) as c:
        r = await c.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 5}})
        assert r.status_code == 400 and r.json()["error"].startswith("unknown field `max_tokens`")
        r = await c.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 5.0}})
        assert r.status_code == 400 and "expected i64" in r.json()["error"]
        r = await c.post("/generate", json={"input_ids": []})
        assert r.status_code == 400 and r.json()["error"]["message"] == "input_ids cannot be empty."
        assert (await c.post("/pause_generation")).status_code == 400
        assert (await c.post("/pause_generation", json={"mode": "sideways"})).status_code == 400
        assert (await c.post("/continue_generation")).status_code == 400
        assert (await c.post("/update_weights_from_disk", json={})).status_code == 400
        assert (await c.get("/get_weight_version")).status_code == 404
        # the in_place cache-flush rule
        cluster.fake.replica("r1").parked = 2
        assert (await c.post("/pause_generation", json={"mode": "in_place"})).status_code == 200
        r = await c.post("/update_weights_from_disk", json={"model_path": "/m2"})
        assert r.status_code == 400 and "cache was not flushed" in r.json()["message"]
        assert (await c.post("/continue_generation", json={})).status_code == 200


# -- /generate ----------------------------------------------------------------------------------------------


async def test_is_a_model_backend(cluster: Cluster) -> None:
    assert isinstance(cluster.backend, ModelBackend)
    assert cluster.backend.model_id == "tiny-model"


async def test_request_body_is_tokens_and_accepted_sampling_keys_only(cluster: Cluster) -> None:
    b = cluster.backend
    request = req(b, sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=7), max_new_tokens=50)
    await b.generate(request)
    host = b.replica_for("episode-1").split("//")[1].split(":")[0]
    [(_, _, body)] = cluster.calls(host, "/generate")
    assert body == {
        "input_ids": request.input_ids,
        "sampling_params": {
            "max_new_tokens": 50,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "no_stop_trim": True,
            "stop_regex": ORGANIZER_STOP_REGEX,
            "sampling_seed": 7,
        },
    }
    assert "text" not in body
    # defaults: no seed -> no sampling_seed, no stop -> no stop_regex
    await b.generate(req(b, stop_regex=None))
    body = cluster.calls(host, "/generate")[-1][2]
    assert set(body["sampling_params"]) == {"max_new_tokens", "temperature", "top_p", "top_k", "no_stop_trim"}


async def test_stop_keeps_the_stop_text_and_its_tokens(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.script = "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think."
    result = await b.generate(req(b))
    assert result.finish is FinishReason.STOP
    assert result.matched == "</FORK-1>"
    assert result.text.endswith("</FORK-1>")
    assert result.text == b.decode(result.output_ids)
    assert result.text.startswith("Let me split the problem.<FORK-1>Find 3+4")


async def test_worker_stop_and_eos_and_length_and_abort(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.script = "Worker thinks about 3+4 and returns.<RETURN>7</RETURN> trailing"
    r = await b.generate(req(b, stop_regex=WORKER_STOP_REGEX))
    assert (r.finish, r.matched) == (FinishReason.STOP, "</RETURN>")
    for rep in cluster.fake.replicas.values():
        rep.script = "no tags at all"
    r = await b.generate(req(b))
    assert r.finish is FinishReason.EOS and r.matched is None
    assert r.text == "no tags at all"  # the EOS token decodes to nothing
    assert r.output_ids[-1] == cluster.fake.eos_id  # output_ids keep the stop token
    r = await b.generate(req(b, max_new_tokens=3))
    assert r.finish is FinishReason.LENGTH and len(r.output_ids) == 3
    cluster.fake.replica("r1").abort_next = cluster.fake.replica("r2").abort_next = True
    r = await b.generate(req(b))
    assert r.finish is FinishReason.ABORT


async def test_cached_tokens_and_weight_version_come_back(cluster: Cluster) -> None:
    b = cluster.backend
    first = await b.generate(req(b))
    assert first.cached_tokens == 0
    assert first.weight_version == "default" == b.weight_version
    second = await b.generate(
        GenerateRequest(b.encode("Find 3+4 please") + first.output_ids, 16, session="episode-1")
    )
    assert second.cached_tokens > 0  # same session, same replica: the prefix was cached


# -- sticky routing --------------------------------------------------------------------------------------


async def test_sticky_routing_over_two_replicas(cluster: Cluster) -> None:
    b = cluster.backend
    sessions = [f"episode-{i}" for i in range(24)]
    for _ in range(3):
        for s in sessions:
            await b.generate(req(b, prompt=f"Find 3+4 for {s}.", session=s, max_new_tokens=2))
    served: dict[str, list[str]] = {}  # host -> the session of every /generate it answered
    for host in ("r1", "r2"):
        for _, _, body in cluster.calls(host, "/generate"):
            served.setdefault(host, []).append(b.decode(body["input_ids"]).removeprefix("Find 3+4 for ")[:-1])
    assert set(served["r1"]) and set(served["r2"])  # both replicas serve
    assert not set(served["r1"]) & set(served["r2"])  # no session is split over replicas
    for host, got in served.items():
        assert all(got.count(s) == 3 for s in set(got))
        assert all(b.replica_for(s) == f"http://{host}:30000" for s in got)
    # the choice is the rendezvous order, independent of the URL list's order and of the process
    assert all(b.replica_for(s) == rendezvous_order([R2, R1], s)[0] for s in sessions)
    other = SGLangBackend([R2, R1], "unused", tokenizer=b.tokenizer, transport=cluster.transport)
    assert all(other.replica_for(s) == b.replica_for(s) for s in sessions)
    await other.aclose()


async def test_no_session_round_robins(cluster: Cluster) -> None:
    b = cluster.backend
    for _ in range(4):
        await b.generate(req(b, session=None, max_new_tokens=1))
    assert len(cluster.calls("r1", "/generate")) == len(cluster.calls("r2", "/generate")) == 2


async def test_refused_replica_fails_over_to_the_next_in_rendezvous_order(cluster: Cluster) -> None:
    b = cluster.backend
    primary, secondary = (u.split("//")[1].split(":")[0] for u in rendezvous_order([R1, R2], "episode-1"))
    cluster.transport.down[primary] = None
    result = await b.generate(req(b))
    assert result.finish is FinishReason.STOP
    assert cluster.transport.attempts[primary] == b.retries + 1
    assert len(cluster.calls(secondary, "/generate")) == 1


async def test_connection_errors_are_retried_with_backoff(cluster: Cluster) -> None:
    b = cluster.backend
    primary = b.replica_for("episode-1").split("//")[1].split(":")[0]
    cluster.transport.down[primary] = 2
    await b.generate(req(b))
    assert cluster.transport.attempts[primary] == 3
    assert len(cluster.calls(primary, "/generate")) == 1


# -- errors -------------------------------------------------------------------------------------------------


async def test_400_becomes_a_request_error_with_the_server_message(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.max_context = 4
    with pytest.raises(SGLangRequestError, match="longer than the model's context length"):
        await b.generate(req(b, prompt="a rather long prompt that has many tokens"))
    with pytest.raises(ValueError, match="empty"):
        await b.generate(GenerateRequest([], 5))
    with pytest.raises(ValueError, match="256"):
        await b.generate(req(b, stop_regex="|".join(f"</TAG-{i}>" for i in range(40))))


async def test_5xx_is_raised_without_retry(cluster: Cluster) -> None:
    b = cluster.backend
    primary = b.replica_for("episode-1").split("//")[1].split(":")[0]
    cluster.fake.replica(primary).fail_next_status = 503
    with pytest.raises(SGLangServerError, match="503"):
        await b.generate(req(b))
    assert cluster.transport.attempts[primary] == 1


async def test_timeout_names_the_server_and_the_knob(cluster: Cluster, tokenizer_dir: Path) -> None:
    slow = SGLangBackend([R1], tokenizer_dir, timeout_s=0.2, transport=cluster.transport)
    cluster.fake.replica("r1").delay_s = 2.0
    try:
        with pytest.raises(TimeoutError, match=r"r1:30000.*ASYNCTHINK_REQUEST_TIMEOUT_S"):
            await slow.generate(req(slow))
    finally:
        await slow.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_says_how_to_start_sglang(tokenizer_dir: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    b = SGLangBackend([url], tokenizer_dir, timeout_s=2.0, connect_timeout_s=1.0, retries=1, backoff_s=0.01)
    try:
        with pytest.raises(ConnectionError, match=r"sglang\.launch_server") as info:
            await b.generate(req(b))
        assert url in str(info.value)
        with pytest.raises(ConnectionError, match=r"sglang\.launch_server"):
            await b.check_server()
    finally:
        await b.aclose()


async def test_auth_headers_per_route_level(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    fake = FakeSGLang(
        AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True),
        ["r1"],
        api_key="k",
        admin_key="adm",
    )
    transport = httpx.ASGITransport(app=fake.app)
    wrong = SGLangBackend([R1], tokenizer_dir, transport=transport, api_key="nope")
    right = SGLangBackend([R1], tokenizer_dir, transport=transport, api_key="k", admin_api_key="adm")
    try:
        with pytest.raises(SGLangRequestError, match="unauthorized"):
            await wrong.generate(req(wrong))
        assert (await right.generate(req(right))).output_ids
        await right.hot_swap("/m/v2", weight_version="v2")
        assert right.weight_version == "v2"
    finally:
        await wrong.aclose()
        await right.aclose()


# -- health and model info ----------------------------------------------------------------------------------


async def test_check_server_reads_health_and_model_info(cluster: Cluster) -> None:
    b = cluster.backend
    cluster.fake.replica("r1").weight_version = "step-40"
    await b.check_server()
    assert b.weight_version == "step-40"
    for host in ("r1", "r2"):
        assert cluster.calls(host, "/health")
    assert cluster.calls("r1", "/model_info") and not cluster.calls("r1", "/get_model_info")
    cluster.fake.replica("r2").paused = "retract"
    with pytest.raises(ConnectionError, match="503"):
        await b.check_server()


# -- weight hot-swap ----------------------------------------------------------------------------------------


async def test_hot_swap_call_order_and_bodies(cluster: Cluster) -> None:
    b = cluster.backend
    await b.generate(req(b))
    await b.hot_swap("/ckpt/step-100", weight_version="step-100")
    for host in ("r1", "r2"):
        control = [(p, body) for _, p, body in cluster.calls(host) if p != "/generate"]
        assert control == [
            ("/pause_generation", {"mode": "retract"}),
            ("/update_weights_from_disk", {"model_path": "/ckpt/step-100", "weight_version": "step-100",
                                           "flush_cache": True}),
            ("/continue_generation", {"torch_empty_cache": True}),
        ]  # fmt: skip
        rep = cluster.fake.replica(host)
        assert rep.paused is None and rep.cache == []
    # replicas are swapped one after the other (the other keeps serving)
    r1_calls = [p for _, p, _ in cluster.calls("r1")]
    assert r1_calls[-1] == "/continue_generation"
    assert b.weight_version == "step-100"
    assert (await b.model_info(R2))["weight_version"] == "step-100"
    result = await b.generate(req(b))
    assert result.weight_version == "step-100" and result.cached_tokens == 0  # flushed with the update


async def test_hot_swap_in_place_does_not_flush_with_the_update(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.parked = 1  # a request frozen in the running batch
    await b.hot_swap("/ckpt/v3", weight_version="v3", pause_mode="in_place", flush_timeout_s=0)
    for host in ("r1", "r2"):
        update = next(body for _, p, body in cluster.calls(host) if p == "/update_weights_from_disk")
        assert update["flush_cache"] is False
        paths = [p for _, p, _ in cluster.calls(host)]
        assert paths == [
            "/pause_generation",
            "/update_weights_from_disk",
            "/continue_generation",
            "/flush_cache",
        ]
    assert b.weight_version == "v3"


async def test_failed_hot_swap_resumes_generation_and_keeps_the_version(cluster: Cluster) -> None:
    b = cluster.backend
    await b.generate(req(b))
    with pytest.raises(WeightUpdateError, match="repository not found"):
        await b.hot_swap("/ckpt/missing", weight_version="bad")
    rep = cluster.fake.replica("r1")
    assert [p for _, p, _ in rep.calls if p != "/generate"][-1] == "/continue_generation"
    assert rep.paused is None and rep.weight_version == "default"
    assert not cluster.calls("r2", "/pause_generation")  # stopped at the first failing replica
    assert b.weight_version == "default"


async def test_generate_waits_while_paused(cluster: Cluster) -> None:
    b = cluster.backend
    url = b.replica_for("episode-1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cluster.fake.app), base_url=url) as c:
        assert (await c.post("/pause_generation", json={"mode": "retract"})).status_code == 200
        task = asyncio.create_task(b.generate(req(b)))
        await asyncio.sleep(0.2)
        assert not task.done()
        assert (await c.post("/continue_generation", json={})).status_code == 200
    assert (await asyncio.wait_for(task, 2)).finish is FinishReason.STOP


async def test_bad_pause_mode_is_refused_locally(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="pause_mode"):
        await cluster.backend.hot_swap("/m", weight_version="v", pause_mode="sideways")  # type: ignore[arg-type]


# -- the registry's sglang: form ------------------------------------------------------------------------


def test_registry_opens_sglang_and_explains_bad_specs(tokenizer_dir: Path, tmp_path: Path) -> None:
    from shared.backends.registry import open_backend
    from shared.config import Settings

    settings = Settings(request_timeout_s=7.5)
    b = open_backend(f"sglang:{R1},{R2}?tokenizer={tokenizer_dir}", settings)
    assert isinstance(b, SGLangBackend)
    assert b.base_urls == [R1, R2] and b.timeout_s == 7.5 and b.model_id == "tiny-model"
    with pytest.raises(ValueError, match=r"\?tokenizer="):
        open_backend(f"sglang:{R1}", settings)
    with pytest.raises(FileNotFoundError, match="models/"):
        open_backend(f"sglang:{R1}?tokenizer={tmp_path / 'nope'}", settings)
    with pytest.raises(ValueError, match="accepted forms"):
        open_backend("vllm:http://x:1", settings)
    with pytest.raises(ValueError, match="accepted forms"):
        open_backend("sglang:r1:30000?tokenizer=/x", settings)
    with pytest.raises(FileNotFoundError, match=r"does-not-exist.*shipped model lives under models/"):
        open_backend(str(tmp_path / "does-not-exist"), settings)
