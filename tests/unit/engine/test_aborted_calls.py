"""Calls a backend aborts (finish ABORT): resent from the same prefix, and a cut-off worker is an error.

An ``abort`` pause (SGLang's weight swap) ends every running request with its partial output. The agent
loop must never treat that partial text as a finished call: it drops it and sends the call again (up to
``abort_retries`` times); once the retries run out a worker reports an error outcome instead of a
takeaway, and its join injects the error text.
"""

from __future__ import annotations

import asyncio

from shared.backends.base import FinishReason, GenerateRequest, GenerateResult
from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine
from tests.unit.engine.test_engine import PROBLEM, EchoTask

ORGANIZER = "<FORK-1>q</FORK-1>think<JOIN-1><ANSWER>42</ANSWER>"
WORKER = "worker thinks<RETURN>r</RETURN>"


class AbortingWorker(ScriptedBackend):
    """Aborts the first ``aborts`` calls of worker 1 after a few tokens (its partial output comes back)."""

    def __init__(self, aborts: int) -> None:
        super().__init__({"organizer": ORGANIZER, "1": WORKER})
        self.aborts = aborts
        self.worker_calls = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if request.tag == "1":
            self.worker_calls += 1
            if self.aborts > 0:
                self.aborts -= 1
                partial = [ord(c) for c in "worker thi"]
                return GenerateResult(partial, "worker thi", FinishReason.ABORT, weight_version="old")
        return await super().generate(request)


def test_an_aborted_worker_call_is_sent_again_and_its_partial_output_dropped() -> None:
    backend = AbortingWorker(aborts=1)
    result = asyncio.run(Engine(backend, EchoTask()).run(PROBLEM, episode_id="ep"))
    assert result.status == "completed" and result.answer == "42"
    assert backend.worker_calls == 2
    worker = next(s for s in result.segments if s.agent == "1")
    assert worker.error is None and worker.returned == "r"
    assert worker.text == WORKER  # the aborted call's partial text is not in the trace
    assert worker.model_version == "scripted"  # only the resent call's tokens are recorded
    organizer = result.segments[0]
    assert "<JOIN-1>r</JOIN-1>" in organizer.text


def test_a_worker_cut_off_after_its_retries_is_an_error_outcome_never_a_result() -> None:
    backend = AbortingWorker(aborts=10)
    engine = Engine(backend, EchoTask())
    result = asyncio.run(engine.run(PROBLEM, episode_id="ep"))
    assert backend.worker_calls == engine.runner.abort_retries + 1
    worker = next(s for s in result.segments if s.agent == "1")
    assert worker.error is not None and "aborted" in worker.error
    assert worker.returned is None and worker.completion_ids == []  # nothing of the cut-off output
    organizer = result.segments[0]
    joined = organizer.text.split("<JOIN-1>")[1].split("</JOIN-1>")[0]
    assert joined.startswith("[worker 1 failed: backend aborted") and "worker thi" not in joined
    assert result.answer == "42"  # the organizer went on with the error text, as after a timeout


def test_without_retries_the_first_abort_ends_the_worker() -> None:
    backend = AbortingWorker(aborts=1)
    engine = Engine(backend, EchoTask())
    engine.runner.abort_retries = 0
    result = asyncio.run(engine.run(PROBLEM, episode_id="ep"))
    assert backend.worker_calls == 1
    worker = next(s for s in result.segments if s.agent == "1")
    assert worker.error == "backend aborted the request (1 attempts)"


def test_an_organizer_cut_off_after_its_retries_fails_the_episode() -> None:
    class Aborting(ScriptedBackend):
        calls = 0

        async def generate(self, request: GenerateRequest) -> GenerateResult:
            self.calls += 1
            return GenerateResult([65], "A", FinishReason.ABORT)

    backend = Aborting({})
    result = asyncio.run(Engine(backend, EchoTask()).run(PROBLEM))
    assert result.status == "failed" and backend.calls == 3
    assert result.segments[0].completion_ids == []
