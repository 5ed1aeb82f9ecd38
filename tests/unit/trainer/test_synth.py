"""Cold-start synthesis: skeletons, the programmatic countdown teacher, the LLM teacher (fake endpoint)."""

from __future__ import annotations

import json
import random
from collections import Counter

import httpx
import pytest

from shared.protocol import Answer, Fork, Join, Return, Role, join_result, parse
from shared.tasks.base import Mode, Problem
from shared.tasks.countdown import CountdownTask
from tests.helpers import corrupt_episode, peak_active_workers
from trainer.synth.dataset import length_stats, organizer_timeline, synthesize
from trainer.synth.llm_teacher import LLMTeacher, LLMTeacherConfig
from trainer.synth.records import read_jsonl, write_jsonl
from trainer.synth.structure import TOPOLOGIES, StepKind, sample_skeleton, skeleton_errors
from trainer.synth.teacher import CountdownTeacher, pairs_in_order

TASK = CountdownTask()


def _assert_answer_ok(problem: Problem, answer: str, units_tried: int) -> None:
    """All n_s solutions, or (an exhaustive trace that tried every pair) fewer, all valid and distinct."""
    score = TASK.score(problem, answer)
    if score.accuracy == 1.0:
        return
    assert units_tried == len(pairs_in_order(problem.payload["numbers"]))
    assert score.correct >= 1 and not any(score.details[k] for k in ("invalid", "duplicate", "ignored"))


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    # The committed held-out split loads instantly and every problem has >= 4 distinct solutions;
    # the teacher is only exercised on it here, never trained on it.
    return TASK.problems("test", 200)


# ------------------------------------------------------------------------------------ skeletons
def test_skeletons_are_valid_and_cover_topologies() -> None:
    rng = random.Random(0)
    seen: Counter[str] = Counter()
    for _ in range(3000):
        capacity = rng.choice([2, 3, 4])
        n = rng.randint(1, 7)
        sk = sample_skeleton(rng, capacity, n)
        assert skeleton_errors(sk) == []
        assert sk.n_tasks == n and sk.n_forks >= 1
        assert sk.max_active() <= capacity - 1
        units = [s.unit for s in sk.steps if s.kind is not StepKind.JOIN]
        assert units == list(range(n))  # units are started in order, each once
        seen[sk.topology] += 1
        kinds = [s.kind for s in sk.steps]
        if any(k is StepKind.FORK for k in kinds[kinds.index(StepKind.JOIN) :]):
            seen["fork_after_join"] += 1
        if sk.max_active() >= 2:
            seen["several_active"] += 1
        if any(a is StepKind.FORK and b is StepKind.WORK for a, b in zip(kinds, kinds[1:], strict=False)):
            seen["work_while_forked"] += 1
    for name in (*TOPOLOGIES, "fork_after_join", "several_active", "work_while_forked"):
        assert seen[name] > 50, (name, seen)


def test_skeleton_sampler_is_seeded_and_validates_arguments() -> None:
    a = sample_skeleton(random.Random(3), 3, 5)
    b = sample_skeleton(random.Random(3), 3, 5)
    assert a == b
    with pytest.raises(ValueError, match="capacity"):
        sample_skeleton(random.Random(0), 1, 3)
    with pytest.raises(ValueError, match="topology"):
        sample_skeleton(random.Random(0), 2, 3, "star")


# ------------------------------------------------------------------------------------ teacher
def _check_independently(records: list, problem: Problem, capacity: int) -> None:
    """Re-check with the parser and the verifier, without the teacher's own checker."""
    org = next(r for r in records if r.kind == "organizer")
    workers = {r.fork_id: r for r in records if r.kind == "worker"}
    assert org.prompt == TASK.organizer_prompt(problem, Mode.ASYNCTHINK)
    events, errors = parse(org.completion, Role.ORGANIZER, capacity=capacity)
    assert errors == []
    forks = {e.fork_id: e.query for e in events if isinstance(e, Fork)}
    assert set(forks) == set(workers) == {e.fork_id for e in events if isinstance(e, Join)}
    for fid, w in workers.items():
        assert w.prompt == TASK.worker_prompt(forks[fid])
        wevents, werrors = parse(w.completion, Role.WORKER, allow_fork=False)
        assert werrors == []
        ret = wevents[-1]
        assert isinstance(ret, Return)
        returned = ret.text
        spans = [org.completion[a:b] for a, b in org.injected]
        assert join_result(fid, returned) in spans
    answer = next(e for e in events if isinstance(e, Answer))
    forks = sum(isinstance(e, Fork) for e in events)
    _assert_answer_ok(problem, answer.text, forks + org.completion.count("\npair "))


