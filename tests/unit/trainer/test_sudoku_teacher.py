"""The programmatic Sudoku teacher: every kept trace is parser-valid and verifier-correct."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cli import main
from shared.protocol import Answer, Fork, Join, Return, Role, join_result, parse
from shared.tasks.base import Mode, Problem
from shared.tasks.sudoku import SudokuTask, parse_grid, solve
from tests.helpers import corrupt_episode, peak_active_workers
from trainer.synth.dataset import synthesize
from trainer.synth.records import TraceRecord, read_jsonl
from trainer.synth.structure import TOPOLOGIES
from trainer.synth.sudoku_teacher import REGIONS, SudokuTeacher, eliminate, solve_passes

TASK = SudokuTask()


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return TASK.problems("train", 50, seed=11)


def _answer(completion: str, capacity: int, allow_fork: bool) -> str:
    events, errors = parse(completion, Role.ORGANIZER, capacity=capacity, allow_fork=allow_fork)
    assert errors == []
    answer = events[-1]
    assert isinstance(answer, Answer)
    return answer.text


def _check_episode(recs: list[TraceRecord], problem: Problem, capacity: int) -> None:
    """Re-parse the organizer and its workers and re-score the answer, without the teacher's checks."""
    (org,) = [r for r in recs if r.kind == "organizer"]
    workers = {r.fork_id: r for r in recs if r.kind == "worker"}
    assert org.prompt == TASK.organizer_prompt(problem, Mode.ASYNCTHINK)
    events, errors = parse(org.completion, Role.ORGANIZER, capacity=capacity)
    assert errors == []
    forks = {e.fork_id: e for e in events if isinstance(e, Fork)}
    joins = [e for e in events if isinstance(e, Join)]
    assert forks and set(forks) == {j.fork_id for j in joins} == set(workers)
    spans = []
    for j in joins:
        worker = workers[j.fork_id]
        assert worker.prompt == TASK.worker_prompt(forks[j.fork_id].query)
        wevents, werrors = parse(worker.completion, Role.WORKER, capacity=capacity, allow_fork=False)
        assert werrors == []
        (ret,) = [e for e in wevents if isinstance(e, Return)]
        start = j.offset + len(f"<JOIN-{j.fork_id}>")
        injected = join_result(j.fork_id, ret.text)
        assert org.completion[start : start + len(injected)] == injected
        spans.append([start, start + len(injected)])
    assert sorted(org.injected) == sorted(spans)
    answer = events[-1]
    assert isinstance(answer, Answer)
    assert TASK.score(problem, answer.text).accuracy == 1.0


def test_traces_are_parser_valid_and_verifier_correct(problems: list[Problem]) -> None:
    teacher = SudokuTeacher(TASK)
    result = synthesize(teacher, problems, sequential=True, seed=1)
    assert result.kept["asyncthink"] == result.kept["sequential"] == len(problems)
    assert not result.dropped
    index = {p.id: p for p in problems}
    by_episode: dict[str, list[TraceRecord]] = {}
    for r in result.records:
        by_episode.setdefault(r.episode_id, []).append(r)
    topologies: Counter[str] = Counter()
    sequential: set[str] = set()
    for recs in by_episode.values():
        problem = index[recs[0].problem_id]
        if recs[0].kind == "sequential":
            (seq,) = recs
            assert seq.prompt == TASK.organizer_prompt(problem, Mode.SEQUENTIAL)
            assert seq.injected == [] and "<FORK" not in seq.completion
            assert TASK.score(problem, _answer(seq.completion, 1, False)).accuracy == 1.0
            sequential.add(problem.id)
        else:
            _check_episode(recs, problem, capacity=2)
            topologies[recs[0].topology or ""] += 1
    assert sequential == set(index)  # the sequential traces cover the same problems
    assert set(topologies) == set(TOPOLOGIES)


