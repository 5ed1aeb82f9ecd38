"""The production model backend: SGLang's native HTTP API, token in, token out, over one or more replicas.

Follows SGLang 0.5.23's native HTTP API as its sources define it; the parts used:

- *POST /generate - Request*: the prompt goes as ``input_ids`` only (never ``text``, which would win over
  ``input_ids`` and re-tokenize); an empty prompt is refused here, as the server would answer 400.
- *sampling_params*: unknown keys are rejected with 400 since 0.5.22, and types are strict, so only
  ``max_new_tokens`` (int), ``stop_regex`` (one pattern of at most 256 bytes), ``temperature``, ``top_p``,
  ``top_k``, ``sampling_seed`` and ``no_stop_trim: true`` are sent; ``no_stop_trim`` keeps the stop text
  in ``text``, and ``output_ids`` keep the stop tokens either way. The pattern is compiled here first, so
  an invalid one raises ``re.error`` in the caller instead of being sent.
- *priority*: a request's :attr:`GenerateRequest.priority` (the critical path first: the organizer, then
  workers a join waits for, then the others) goes as the top-level ``priority`` field, an int; SGLang
  schedules by it when started with ``--enable-priority-scheduling`` (larger values first, its default;
  ``--schedule-low-priority-values-first`` would invert the order) and ignores it otherwise.
- *Non-streaming response*: ``output_ids``; ``meta_info.finish_reason`` mapped as
  ``stop`` with a string ``matched`` (which is the *pattern* for a regex) -> STOP, ``stop`` with an integer
  ``matched`` (a token id; only EOS, as no ``stop_token_ids`` are sent) -> EOS, ``length`` -> LENGTH,
  ``abort`` -> ABORT; ``cached_tokens``, ``completion_tokens``. The matched *text* is found here by
  searching the pattern in the decoded output.
- *Weight versions*: every result is labelled with its own response's ``meta_info.weight_version`` (the
  version of its last token), never with what this client last swapped to; a response that lived
  through an in-place or retract swap also lists ``meta_info.weight_versions`` spans
  (``{"version", "start", "end"}`` over output positions, servers since 0.5.20), which become
  :attr:`GenerateResult.weight_versions`, so the tokens generated before the swap keep the old label.
  An ``abort`` pause ends in-flight requests with finish ABORT and their partial output; the engine
  retries or reports such a call (:mod:`shared.agents`), it never treats it as finished.
- *Errors*: a 400 body is ``{"error": str}`` (schema gate), ``{"error": {"message"}}`` (ValueError) or
  ``{"object": "error", "message"}`` (bad JSON); all become :class:`SGLangRequestError`.
- *Endpoints*: ``GET /health`` (200 once the engine answers; 503 while starting or paused) for
  :meth:`SGLangBackend.check_server`; ``GET /model_info`` (not the deprecated ``/get_model_info``) for the
  current ``weight_version``; ``/flush_cache``; API keys as ``Authorization: Bearer``, the admin key on
  admin routes.
- *Weights, pause and abort semantics*: the hot swap is ``/pause_generation`` ``{"mode": ...}`` ->
  ``/update_weights_from_disk`` ``{"model_path", "weight_version", "flush_cache"}`` ->
  ``/continue_generation`` ``{"torch_empty_cache": true}`` (pause and continue *require* a JSON body).
  Cache-flush rule: during an ``in_place`` pause with parked requests an update with ``flush_cache: true``
  answers 400, so ``in_place`` sends ``flush_cache: false`` and flushes afterwards on a best-effort basis
  (``/flush_cache?timeout=S`` succeeds only once the scheduler is idle); ``retract`` (the default here)
  and ``abort`` flush with the update. Continue is sent whenever a pause was attempted, even when the
  pause or the update failed (its own failure is reported without hiding the first error), so a replica
  is never left paused by this client.

Routing: a request with a ``session`` (the episode id) always goes to the same replica, chosen by
rendezvous hashing (sha256 of URL and session), so its growing prefix stays in that replica's radix cache
and adding a replica moves only the sessions that now hash to it. Without a session, replicas take turns.
When the chosen replica refuses connections after the retries, the next replica in that session's
rendezvous order is tried (the cached prefix is lost, the episode goes on).

Limits: no streaming, no logprobs, one prompt per request (the engine's requests are independent; the
server batches them). Retries, with exponential backoff, happen only on connection errors (refused,
connect timeout, dropped connection); a 4xx/5xx answer or a read timeout is raised at once. A paused
server holds ``/generate`` until it continues, which a client sees as latency, or as a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx

from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    TokenizerCodec,
    VersionSpan,
    WeightSource,
    WeightUpdate,
    check_source,
    error_message,
    find_stop,
    stop_pattern,
)
from shared.tasks.prompts import PromptStyle

log = logging.getLogger(__name__)

PauseMode = Literal["abort", "retract", "in_place"]
MAX_STOP_REGEX_BYTES = 256  # SGLang's sampling_params: each stop_regex pattern <= 256 bytes
START_HINT = (
    "Start SGLang with `python -m sglang.launch_server --model-path <model dir> --host 0.0.0.0 "
    "--port 30000` (or `docker compose --profile gpu up -d sglang`), wait for GET /health to answer 200, "
    "and point ASYNCTHINK_MODEL at it as sglang:http://HOST:30000."
)


class SGLangRequestError(ValueError):
    """SGLang refused a request (HTTP 4xx): the request is wrong and retrying will not help."""

    def __init__(self, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.body = body  # the decoded error body, as SGLang sent it


class SGLangServerError(RuntimeError):
    """SGLang answered with a 5xx or with a body this client cannot read."""


class WeightUpdateError(RuntimeError):
    """A weight hot-swap failed on a replica (generation there was resumed on the old weights).

    ``updated`` lists the replicas swapped before the failure (they serve the new version now).
    """

    def __init__(self, message: str, *, updated: list[str] | None = None) -> None:
        super().__init__(message)
        self.updated = list(updated or [])


def load_tokenizer(tokenizer_dir: str | Path) -> Any:
    """A Hugging Face tokenizer from a local directory (never the hub)."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist: pass the directory of the model SGLang serves "
            "(the shipped model lives under models/)"
        )
    from transformers import AutoTokenizer  # heavy import, only when a backend is built

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def rendezvous_order(urls: list[str], key: str) -> list[str]:
    """Replicas in the order ``key`` prefers them: stable across processes and restarts."""
    return sorted(urls, key=lambda u: hashlib.sha256(f"{u}\x00{key}".encode()).digest(), reverse=True)