def test_programmatic_traces_are_parser_valid_and_correct(problems: list[Problem]) -> None:
    teacher = CountdownTeacher(TASK)
    result = synthesize(teacher, problems, sequential=True, seed=1)
    assert result.kept["asyncthink"] >= 0.95 * len(problems)
    assert result.kept["asyncthink"] == result.kept["sequential"]
    assert 0 < result.partial["asyncthink"] == result.partial["sequential"] < 0.2 * len(problems)
    assert set(result.dropped) <= {"too_few_solutions"}  # nothing the teacher writes is malformed
    by_episode: dict[str, list] = {}
    for r in result.records:
        by_episode.setdefault(r.episode_id, []).append(r)
    index = {p.id: p for p in problems}
    topologies: Counter[str] = Counter()
    for recs in by_episode.values():
        problem = index[recs[0].problem_id]
        if recs[0].kind == "sequential":
            (seq,) = recs
            assert seq.prompt == TASK.organizer_prompt(problem, Mode.SEQUENTIAL)
            events, errors = parse(seq.completion, Role.ORGANIZER, capacity=1, allow_fork=False)
            assert errors == [] and seq.injected == []
            answer = events[-1]
            assert isinstance(answer, Answer)
            _assert_answer_ok(problem, answer.text, seq.completion.count("pair "))
        else:
            _check_independently(recs, problem, capacity=2)
            topologies[recs[0].topology] += 1
    assert set(topologies) == set(TOPOLOGIES)


def test_partial_traces_try_every_pair_and_only_with_exhaust(problems: list[Problem]) -> None:
    strict = synthesize(CountdownTeacher(TASK, exhaust=False), problems[:60], sequential=True, seed=1)
    loose = synthesize(CountdownTeacher(TASK), problems[:60], sequential=True, seed=1)
    short = strict.dropped["too_few_solutions"]
    assert short > 0 and not strict.partial  # without exhaust the short problems are dropped...
    assert loose.partial["sequential"] == short // 2  # ...(counted once per kind) and kept with it
    assert loose.kept["sequential"] == strict.kept["sequential"] + short // 2
    index = {p.id: p for p in problems}
    partial = [r for r in loose.records if r.kind == "sequential" and TASK.score(
        index[r.problem_id], r.completion.rpartition("<ANSWER>")[2].removesuffix("</ANSWER>")).accuracy < 1]
    assert len(partial) == short // 2
    for rec in partial:  # every pair is tried, in order, and the answer lists what was found
        numbers = index[rec.problem_id].payload["numbers"]
        tried = [tuple(map(int, line.split()[1:])) for line in rec.completion.splitlines() if line.startswith("pair ")]
        assert tried == pairs_in_order(numbers)


def test_capacity_three_traces_use_several_workers(problems: list[Problem]) -> None:
    teacher = CountdownTeacher(TASK, capacity=3, topologies=("fork_all",))
    result = synthesize(teacher, problems[:60], seed=2)
    assert result.kept["asyncthink"] > 40 and set(result.dropped) <= {"too_few_solutions"}
    assert peak_active_workers(result.records, capacity=3) == 2


def test_corrupt_traces_are_dropped_and_counted(problems: list[Problem]) -> None:
    teacher = CountdownTeacher(TASK)
    write = teacher.write_episode
    calls = Counter[str]()

    def corrupt(problem, units, skeleton, episode_id):  # type: ignore[no-untyped-def]
        ep = write(problem, units, skeleton, episode_id)
        calls["n"] += 1
        corrupt_episode(ep, calls["n"], wrong_answer="1+1")
        return ep

    teacher.write_episode = corrupt  # type: ignore[method-assign]
    result = synthesize(teacher, problems[:12], seed=3)
    kept = result.kept["asyncthink"]
    assert result.dropped["format:duplicate_fork"] + result.dropped["format:capacity_exceeded"] == 1
    assert result.dropped["verifier"] == 1
    assert result.dropped["join_mismatch"] == 1
    assert kept + sum(result.dropped.values()) == 12
    assert "dropped" in result.summary()