def test_capacity_three_keeps_two_workers_running(problems: list[Problem]) -> None:
    teacher = SudokuTeacher(TASK, capacity=3, topologies=("fork_all",))
    result = synthesize(teacher, problems, seed=2)
    assert result.kept["asyncthink"] >= 45 and set(result.dropped) <= {"no_fit"}
    assert peak_active_workers(result.records, capacity=3) == 2


def test_elimination_lines_are_sound(problems: list[Problem]) -> None:
    for problem in problems[:20]:
        grid = tuple(parse_grid(problem.payload["puzzle"]))
        solution = solve(list(grid))
        assert solution is not None
        for region in REGIONS:
            p = eliminate(grid, region)
            assert all(solution[i] == d for i, d in p.fills)  # every fill is the solution's digit
            assert len([line for line in p.lines if " -> " in line]) == sum(not grid[i] for i in region.cells)
        passes = solve_passes(grid)
        assert passes is not None and 1 <= len(passes) <= 8


def test_column_pass_text() -> None:
    grid = tuple(parse_grid(".3.. ...4 .1.. ...1"))
    p = eliminate(grid, REGIONS[5])  # col 2
    assert p.query == "col 2 | .3.. ...4 .1.. ...1"
    assert p.lines == (
        "r2c2: row 4, col 1 3, box 3 -> 2",
        "r4c2: row 1, col 1 3, box 1 -> 2 4",
        "4 only r4c2",
    )
    assert p.returned == "r2c2=2 r4c2=4"
    assert p.worker_text().endswith("<RETURN>r2c2=2 r4c2=4</RETURN>")


def test_corrupt_traces_are_dropped_and_counted(problems: list[Problem]) -> None:
    teacher = SudokuTeacher(TASK)
    write = teacher.write_episode
    calls = Counter[str]()

    def corrupt(problem, skeleton, episode_id):  # type: ignore[no-untyped-def]
        ep = write(problem, skeleton, episode_id)
        if ep is None:
            return None
        calls["n"] += 1
        corrupt_episode(ep, calls["n"], wrong_answer="1111 2222 3333 4444")  # the answer: a given changed
        return ep

    teacher.write_episode = corrupt  # type: ignore[method-assign]
    result = synthesize(teacher, problems[:10], seed=3)
    assert result.dropped["format:duplicate_fork"] + result.dropped["format:capacity_exceeded"] == 1
    assert result.dropped["verifier"] == 1
    assert result.dropped["join_mismatch"] == 1
    assert result.kept["asyncthink"] == 7
    assert teacher.dropped == result.dropped


def test_corrupt_sequential_trace_is_dropped(problems: list[Problem]) -> None:
    teacher = SudokuTeacher(TASK)
    write = teacher.write_sequential

    def wrong(problem, passes):  # type: ignore[no-untyped-def]
        rec = write(problem, passes)
        rec.completion = rec.completion.replace("<ANSWER>", "<ANSWER>9", 1)
        return rec

    teacher.write_sequential = wrong  # type: ignore[method-assign]
    assert teacher.sequential(problems[0]) is None
    assert teacher.dropped == Counter({"verifier": 1})


def test_unfinishable_puzzle_is_dropped_as_stuck() -> None:
    teacher = SudokuTeacher(TASK)
    problem = TASK.problem_from_payload({"puzzle": "1..." + "." * 12})  # many solutions: no single fits
    assert teacher.episode(problem, random.Random(0)) is None
    assert teacher.sequential(problem) is None
    assert teacher.dropped == Counter({"stuck": 2})


def test_cli_writes_sudoku_records(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sd.jsonl"
    assert main(["synth", "--task", "sudoku", "--n", "10", "--out", str(out), "--with-sequential"]) == 0
    records = list(read_jsonl(out))
    assert Counter(r.kind for r in records)["organizer"] == 10
    assert Counter(r.kind for r in records)["sequential"] == 10
    assert all(r.task == "sudoku" for r in records)
    assert "kept: asyncthink 10, sequential 10" in capsys.readouterr().out
