"""A model backend over an OpenAI-compatible ``/v1/completions`` endpoint: vLLM, or a hosted model.

Two ways to talk, chosen by ``vllm_extensions``:

- **vLLM** (default). The prompt goes as a list of token ids (``token_prompts=True``), and vLLM's extra
  request fields ``return_token_ids`` and ``include_stop_str_in_output`` bring back the generated ids and
  keep the stop text, so this is token in, token out like the SGLang backend. The completions API has no
  regex stop, so the request's ``stop_regex`` is turned into literal ``stop`` strings: each ``\\d+`` in a
  protocol pattern is enumerated over fork ids 1..``max_fork_id`` (``</FORK-1>`` .. ``</FORK-N>``,
  ``<JOIN-1>`` .. ``<JOIN-N>``, plus ``</ANSWER>`` / ``</RETURN>``): 2N+1 strings for the organizer. vLLM
  sets no limit on their number; a fork id above N is not a stop, and the protocol parser then sees the
  tag one generation call late (the engine still handles it, at the cost of tokens decoded past it).
- **Hosted** (``vllm_extensions=False``). OpenAI's own API allows at most 4 stop strings and drops the
  matched stop from ``text`` without saying which one matched, so stops are applied here instead: the
  request streams, the text is searched with the regex as it arrives, and the stream is closed at the
  first match (the server stops generating when the connection closes). Text after the match in the same
  chunk is dropped. Output ids are then a re-tokenization of the text (``encode``), which can differ from
  the model's own tokens: good for serving and evaluation, not for RL training data. Prompts can be sent as
  text (``token_prompts=False``), decoded from ``input_ids``, for servers that take no token prompts.
  Setting ``max_stops`` makes a vLLM request with more stop strings than that use this mode too.

Finish reasons: ``length`` -> LENGTH; ``stop`` -> STOP when the stop pattern occurs in the output (its
text is ``matched``), else EOS; anything else (``abort``, ``content_filter``) -> ABORT. ``cached_tokens``
comes from ``usage.prompt_tokens_details.cached_tokens`` where the server reports it. The weight version
is the served model name (these APIs do not report one).

Every request has a timeout (connect and read, plus a total deadline); retries with exponential backoff
happen on connection errors only. Errors name the server and say how to fix the problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import httpx

from shared.backends.base import (
    FinishReason,
    FixedWeights,
    GenerateRequest,
    GenerateResult,
    TokenizerCodec,
    error_message,
    find_stop,
    stop_pattern,
)
from shared.backends.sglang import load_tokenizer
from shared.tasks.prompts import PromptStyle

log = logging.getLogger(__name__)

START_HINT = (
    "Start an OpenAI-compatible server (for vLLM: `vllm serve <model dir> --port 8000`) and point "
    "ASYNCTHINK_MODEL at it as openai:http://HOST:8000/v1#<served model name>?tokenizer=<model dir>."
)
_LITERAL = re.compile(r"(?:[^\\.^$*+?{}\[\]|()]|\\[^A-Za-z0-9])*")  # plain text; escapes of punctuation only


class OpenAIRequestError(ValueError):
    """The server refused the request (HTTP 4xx)."""


class OpenAIServerError(RuntimeError):
    """The server failed (HTTP 5xx) or answered something this client cannot read."""


def literal_stops(stop_regex: str, max_fork_id: int) -> list[str]:
    """Literal stop strings for a protocol stop pattern, ``\\d+`` enumerated over 1..``max_fork_id``.

    >>> literal_stops(r"</FORK-\\d+>|</ANSWER>", 2)
    ['</FORK-1>', '</FORK-2>', '</ANSWER>']
    """
    stops: list[str] = []
    for alt in stop_regex.split("|"):
        parts = alt.split(r"\d+")
        if not all(_LITERAL.fullmatch(p) for p in parts):
            raise ValueError(
                f"stop pattern {alt!r} is not a literal (with optional \\d+ for the fork id); "
                "the completions API only takes literal stop strings"
            )
        text = [re.sub(r"\\(.)", r"\1", p) for p in parts]
        if len(text) == 1:
            stops.append(text[0])
        elif len(text) == 2:
            stops += [f"{text[0]}{i}{text[1]}" for i in range(1, max_fork_id + 1)]
        else:
            raise ValueError(f"stop pattern {alt!r} has more than one \\d+")
    return stops


class OpenAICompatBackend(FixedWeights, TokenizerCodec):
    """:class:`shared.backends.base.ModelBackend` over ``POST {base_url}/completions``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer_dir: str | Path,
        *,
        api_key: str | None = None,
        token_prompts: bool = True,
        vllm_extensions: bool = True,
        max_stops: int | None = None,
        max_fork_id: int = 32,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        tokenizer: Any | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        prompt_style: PromptStyle = PromptStyle.PROTOCOL,
    ) -> None:
        if not model:
            raise ValueError("OpenAICompatBackend needs the served model name (the `model` of each request)")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = model
        self.token_prompts = token_prompts
        self.vllm_extensions = vllm_extensions
        self.max_stops = max_stops
        self.max_fork_id = max_fork_id
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir)
        self.prompt_style = prompt_style
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), headers=headers, transport=transport
        )

    @property
    def weight_version(self) -> str:
        return self.model

    def request_body(self, request: GenerateRequest) -> tuple[dict[str, Any], bool]:
        """(the JSON body, whether stops are applied here while streaming)."""
        if not request.input_ids:
            raise ValueError("input_ids cannot be empty")
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": [int(i) for i in request.input_ids]
            if self.token_prompts
            else self.decode(request.input_ids),
            "max_tokens": request.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        client_stops = not self.vllm_extensions
        if self.vllm_extensions:
            body["return_token_ids"] = True
            body["include_stop_str_in_output"] = True
            if s.top_k != -1:
                body["top_k"] = s.top_k
            if request.stop_regex:
                stops = literal_stops(request.stop_regex, self.max_fork_id)
                if self.max_stops is not None and len(stops) > self.max_stops:
                    client_stops = True
                else:
                    body["stop"] = stops
        if client_stops and request.stop_regex:
            body["stream"] = True
        return body, client_stops and bool(request.stop_regex)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        body, stream = self.request_body(request)
        if stream:
            text, finish_reason, usage = await self._stream_until_stop(body, request)
            return self._result(text, None, finish_reason, usage, request)
        data = await self._post(body)
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise OpenAIServerError(
                f"{self.base_url}/completions answered without choices: {str(data)[:300]}"
            ) from None
        ids = choice.get("token_ids") if self.vllm_extensions else None
        return self._result(
            str(choice.get("text") or ""), ids, choice.get("finish_reason"), data.get("usage"), request
        )

    def _result(
        self, text: str, ids: list[int] | None, reason: Any, usage: Any, request: GenerateRequest
    ) -> GenerateResult:
        output_ids = [int(i) for i in ids] if ids is not None else self.encode(text)
        if ids is not None:
            text = self.decode(output_ids)
        m = find_stop(text, stop_pattern(request.stop_regex))
        if reason == "length":
            finish, matched = FinishReason.LENGTH, None
        elif reason == "stop":
            finish, matched = (FinishReason.STOP, m.group(0)) if m else (FinishReason.EOS, None)
        else:
            finish, matched = FinishReason.ABORT, None
        details = (usage or {}).get("prompt_tokens_details") or {}
        return GenerateResult(
            output_ids=output_ids,
            text=text,
            finish=finish,
            matched=matched,
            cached_tokens=int(details.get("cached_tokens") or 0),
        )

    async def _stream_until_stop(
        self, body: dict[str, Any], request: GenerateRequest
    ) -> tuple[str, str, Any]:
        pattern = stop_pattern(request.stop_regex)
        text, reason, usage = "", "stop", None
        async with asyncio.timeout(self.timeout_s + 1.0):
            async with self._connect_with_retries(body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _raise_for(r, self.base_url)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise OpenAIRequestError(f"{self.base_url}/completions: {error_message(chunk)}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        before = len(text)
                        text += choice.get("text") or ""
                        m = find_stop(text, pattern, before)
                        if m:  # cut here; closing the stream cancels the generation
                            return text[: m.end()], "stop", usage
                        reason = choice.get("finish_reason") or reason
        return text, reason, usage

    def _connect_with_retries(self, body: dict[str, Any]) -> _RetryingStream:
        return _RetryingStream(self, body)

    async def _post(self, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}/completions"
        for attempt in range(self.retries + 1):
            try:
                async with asyncio.timeout(self.timeout_s + 1.0):
                    r = await self._client.post(url, json=body)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if attempt == self.retries:
                    raise ConnectionError(
                        f"{url} is unreachable after {attempt + 1} attempt(s) ({exc!r}). {START_HINT}"
                    ) from exc
                await asyncio.sleep(self.backoff_s * 2**attempt)
            except (httpx.TimeoutException, TimeoutError) as exc:
                raise TimeoutError(
                    f"{url} did not answer within {self.timeout_s:g} s; raise ASYNCTHINK_REQUEST_TIMEOUT_S for long generations"
                ) from exc
        _raise_for(r, self.base_url)
        return r.json()

    async def check_server(self) -> None:
        """The server answers ``GET /models`` and serves ``self.model``; ConnectionError otherwise."""
        try:
            r = await self._client.get(f"{self.base_url}/models")
        except httpx.TransportError as exc:
            raise ConnectionError(f"{self.base_url} is unreachable ({exc!r}). {START_HINT}") from exc
        _raise_for(r, self.base_url)
        served = [m.get("id") for m in (r.json().get("data") or [])]
        if self.model not in served:
            raise ConnectionError(f"{self.base_url} does not serve model {self.model!r}; it serves {served}")

    async def aclose(self) -> None:
        await self._client.aclose()


class _RetryingStream:
    """``async with``: open a streaming POST, retrying connection errors with backoff."""

    def __init__(self, backend: OpenAICompatBackend, body: dict[str, Any]) -> None:
        self.b, self.body = backend, body
        self._cm: Any = None

    async def __aenter__(self) -> httpx.Response:
        url = f"{self.b.base_url}/completions"
        for attempt in range(self.b.retries + 1):
            self._cm = self.b._client.stream("POST", url, json=self.body)
            try:
                return await self._cm.__aenter__()  # type: ignore[no-any-return]
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if attempt == self.b.retries:
                    raise ConnectionError(
                        f"{url} is unreachable after {attempt + 1} attempt(s) ({exc!r}). {START_HINT}"
                    ) from exc
                await asyncio.sleep(self.b.backoff_s * 2**attempt)
            except httpx.TimeoutException as exc:
                raise TimeoutError(f"{url} did not answer within {self.b.timeout_s:g} s") from exc
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc: Any) -> None:
        await self._cm.__aexit__(*exc)


def _raise_for(r: httpx.Response, base_url: str) -> None:
    if r.status_code < 400:
        return
    try:
        data: Any = r.json()
    except ValueError:
        data = r.text
    if r.status_code == 401:
        raise OpenAIRequestError(f"{base_url} refused the request: unauthorized (check the API key)")
    if r.status_code < 500:
        raise OpenAIRequestError(
            f"{base_url}/completions rejected the request with {r.status_code}: {error_message(data)}"
        )
    raise OpenAIServerError(f"{base_url}/completions failed with {r.status_code}: {error_message(data)}")
