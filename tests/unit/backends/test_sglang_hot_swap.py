"""The SGLang hot swap with requests and episodes in flight, against the contract fixture.

``FakeSGLang`` with ``token_delay_s`` generates token by token and lets a pause reach the requests
already running (the reference's semantics): ``in_place`` freezes them and they resume on the new
weights, reporting both versions in ``meta_info.weight_versions``; ``abort`` ends them with finish
``abort`` and their partial output. These tests hold the client and the engine to:

* every result is labelled with its own response's versions (spans), never with the version this client
  swapped to, and an episode's segments say which weights produced their tokens;
* an aborted call is sent again (the engine), so a worker cut off by an ``abort`` pause finishes on the
  new weights instead of being joined with its partial text;
* ``/continue_generation`` is sent whenever a pause was attempted, whether the pause or the update failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.backends.base import GenerateRequest, GenerateResult, VersionSpan
from shared.backends.sglang import SGLangBackend, WeightUpdateError
from shared.engine import Engine
from shared.protocol import ORGANIZER_STOP_REGEX
from shared.tasks.base import Mode, Problem, Score
from shared.tasks.prompts import PromptStyle
from tests.fakes.sglang import FakeSGLang
from tests.fakes.tokenizer import build_tokenizer_dir

R1 = "http://r1:30000"
ORGANIZER = "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think.<JOIN-1>7</JOIN-1><ANSWER>7</ANSWER>"
WORKER = "Worker thinks about 3+4 and returns.<RETURN>7</RETURN>"


class SevenTask:
    """Short trained-style prompts; the answer is 7."""

    name = "seven"
    default_capacity = 2

    def problem_from_payload(self, payload: dict[str, Any], problem_id: str | None = None) -> Problem:
        return Problem("seven", problem_id or "p", payload)

    def organizer_prompt(self, problem: Problem, mode: Mode) -> str:
        return "Find 3+4 please"

    def worker_prompt(self, query: str) -> str:
        return f"W {query}"

    def score(self, problem: Problem, answer: str | None) -> Score:
        ok = (answer or "").strip() == "7"
        return Score(float(ok), int(ok), 1)

    def aggregate(self, answers: list[str | None]) -> str | None:
        return next((a for a in answers if a), None)


class Recording(SGLangBackend):
    """Keeps every result, tagged with who asked."""

    results: list[tuple[str, GenerateResult]]

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await super().generate(request)
        self.results.append((request.tag, result))
        return result


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tiny-model")


@pytest.fixture
async def served(tokenizer_dir: Path) -> AsyncIterator[tuple[FakeSGLang, Recording]]:
    from transformers import AutoTokenizer

    fake = FakeSGLang(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), ["r1"])
    rep = fake.replica("r1")
    rep.resume = True
    rep.token_delay_s = 0.01
    rep.script_for = lambda prompt: WORKER if prompt.startswith("W ") else ORGANIZER
    backend = Recording(
        [R1], tokenizer_dir, timeout_s=10.0, transport=httpx.ASGITransport(app=fake.app),
        prompt_style=PromptStyle.TRAINED,
    )  # fmt: skip
    backend.results = []
    yield fake, backend
    await backend.aclose()


async def _until_generated(fake: FakeSGLang, tokens: int, prompt_prefix: str = "") -> None:
    """Wait until a request whose prompt starts with ``prompt_prefix`` is generating and has produced
    ``tokens`` output ids (polled every 5 ms; fails after 10 s)."""
    rep = fake.replica("r1")
    for _ in range(2000):
        if any(fake.tok.decode(ids).startswith(prompt_prefix) and len(out) >= tokens for ids, out in rep.live):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"no request starting {prompt_prefix!r} generated {tokens} tokens in 10 s")


async def _when_worker_is_generating(fake: FakeSGLang, tokens: int = 4) -> None:
    """Wait until worker 1's request has produced ``tokens`` tokens and is still generating."""
    await _until_generated(fake, tokens, prompt_prefix="W ")


async def test_a_request_across_an_in_place_swap_reports_both_versions(served: Any) -> None:
    fake, backend = served
    rep = fake.replica("r1")
    request = GenerateRequest(backend.encode("Find 3+4 please"), 64, stop_regex=ORGANIZER_STOP_REGEX, session="e")
    running = asyncio.create_task(backend.generate(request))
    await _until_generated(fake, 6)
    await backend.hot_swap("/ckpt/v2", weight_version="v2", pause_mode="in_place", flush_timeout_s=0)
    result = await running
    assert result.weight_version == "v2"  # the version of its last token
    first, second = result.weight_versions
    assert first.version == "default" and first.start == 0 and 0 < first.end < len(result.output_ids)
    assert second == VersionSpan("v2", first.end, len(result.output_ids))
    assert result.versions == ["default", "v2"]
    # the swap's calls: continue sent, no flush with the update (the fixture answers 400 to that)
    paths = [p for _, p, _ in rep.calls if p != "/generate"]
    assert paths[:3] == ["/pause_generation", "/update_weights_from_disk", "/continue_generation"]