def test_jsonl_round_trip_and_length_stats(tmp_path, problems: list[Problem]) -> None:
    result = synthesize(CountdownTeacher(TASK), problems[:20], sequential=True, seed=4)
    path = tmp_path / "cd.jsonl"
    assert write_jsonl(result.records, path) == len(result.records)
    back = list(read_jsonl(path))
    assert back == result.records
    row = json.loads(path.read_text().splitlines()[0])
    assert {"kind", "problem_id", "prompt", "completion", "injected"} <= set(row)
    stats = length_stats(back, len)  # characters as "tokens"
    assert stats["critical_path_T"]["n"] == result.kept["asyncthink"]
    org = next(r for r in back if r.kind == "organizer")
    tl = organizer_timeline(org, {}, len)
    injected = sum(b - a for a, b in org.injected)
    assert sum(s.tokens for s in tl.steps if hasattr(s, "tokens")) == len(org.completion) - injected


def test_organizer_timeline_cuts_after_each_fork_and_join() -> None:
    from shared.metrics import Decode, ForkStep, JoinStep, Timeline
    from trainer.synth.records import TraceRecord

    head = "ab<FORK-1@python>q</FORK-1>cd<JOIN-1>"
    injected = join_result(1, "r")
    tail = "<ANSWER>x</ANSWER>"
    rec = TraceRecord("organizer", "p", "P", head + injected + tail, [[len(head), len(head) + len(injected)]])
    tl = organizer_timeline(rec, {1: 5}, len)
    assert tl == Timeline.of(
        Decode(len("ab<FORK-1@python>q</FORK-1>")),
        ForkStep(1, Timeline.of(Decode(5))),
        Decode(len("cd<JOIN-1>")),
        JoinStep(1),
        Decode(len(tail)),
    )


# ------------------------------------------------------------------------------------ LLM teacher
def _fake_client(replies: list[str | int]):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    queue = list(replies)
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        reply = queue.pop(0)
        if isinstance(reply, int):
            return httpx.Response(reply, json={"error": {"message": "boom"}})
        body = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            ],
        }
        return httpx.Response(200, json=body)

    client = OpenAI(
        base_url="http://fake/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),  # type: ignore[arg-type]
    )
    return client, seen


def _as_reply(problem: Problem) -> str:
    ep = CountdownTeacher(TASK).episode(problem, random.Random(0))
    assert ep is not None
    parts = [f"ORGANIZER:\n{ep.organizer.completion}"]
    parts += [f"WORKER {i}:\n{w.completion}" for i, w in sorted(ep.workers.items())]
    return "\n".join(parts) + "\nThat is all."


def test_llm_teacher_keeps_valid_and_counts_invalid_replies(problems: list[Problem]) -> None:
    valid = _as_reply(problems[0])
    wrong = _as_reply(problems[1]).split("<ANSWER>")[0] + "<ANSWER>1</ANSWER>\nWORKER 1:\n<RETURN>x</RETURN>"
    client, seen = _fake_client([valid, "no sections at all", wrong, 500])
    config = LLMTeacherConfig(base_url="http://fake/v1", model="fake", strict_structure=False, timeout_s=5)
    teacher = LLMTeacher(TASK, config, client=client)
    result = synthesize(teacher, [problems[0], problems[0], problems[1], problems[2]], seed=0)
    assert result.kept["asyncthink"] == 1
    assert result.dropped["unparsable_reply"] >= 1
    assert result.dropped["llm_error"] == 1
    assert sum(result.dropped.values()) == 3
    prompt = seen[0]["messages"][1]["content"]
    assert (
        "FORK-1" in prompt
        and "ANSWER" in prompt
        and TASK.organizer_prompt(problems[0], Mode.ASYNCTHINK) in prompt
    )
    org = next(r for r in result.records if r.kind == "organizer")
    _check_independently(result.records, problems[0], capacity=2)
    assert org.completion.endswith("</ANSWER>")  # text after the answer is cut, as the engine would stop


def test_llm_teacher_strict_structure_rejects_other_skeletons(problems: list[Problem]) -> None:
    reply = _as_reply(problems[0])
    client, _ = _fake_client([reply] * 8)
    config = LLMTeacherConfig(base_url="http://fake/v1", model="fake", min_tasks=6, max_tasks=6)
    teacher = LLMTeacher(TASK, config, client=client)
    result = synthesize(teacher, [problems[0]] * 8, seed=5)
    assert result.dropped["skeleton_mismatch"] == 8 - result.kept["asyncthink"]
    assert result.dropped["skeleton_mismatch"] >= 6


def test_llm_teacher_config_names_the_fix() -> None:
    with pytest.raises(ValueError, match="--base-url"):
        LLMTeacherConfig(base_url="", model="m")