class SGLangBackend(TokenizerCodec):
    """:class:`shared.backends.base.ModelBackend` over SGLang replicas (native HTTP API, 0.5.23)."""

    weight_sources = frozenset({WeightSource.PATH})  # the servers load a checkpoint directory
    remote_weights = True  # the weights live in servers other clients share: swap them from one place

    def __init__(
        self,
        base_urls: list[str],
        tokenizer_dir: str | Path,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        health_timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        model_id: str | None = None,
        tokenizer: Any | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        prompt_style: PromptStyle = PromptStyle.PROTOCOL,
    ) -> None:
        if not base_urls:
            raise ValueError("SGLangBackend needs at least one base URL, e.g. http://127.0.0.1:30000")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ValueError(f"duplicate SGLang URLs: {base_urls}")
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir)
        self.prompt_style = prompt_style
        self.model_id = model_id or Path(tokenizer_dir).name
        self._api_key = api_key
        self._admin_key = admin_api_key or api_key
        self._weight_version = "unknown"  # until a response or check_server() tells
        self._epoch = 0  # bumped when this client learns the version itself (swap, model_info)
        self.swap_pause_mode: PauseMode = "retract"  # how update_weights pauses generation
        self._turn = itertools.count()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), transport=transport
        )

    # -- ModelBackend ----------------------------------------------------------------------------------

    @property
    def weight_version(self) -> str:
        return self._weight_version

    def replica_for(self, session: str | None) -> str:
        """The replica a session is pinned to (round robin without a session)."""
        if session is None:
            return self.base_urls[next(self._turn) % len(self.base_urls)]
        return rendezvous_order(self.base_urls, session)[0]

    def sampling_params(self, request: GenerateRequest) -> dict[str, Any]:
        """The ``sampling_params`` object for a request: only keys SGLang 0.5.23 accepts, strict types."""
        if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {request.max_new_tokens!r}")
        if request.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {request.max_new_tokens}")
        s = request.sampling
        params: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "temperature": float(s.temperature),
            "top_p": float(s.top_p),
            "top_k": int(s.top_k),
            "no_stop_trim": True,
        }
        if request.stop_regex:
            if len(request.stop_regex.encode()) > MAX_STOP_REGEX_BYTES:
                raise ValueError(
                    f"stop_regex is {len(request.stop_regex.encode())} bytes; SGLang allows at most "
                    f"{MAX_STOP_REGEX_BYTES} per pattern"
                )
            stop_pattern(request.stop_regex)  # a bad pattern raises re.error here, never reaching the server
            params["stop_regex"] = request.stop_regex
        if s.seed is not None:
            params["sampling_seed"] = int(s.seed)
        return params

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if not request.input_ids:
            raise ValueError("input_ids cannot be empty (SGLang answers 400 for an empty prompt)")
        body: dict[str, Any] = {
            "input_ids": [int(i) for i in request.input_ids],
            "sampling_params": self.sampling_params(request),
        }
        if request.priority is not None:
            body["priority"] = int(request.priority)
        order = (
            rendezvous_order(self.base_urls, request.session)
            if request.session is not None
            else [self.replica_for(None)]
        )
        last: ConnectionError | None = None
        epoch = self._epoch
        for n, url in enumerate(order):
            try:
                retries = self.retries if n == 0 else 0
                data = await self._request("POST", url, "/generate", body, admin=False, retries=retries)
            except ConnectionError as exc:
                last = exc
                if n + 1 < len(order):
                    log.warning("%s; session %s moves to %s", exc, request.session, order[n + 1])
                continue
            return self._result(data, request, url, epoch)
        assert last is not None
        raise last

    def _result(self, data: Any, request: GenerateRequest, url: str, epoch: int = -1) -> GenerateResult:
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, Mapping) or not isinstance(data.get("output_ids"), list):
            raise SGLangServerError(
                f"SGLang at {url} answered /generate without output_ids: {str(data)[:300]}"
            )
        output_ids = [int(i) for i in data["output_ids"]]
        meta = data.get("meta_info") or {}
        text = self.decode(output_ids)
        finish, matched = self._finish(meta.get("finish_reason"), text, request)
        if meta.get("completion_tokens") not in (None, len(output_ids)):
            log.warning(
                "SGLang at %s: completion_tokens=%s but %d output_ids",
                url,
                meta["completion_tokens"],
                len(output_ids),
            )
        version = meta.get("weight_version")
        spans = _version_spans(meta.get("weight_versions"), len(output_ids))
        if version is not None and epoch == self._epoch:
            # learn the server's version from a request sent since this client last set it (a response
            # that was in flight across our own swap must not put the old label back)
            self._weight_version = str(version)
        return GenerateResult(
            output_ids=output_ids,
            text=text,
            finish=finish,
            matched=matched,
            cached_tokens=int(meta.get("cached_tokens") or 0),
            weight_version=None if version is None else str(version),
            weight_versions=spans if len({s.version for s in spans}) > 1 else (),
        )

    def _finish(self, reason: Any, text: str, request: GenerateRequest) -> tuple[FinishReason, str | None]:
        kind = reason.get("type") if isinstance(reason, Mapping) else None
        if kind == "stop":
            if isinstance(reason.get("matched"), int):  # a token id: EOS (we send no stop_token_ids)
                return FinishReason.EOS, None
            pattern = stop_pattern(request.stop_regex)
            m = find_stop(text, pattern)
            return FinishReason.STOP, (m.group(0) if m else None)
        if kind == "length":
            return FinishReason.LENGTH, None
        if kind != "abort":
            log.warning("SGLang returned an unknown finish_reason %r; treating it as abort", reason)
        return FinishReason.ABORT, None

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- server checks and control ---------------------------------------------------------------------

    async def check_server(self) -> None:
        """Every replica answers ``/health`` with 200; learn the weight version from ``/model_info``.

        Raises ConnectionError, saying how to start SGLang, when a replica is down, starting or paused.
        ``/health`` makes the engine produce a token, so it takes a second or more.
        """
        for url in self.base_urls:
            try:
                r = await self._client.get(
                    f"{url}/health", timeout=self.health_timeout_s, headers=self._headers(False)
                )
            except httpx.TransportError as exc:
                raise ConnectionError(f"SGLang at {url} is unreachable ({exc!r}). {START_HINT}") from exc
            if r.status_code != 200:
                raise ConnectionError(
                    f"SGLang at {url} answered /health with {r.status_code}: it is still starting, paused "
                    f"for a weight update, or unhealthy. {START_HINT}"
                )
        await self.sync_version()

    async def sync_version(self) -> dict[str, str | None]:
        """Every replica's current ``weight_version`` (``GET /model_info``); this client's
        ``weight_version`` becomes the first replica's. For a client whose servers were swapped by someone
        else (the trainer's publisher)."""
        versions: dict[str, str | None] = {}
        for url in self.base_urls:
            info = await self.model_info(url)
            v = info.get("weight_version")
            versions[url] = None if v is None else str(v)
        first = versions[self.base_urls[0]]
        if first is not None:
            self._weight_version = first
            self._epoch += 1
        return versions

    async def model_info(self, url: str | None = None) -> dict[str, Any]:
        """``GET /model_info`` of one replica (the first by default)."""
        data = await self._request("GET", url or self.base_urls[0], "/model_info", None, admin=False)
        if not isinstance(data, dict):
            raise SGLangServerError(f"SGLang /model_info answered {str(data)[:200]!r}")
        return data

    async def flush_cache(self, url: str, *, timeout_s: float = 0.0) -> bool:
        """``POST /flush_cache?timeout=S``: True when flushed, False when requests were still running."""
        try:
            await self._request("POST", url, f"/flush_cache?timeout={timeout_s:g}", None, admin=True)
        except SGLangRequestError:
            return False
        return True

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load ``update.path`` on every replica (:meth:`hot_swap` with ``swap_pause_mode``)."""
        check_source(self, update)
        assert update.path is not None
        await self.hot_swap(update.path, weight_version=update.version, pause_mode=self.swap_pause_mode)

    async def hot_swap(
        self,
        model_path: str,
        *,
        weight_version: str,
        pause_mode: PauseMode = "retract",
        load_format: str | None = None,
        flush_timeout_s: float = 30.0,
    ) -> dict[str, float]:
        """Hot-swap weights on every replica, one at a time (the others keep serving meanwhile).

        Per replica: pause -> update (with ``weight_version``) -> continue, continue always sent.
        Returns each replica's seconds from the pause request to the continue answer (the time its
        generation was held). Raises :class:`WeightUpdateError` naming the replica and SGLang's message
        on the first failure; replicas swapped before it keep the new version (``error.updated``).
        """
        if pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_mode must be abort, retract or in_place, got {pause_mode!r}")
        flush_with_update = pause_mode != "in_place"  # SGLang's cache-flush rule
        update: dict[str, Any] = {
            "model_path": model_path,
            "weight_version": weight_version,
            "flush_cache": flush_with_update,
        }
        if load_format is not None:
            update["load_format"] = load_format
        paused: dict[str, float] = {}
        for url in self.base_urls:
            t0 = time.perf_counter()
            answer: dict[str, Any] = {}
            error: BaseException | None = None
            try:
                await self._control(url, "/pause_generation", {"mode": pause_mode})
                answer = await self._control(url, "/update_weights_from_disk", update, ok_on_400=True)
            except Exception as exc:  # continue below all the same, then report this
                error = exc
            try:
                await self._control(url, "/continue_generation", {"torch_empty_cache": True})
            except Exception as exc:
                log.error("SGLang at %s: /continue_generation failed (%s); the replica may stay paused", url, exc)
                if error is None:
                    error = exc
            paused[url] = time.perf_counter() - t0
            updated = [u for u in self.base_urls if u in paused and u != url]
            if error is not None:
                raise WeightUpdateError(
                    f"SGLang at {url}: weight update to {weight_version} ({model_path}) failed: {error}; "
                    f"generation was resumed there on version {self._weight_version}",
                    updated=updated,
                ) from error
            if not answer.get("success"):
                raise WeightUpdateError(
                    f"SGLang at {url} did not load {model_path}: {answer.get('message', answer)}; it keeps "
                    f"serving version {self._weight_version}",
                    updated=updated,
                )
            if not flush_with_update and not await self.flush_cache(url, timeout_s=flush_timeout_s):
                log.warning(
                    "SGLang at %s: radix cache not flushed after an in_place update (requests kept running); "
                    "cached prefixes computed with the old weights may be reused until it is flushed",
                    url,
                )
        self._weight_version = weight_version
        self._epoch += 1
        return paused

    async def _control(
        self, url: str, path: str, body: dict[str, Any], *, ok_on_400: bool = False
    ) -> dict[str, Any]:
        try:
            data = await self._request("POST", url, path, body, admin=True)
        except SGLangRequestError as exc:
            if ok_on_400 and isinstance(exc.body, dict) and "success" in exc.body:
                return exc.body
            raise
        return data if isinstance(data, dict) else {}

    # -- HTTP --------------------------------------------------------------------------------------------

    def _headers(self, admin: bool) -> dict[str, str]:
        key = self._admin_key if admin else self._api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _request(
        self,
        method: str,
        url: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        admin: bool,
        retries: int | None = None,
    ) -> Any:
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                async with asyncio.timeout(self.timeout_s + 1.0):  # a total deadline, not only per read
                    r = await self._client.request(
                        method, f"{url}{path}", json=body, headers=self._headers(admin)
                    )
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if attempt == retries:
                    raise ConnectionError(
                        f"SGLang at {url} refused or dropped the connection for {path} after {attempt + 1} "
                        f"attempt(s) ({exc!r}). {START_HINT}"
                    ) from exc
                await asyncio.sleep(self.backoff_s * 2**attempt)
            except (httpx.TimeoutException, TimeoutError) as exc:
                raise TimeoutError(
                    f"SGLang at {url} did not answer {path} within {self.timeout_s:g} s (paused for a weight "
                    "update, overloaded, or max_new_tokens too large); raise ASYNCTHINK_REQUEST_TIMEOUT_S "
                    "if generations are long"
                ) from exc
        return _body(r, url, path)


def _version_spans(raw: Any, n_output: int) -> tuple[VersionSpan, ...]:
    """``meta_info.weight_versions`` as spans (merged where one version continues); () when absent or
    unreadable (then ``weight_version`` labels the whole output)."""
    if not isinstance(raw, list) or not raw:
        return ()
    spans: list[VersionSpan] = []
    try:
        for item in raw:
            span = VersionSpan(str(item["version"]), int(item["start"]), int(item["end"]))
            if span.end < span.start:
                return ()
            if spans and spans[-1].version == span.version and spans[-1].end == span.start:
                spans[-1] = VersionSpan(span.version, spans[-1].start, span.end)
            else:
                spans.append(span)
    except (KeyError, TypeError, ValueError):
        log.warning("SGLang sent unreadable weight_versions %r; labelling by weight_version", raw)
        return ()
    if spans[-1].end > n_output:
        log.warning("SGLang weight_versions end at %d but %d output_ids", spans[-1].end, n_output)
    return tuple(spans)


def _body(r: httpx.Response, url: str, path: str) -> Any:
    try:
        data: Any = r.json() if r.content else None
    except ValueError:
        data = r.text
    if r.status_code < 400:
        return data
    message = error_message(data)
    if r.status_code == 401:
        raise SGLangRequestError(
            f"SGLang at {url} refused {path}: unauthorized (set the API key / admin API key)"
        )
    if r.status_code < 500:
        raise SGLangRequestError(f"SGLang at {url} rejected {path} with {r.status_code}: {message}", data)
    raise SGLangServerError(f"SGLang at {url} failed on {path} with {r.status_code}: {message}")