async def test_an_episode_in_flight_across_an_in_place_swap_labels_each_segment(served: Any) -> None:
    fake, backend = served
    episode = asyncio.create_task(Engine(backend, SevenTask()).run(Problem("seven", "p", {}), episode_id="ep"))
    await _when_worker_is_generating(fake)
    await backend.hot_swap("/ckpt/v2", weight_version="v2", pause_mode="in_place", flush_timeout_s=0)
    result = await episode
    assert result.status == "completed" and result.answer == "7"
    by_agent = {s.agent: s for s in result.segments}
    # the worker's one call ran across the swap: its tokens came from both weights
    [(_, worker_call)] = [(t, r) for t, r in backend.results if t == "1"]
    assert worker_call.weight_versions[0].version == "default"
    assert by_agent["1"].model_version == "default+v2"
    # the organizer decoded before the swap (its fork) and after it (its answer): both, in order
    organizer_calls = [r for t, r in backend.results if t == "organizer"]
    assert organizer_calls[0].versions[0] == "default" and organizer_calls[-1].versions == ["v2"]
    assert by_agent["organizer"].model_version == "default+v2"
    assert result.model_version == "default+v2"
    # a later episode is wholly v2
    after = await Engine(backend, SevenTask()).run(Problem("seven", "p", {}), episode_id="ep2")
    assert {s.model_version for s in after.segments} == {"v2"} and after.model_version == "v2"


async def test_a_worker_cut_off_by_an_abort_pause_is_sent_again_on_the_new_weights(served: Any) -> None:
    fake, backend = served
    episode = asyncio.create_task(Engine(backend, SevenTask()).run(Problem("seven", "p", {}), episode_id="ep"))
    await _when_worker_is_generating(fake)
    await backend.hot_swap("/ckpt/v2", weight_version="v2", pause_mode="abort")
    result = await episode
    worker_calls = [r for t, r in backend.results if t == "1"]
    assert [r.finish.value for r in worker_calls] == ["abort", "stop"]  # cut off, then sent again
    assert worker_calls[0].output_ids and worker_calls[0].weight_version == "default"
    worker = next(s for s in result.segments if s.agent == "1")
    assert worker.error is None and worker.returned == "7"
    assert worker.model_version == "v2"  # the partial output of the aborted call is not in the trace
    assert worker.completion_ids == worker_calls[1].output_ids
    assert result.status == "completed" and result.answer == "7"
    assert "<JOIN-1>7</JOIN-1>" in result.segments[0].text


async def test_a_failed_update_still_continues_generation(served: Any) -> None:
    fake, backend = served
    rep = fake.replica("r1")
    running = asyncio.create_task(
        backend.generate(GenerateRequest(backend.encode("Find 3+4 please"), 64, session="e"))
    )
    await _until_generated(fake, 4)
    with pytest.raises(WeightUpdateError, match="repository not found"):
        await backend.hot_swap("/ckpt/missing", weight_version="bad", pause_mode="in_place", flush_timeout_s=0)
    assert [p for _, p, _ in rep.calls if p != "/generate"] == [
        "/pause_generation", "/update_weights_from_disk", "/continue_generation",
    ]  # fmt: skip
    assert rep.paused is None and rep.weight_version == "default"
    result = await asyncio.wait_for(running, 5)  # the frozen request resumed, on the old weights
    assert result.versions == ["default"]
    assert backend.weight_version == "default"


async def test_a_failed_pause_still_sends_continue(served: Any, tokenizer_dir: Path) -> None:
    fake, _ = served

    class FailingPause(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.ASGITransport(app=fake.app)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/pause_generation":
                return httpx.Response(500, json={"object": "error", "message": "scheduler busy", "code": 500})
            return await self.inner.handle_async_request(request)

    backend = SGLangBackend([R1], tokenizer_dir, transport=FailingPause())
    try:
        with pytest.raises(WeightUpdateError, match="scheduler busy") as info:
            await backend.hot_swap("/ckpt/v2", weight_version="v2")
        assert info.value.updated == []
    finally:
        await backend.aclose()
    paths = [p for _, p, _ in fake.replica("r1").calls]
    assert paths == ["/continue_generation"]  # the pause never reached the fixture; continue did
    assert fake.replica("r1").weight_version == "default"


async def test_a_stale_response_does_not_undo_the_clients_swap(served: Any) -> None:
    fake, backend = served
    await backend.check_server()
    running = asyncio.create_task(
        backend.generate(GenerateRequest(backend.encode("Find 3+4 please"), 64, session="e"))
    )
    await _until_generated(fake, 3)
    await backend.hot_swap("/ckpt/v2", weight_version="v2", pause_mode="in_place", flush_timeout_s=0)
    await running
    assert backend.weight_version == "v2"
    assert await backend.sync_version() == {R1: "v2"}
