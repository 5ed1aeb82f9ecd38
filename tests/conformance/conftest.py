"""Fixtures for the conformance suites: every implementation of an interface, behind one fixture.

``bus_case``: every :class:`shared.bus.base.Bus`. The Redis variant is marked ``integration``. When the
server at ``ASYNCTHINK_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) cannot be reached the test is
skipped with the reason, except in CI (env ``CI`` set), where an unreachable Redis is a failure: CI must
start it.

``backend_case``: every :class:`shared.backends.base.ModelBackend`, each with the capabilities its tests
may rely on (see :class:`BackendUnderTest`): the transformers backend and the trainer's slot engine
(on CPU) over the tiny random model of ``tiny_model_dir``, the SGLang backend against ``FakeSGLang``
(two replicas), the OpenAI-compatible backend against ``FakeCompletions`` in vLLM mode and in hosted mode,
and the scripted backend. The fakes play a protocol script (``SCRIPT``); their ASGI transport turns an
exception inside the fake into a 500 answer, as a real server would, instead of raising it in the client.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.backends.base import GenerateRequest, ModelBackend
from shared.bus.base import Bus
from shared.bus.inprocess import InProcessBus
from tests.helpers import redis_bus_or_skip

REDIS_URL = (
    os.environ.get("ASYNCTHINK_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
)
MAX_DELIVERIES = 3


@dataclass
class BusUnderTest:
    bus: Bus
    prefix: str  # every stream a test uses starts with this, so tests never share keys

    def stream(self, name: str = "s") -> str:
        return f"{self.prefix}{name}"


@pytest.fixture(
    params=["inprocess", pytest.param("redis", marks=pytest.mark.integration)],
)
async def bus_case(request: pytest.FixtureRequest) -> AsyncIterator[BusUnderTest]:
    prefix = f"asyncthink-test:{uuid.uuid4().hex[:12]}:"
    if request.param == "inprocess":
        yield BusUnderTest(InProcessBus(max_deliveries=MAX_DELIVERIES), prefix)
        return
    bus = await redis_bus_or_skip(REDIS_URL, max_deliveries=MAX_DELIVERIES)
    try:
        yield BusUnderTest(bus, prefix)
    finally:
        await bus.delete_prefix(prefix)
        await bus.close()


# -- model backends ----------------------------------------------------------------------------------------

# what the scriptable backends (the fakes and the scripted backend) generate unless a test scripts them
SCRIPT = (
    "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think about 8*5 and 6 more."
    "<JOIN-1>7</JOIN-1> so the total is 47.<ANSWER>47</ANSWER> done."
)


@dataclass
class BackendUnderTest:
    """A backend and what its tests may expect of it (declared here, never tested by name)."""

    backend: ModelBackend
    # ids that end a request and come back as its last output id (empty: no EOS id comes back, as in
    # the scripted backend, whose script just ends, and in hosted mode, whose ids are re-encoded text)
    eos_ids: frozenset[int]
    # output_ids are the ids the model generated, not a re-tokenization of the text (hosted mode re-encodes)
    token_exact: bool = True
    # a greedy request gives the same result every time and in any company (alone or batched)
    deterministic: bool = True
    # a request whose input_ids are prompt + the k ids an earlier call generated (same session and tag)
    # continues: its ids are those a single call for 2k would have generated after the first k
    exact_continuation: bool = True
    # makes the backend generate this text next (the fakes and the scripted backend; None: a real model)
    set_script: Callable[[str], None] | None = None
    # makes the server answer the next /generate for this request with an HTTP status (HTTP backends)
    fail_next: Callable[[int, GenerateRequest], None] | None = None
    request_error: type[Exception] | None = None  # what a 4xx answer becomes
    server_error: type[Exception] | None = None  # what a 5xx answer becomes
    # the ids generated so far, counted where they are generated (the model or the fake server)
    tokens_generated: Callable[[], int] | None = None


@pytest.fixture(scope="session")
def fake_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fakes.tokenizer import build_tokenizer_dir

    return build_tokenizer_dir(tmp_path_factory.mktemp("fake-tok") / "tiny-model")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny model (fp32, eval) and its tokenizer, loaded once for the slot engine's cases."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def _fake_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _transformers_case(request: pytest.FixtureRequest) -> BackendUnderTest:
    from shared.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(request.getfixturevalue("tiny_model_dir"), max_batch=8)
    return BackendUnderTest(b, eos_ids=b.eos_ids, tokens_generated=lambda: b.stats["tokens"])


def _slot_engine_case(request: pytest.FixtureRequest) -> BackendUnderTest:
    from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig

    model, tokenizer = request.getfixturevalue("tiny_qwen2")
    config = SlotEngineConfig(max_slots=8, max_len=256, min_ctx_bucket=32)
    engine = SlotEngine(model, tokenizer, config, device="cpu")
    b = SlotEngineBackend(engine, tokenizer, model_id="tiny-test", weight_version="tiny-v1")
    return BackendUnderTest(b, eos_ids=engine.eos_ids, tokens_generated=lambda: engine.stats.tokens)


def _sglang_case(request: pytest.FixtureRequest) -> BackendUnderTest:
    import httpx

    from shared.backends.sglang import SGLangBackend, SGLangRequestError, SGLangServerError
    from tests.fakes.sglang import FakeSGLang

    tok_dir = request.getfixturevalue("fake_tokenizer_dir")
    fake = FakeSGLang(_fake_tokenizer(tok_dir), ["r1", "r2"])
    for rep in fake.replicas.values():
        rep.script, rep.resume = SCRIPT, True
    transport = httpx.ASGITransport(app=fake.app, raise_app_exceptions=False)
    b = SGLangBackend(
        ["http://r1:30000", "http://r2:30000"], tok_dir, timeout_s=10.0, backoff_s=0.001, transport=transport
    )

    def set_script(text: str) -> None:
        for rep in fake.replicas.values():
            rep.script = text

    def fail_next(status: int, req: GenerateRequest) -> None:
        fake.replica(httpx.URL(b.replica_for(req.session)).host).fail_next_status = status

    return BackendUnderTest(
        b,
        eos_ids=frozenset({fake.eos_id}),
        set_script=set_script,
        fail_next=fail_next,
        request_error=SGLangRequestError,
        server_error=SGLangServerError,
        tokens_generated=lambda: sum(rep.generated for rep in fake.replicas.values()),
    )


def _openai_case(request: pytest.FixtureRequest, *, hosted: bool) -> BackendUnderTest:
    import httpx

    from shared.backends.openai_compat import OpenAICompatBackend, OpenAIRequestError, OpenAIServerError
    from tests.fakes.openai import FakeCompletions

    tok_dir = request.getfixturevalue("fake_tokenizer_dir")
    fake = FakeCompletions(_fake_tokenizer(tok_dir), hosted=hosted)
    fake.script, fake.resume = SCRIPT, not hosted
    transport = httpx.ASGITransport(app=fake.app, raise_app_exceptions=False)
    mode: dict[str, Any] = (
        {"api_key": "sk-test", "token_prompts": False, "vllm_extensions": False} if hosted else {"max_fork_id": 4}
    )
    b = OpenAICompatBackend(
        "http://vllm:8000/v1", "tiny", tok_dir, timeout_s=10.0, backoff_s=0.001, transport=transport, **mode
    )

    def set_script(text: str) -> None:
        fake.script = text

    def fail_next(status: int, req: GenerateRequest) -> None:
        fake.fail_next_status = status

    return BackendUnderTest(
        b,
        # hosted mode re-encodes the streamed text: no EOS id comes back, and ids need not be the model's
        eos_ids=frozenset() if hosted else frozenset({fake.eos_id}),
        token_exact=not hosted,
        exact_continuation=not hosted,
        set_script=set_script,
        fail_next=fail_next,
        request_error=OpenAIRequestError,
        server_error=OpenAIServerError,
        tokens_generated=None if hosted else (lambda: fake.generated),
    )


def _scripted_case(request: pytest.FixtureRequest) -> BackendUnderTest:
    from shared.backends.scripted import ScriptedBackend

    script = [SCRIPT]
    b = ScriptedBackend(lambda agent, prompt: script[0])

    def set_script(text: str) -> None:
        script[0] = text

    # the script just ends (reported as EOS): no EOS id; a continuation is the same (session, tag)
    return BackendUnderTest(b, eos_ids=frozenset(), set_script=set_script)


class _EveryAgent(Mapping[str, str]):
    """A mapping script that gives every agent the same (settable) text."""

    def __init__(self, script: list[str]) -> None:
        self.script = script

    def __getitem__(self, agent: str) -> str:
        return self.script[0]

    def __contains__(self, agent: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _scripted_resumable_case(request: pytest.FixtureRequest) -> BackendUnderTest:
    from shared.backends.scripted import ScriptedBackend

    script = [SCRIPT]
    b = ScriptedBackend(_EveryAgent(script), resumable=True)

    def set_script(text: str) -> None:
        script[0] = text

    # the position in the script is read from the input: a continuation is any request whose input ends
    # with what was generated, in whatever session or process
    return BackendUnderTest(b, eos_ids=frozenset(), set_script=set_script)


BACKEND_CASES: dict[str, Callable[[pytest.FixtureRequest], BackendUnderTest]] = {
    "transformers": _transformers_case,
    "slot-engine": _slot_engine_case,
    "sglang": _sglang_case,
    "openai-vllm": lambda request: _openai_case(request, hosted=False),
    "openai-hosted": lambda request: _openai_case(request, hosted=True),
    "scripted": _scripted_case,
    "scripted-resumable": _scripted_resumable_case,
}


@pytest.fixture(params=list(BACKEND_CASES))
async def backend_case(request: pytest.FixtureRequest) -> AsyncIterator[BackendUnderTest]:
    case = BACKEND_CASES[request.param](request)
    try:
        yield case
    finally:
        await case.backend.aclose()
