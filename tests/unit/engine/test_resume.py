"""Resuming an organizer from a checkpoint gives the episode an uninterrupted run gives, decoding only
what came after the checkpoint (issue 13: an organizer restart used to re-run every episode from scratch).

For each scripted scenario, one uninterrupted run records every checkpoint the engine hands to its
checkpointer (after each fork, when each join starts waiting, after each join's result). Then, for every
checkpoint, a fresh engine on a fresh backend (as in a restarted process) resumes from it; the result must
equal the uninterrupted one (status, answer, T, η, timeline, every segment's ids and mask, format errors),
and the organizer must decode exactly the tokens the checkpoint did not hold.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from shared.backends.base import FinishReason, GenerateRequest, GenerateResult
from shared.backends.scripted import CodePoints, ScriptedBackend, script_position
from shared.engine import Engine, EngineConfig, EpisodeResult, ListSink
from shared.messages import SegmentRecord, WorkerOutcome, WorkerTask
from shared.tasks.base import Mode
from tests.unit.engine.test_engine import PROBLEM, EchoTask

SCRIPTS: dict[str, dict[str, str]] = {
    "fork_join": {
        "organizer": "Two ways.<FORK-1>find a product</FORK-1>Sum all first.<JOIN-1>So<ANSWER>42</ANSWER>",
        "1": "2*3 is 6 and 6+4 is 10, done.<RETURN>2*3+4</RETURN>",
    },
    "two_workers_capacity_3": {
        "organizer": "<FORK-1>products</FORK-1><FORK-2>sums</FORK-2>wait.<JOIN-1><JOIN-2>then<ANSWER>42</ANSWER>",
        "1": "(1+4)*2 works<RETURN>(1+4)*2</RETURN>",
        "2": "4*3 is 12, minus 2 gives 10, checked twice<RETURN>4*3-2</RETURN>",
    },
    "fork_after_join": {
        "organizer": "<FORK-1>a</FORK-1>x<JOIN-1>y<FORK-2>b</FORK-2>z<JOIN-2><FORK-3>c</FORK-3><JOIN-3><ANSWER>42</ANSWER>",
        "1": "one<RETURN>1</RETURN>",
        "2": "two two<RETURN>2</RETURN>",
        "3": "three three three<RETURN>3</RETURN>",
    },
    "unjoined_worker": {  # a worker still running at the answer: cancelled, in both runs
        "organizer": "<FORK-1>q</FORK-1><FORK-2>r</FORK-2><JOIN-1><ANSWER>42</ANSWER>",
        "1": "fine<RETURN>1</RETURN>",
        "2": "x" * 400 + "<RETURN>2</RETURN>",
    },
    "format_error_after_join": {
        "organizer": "<FORK-1>q</FORK-1><JOIN-1>then<JOIN-1>",
        "1": "w<RETURN>1</RETURN>",
    },
}
CAPACITY = {"two_workers_capacity_3": 3, "unjoined_worker": 3}


class Recorder:
    """A checkpointer that keeps every checkpoint."""

    def __init__(self) -> None:
        self.checkpoints: list[SegmentRecord] = []

    async def checkpoint(self, episode_id: str, segment: SegmentRecord) -> None:
        self.checkpoints.append(segment.model_copy(deep=True))


class Counting(ScriptedBackend):
    """A resumable scripted backend counting the tokens each agent decodes."""

    def __init__(self, script: dict[str, str], tokens_per_s: float | None = None) -> None:
        super().__init__(script, resumable=True, tokens_per_s=tokens_per_s)
        self.decoded: dict[str, int] = {}

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await super().generate(request)
        self.decoded[request.tag] = self.decoded.get(request.tag, 0) + len(result.output_ids)
        return result


def config(name: str) -> EngineConfig:
    return EngineConfig(capacity=CAPACITY.get(name), worker_budget=512, temperature=0.0)


async def run_episode(
    script: dict[str, str], cfg: EngineConfig, resume: SegmentRecord | None = None, **backend_kw: Any
) -> tuple[EpisodeResult, Counting, Recorder, ListSink]:
    backend = Counting(script, **backend_kw)
    recorder, sink = Recorder(), ListSink()
    engine = Engine(backend, EchoTask(), cfg, sink=sink, checkpointer=recorder)
    result = await engine.run(PROBLEM, episode_id="ep", resume_from=resume)
    return result, backend, recorder, sink


def comparable(result: EpisodeResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "answer": result.answer,
        "latency": result.latency,
        "eta": result.eta,
        "timeline": result.timeline.to_json(),
        "format_errors": result.format_errors,
        "segments": sorted(
            (s.agent, s.completion_ids, s.completion_mask, s.text, s.returned, s.error, s.generated_tokens,
             s.clock_start, s.clock_end, s.prompt_ids)
            for s in result.segments
        ),
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_resuming_from_any_checkpoint_gives_the_uninterrupted_episode(name: str) -> None:
    script, cfg = SCRIPTS[name], config(name)
    full, backend, recorder, _ = await run_episode(script, cfg)
    assert recorder.checkpoints, "the organizer made no checkpoint"
    assert all(c.wall_end == 0.0 and c.error is None for c in recorder.checkpoints)
    total = backend.decoded["organizer"]
    for cp in recorder.checkpoints:
        resumed, backend2, _, sink = await run_episode(script, cfg, resume=cp)
        assert comparable(resumed) == comparable(full), cp.text
        assert backend2.decoded.get("organizer", 0) == total - cp.generated_tokens, cp.text
        started = sink.events[0]
        assert started.kind == "started" and started.data["resumed_tokens"] == cp.generated_tokens


async def test_checkpoints_come_after_each_fork_and_around_each_join() -> None:
    _, _, recorder, _ = await run_episode(SCRIPTS["fork_join"], config("fork_join"))
    ends = [c.text for c in recorder.checkpoints]
    assert ends[0].endswith("</FORK-1>")
    assert ends[1].endswith("<JOIN-1>")  # waiting for the worker
    assert ends[2].endswith("<RETURN>2*3+4</RETURN>".replace("<RETURN>", "").replace("</RETURN>", "") + "</JOIN-1>")
    assert [c.completion_mask.count(0) for c in recorder.checkpoints] == [0, 0, len("2*3+4</JOIN-1>")]


async def test_a_checkpoint_that_does_not_fit_is_ignored() -> None:
    script = SCRIPTS["fork_join"]
    full, _, recorder, _ = await run_episode(script, config("fork_join"))
    foreign = recorder.checkpoints[-1].model_copy(update={"prompt_ids": [ord(c) for c in "another prompt"]})
    again, backend, _, sink = await run_episode(script, config("fork_join"), resume=foreign)
    assert comparable(again) == comparable(full)
    assert backend.decoded["organizer"] == len(script["organizer"])  # from the start
    assert "resumed_tokens" not in sink.events[0].data


async def test_a_parallel_episode_runs_again_from_the_start() -> None:
    script = {"trace-1": "a<ANSWER>42</ANSWER>", "trace-2": "bb<ANSWER>42</ANSWER>"}
    cfg = EngineConfig(mode=Mode.PARALLEL, parallel_k=2)
    checkpoint = SegmentRecord(agent="trace-1", role="organizer", completion_ids=[97], completion_mask=[1])
    result, backend, recorder, _ = await run_episode(script, cfg, resume=checkpoint)
    assert result.status == "completed" and recorder.checkpoints == []
    assert backend.decoded == {"trace-1": len(script["trace-1"]), "trace-2": len(script["trace-2"])}


class JoinedOnce:
    """A worker endpoint whose outcome changes after the first call (a done-marker gone, say)."""

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, task: WorkerTask) -> WorkerOutcome:
        self.calls += 1
        returned = "first" if self.calls == 1 else "second"
        seg = SegmentRecord(agent=task.agent, role="worker", fork_id=task.fork_id, parent=task.parent, returned=returned)
        return WorkerOutcome(returned=returned, segments=[seg])


async def test_a_joined_result_is_kept_when_the_worker_now_returns_another() -> None:
    script = {"organizer": "<FORK-1>q</FORK-1><JOIN-1>ok<ANSWER>42</ANSWER>"}
    endpoint = JoinedOnce()
    recorder = Recorder()
    engine = Engine(ScriptedBackend(script, resumable=True), EchoTask(), EngineConfig(), endpoints={None: endpoint},
                    checkpointer=recorder)
    await engine.run(PROBLEM, episode_id="ep")
    after_join = recorder.checkpoints[-1]
    assert after_join.text.endswith("first</JOIN-1>")
    engine = Engine(ScriptedBackend(script, resumable=True), EchoTask(), EngineConfig(), endpoints={None: endpoint})
    resumed = await engine.run(PROBLEM, episode_id="ep", resume_from=after_join)
    organizer = next(s for s in resumed.segments if s.agent == "organizer")
    worker = next(s for s in resumed.segments if s.agent == "1")
    assert "first</JOIN-1>" in organizer.text and "second" not in organizer.text
    assert worker.returned is None and worker.error == "replaced"  # the trace says what was joined
    assert resumed.status == "completed"


OVERFLOW = {"<JOIN-1>": len("ok<FORK-2>b</FORK-2>"), "<JOIN-2>": 2}


class Overflowing(CodePoints):
    """Plays a script from a given position, returning text past each ``<JOIN-i>`` (``OVERFLOW``: as a
    model's last token, or a server that checks stops late, can run past the tag); a whole fork here."""

    model_id = "overflowing"

    def __init__(self, script: dict[str, str], start: dict[str, int] | None = None) -> None:
        self.script = script
        self.cursor = dict(start or {})

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        text = self.script[request.tag]
        at = self.cursor.get(request.tag, 0)
        m = re.compile(request.stop_regex or "$^").search(text, at)
        end, finish = (m.end(), FinishReason.STOP) if m else (len(text), FinishReason.EOS)
        if m and m.group(0) in OVERFLOW:
            end = min(end + OVERFLOW[m.group(0)], len(text))
        self.cursor[request.tag] = end
        piece = text[at:end]
        return GenerateResult(self.encode(piece), piece, finish, m.group(0) if m else None)

    async def aclose(self) -> None:
        return None


async def test_resuming_keeps_text_that_ran_past_a_join() -> None:
    script = {
        "organizer": "<FORK-1>a</FORK-1>x<JOIN-1>ok<FORK-2>b</FORK-2>y<JOIN-2>zz<ANSWER>42</ANSWER>",
        "1": "one<RETURN>1</RETURN>",
        "2": "two<RETURN>2</RETURN>",
    }
    cfg = EngineConfig(capacity=3)
    recorder = Recorder()
    full = await Engine(Overflowing(script), EchoTask(), cfg, checkpointer=recorder).run(PROBLEM, episode_id="ep")
    assert full.status == "completed", full.format_errors
    assert full.forks == 2
    organizer = next(seg for seg in full.segments if seg.agent == "organizer")
    assert "<JOIN-1>ok<FORK-2>b</FORK-2>1</JOIN-1>" in organizer.text  # the overflow sits before the result
    for cp in recorder.checkpoints:
        backend = Overflowing(script, start={"organizer": cp.generated_tokens})
        resumed = await Engine(backend, EchoTask(), cfg).run(PROBLEM, episode_id="ep", resume_from=cp)
        assert comparable(resumed) == comparable(full), cp.text


def test_script_position_reads_the_input() -> None:
    script = "ab<JOIN-1>cd<JOIN-2>ef"
    assert script_position(script, "PROMPT\n") == 0
    assert script_position(script, "PROMPT\nab<JOIN-1>") == len("ab<JOIN-1>")
    assert script_position(script, "PROMPT\nab<JOIN-1>result</JOIN-1>c") == len("ab<JOIN-1>c")
    assert script_position(script, "PROMPT\nab<JOIN-1>r</JOIN-1>cd<JOIN-2>s</JOIN-2>ef") == len(script)


async def test_a_worker_computed_twice_in_one_process_decodes_the_same() -> None:
    """A redelivered worker task running beside (or after) the first copy in one worker process."""
    backend = ScriptedBackend({"1": "think think<RETURN>7</RETURN>"}, resumable=True, tokens_per_s=500)
    request = GenerateRequest(input_ids=[ord(c) for c in "W q\n"], max_new_tokens=100, stop_regex="</RETURN>",
                              session="ep", tag="1")
    first, second = await asyncio.gather(backend.generate(request), backend.generate(request))
    third = await backend.generate(request)
    assert first.text == second.text == third.text == "think think<RETURN>7</RETURN>"
