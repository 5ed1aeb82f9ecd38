"""The countdown trace diagnosis: counted by hand on a written trace, and read back from a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.diagnose import diagnose, main, summarize

PROBLEM = {"numbers": [45, 30, 3, 84], "target": 15, "n_solutions": 4}
TRACE = (
    "split by pair\n<FORK-1>45 30 | 3 84 -> 15</FORK-1>\n"
    "pair 45 3\n45/3=15\nfound 45/3\nhave 1\n"
    "<JOIN-1>45-30; 45+30</JOIN-1>\nhave 3\n"  # one valid, one wrong
    "pair 30 3\n30/3=10: no\nfound none\nhave 3\n"
    "<ANSWER>45/3; 45-30; 84/3+84; 45/3</ANSWER>"  # two valid, a wrong one, a duplicate
)


def test_counts_candidates_found_and_answered() -> None:
    d = diagnose(PROBLEM, TRACE, "45/3; 45-30; 84/3+84; 45/3")
    assert (d.candidates, d.invalid, d.found, d.answered, d.answered_not_found) == (3, 1, 2, 2, 0)
    assert d.units == 3 and not d.all_pairs  # 1 fork + 2 own pairs of the 6
    # the shipped models' data noted a bare target as "given": under the rules it is no solution
    given = diagnose({**PROBLEM, "target": 30}, "given 30\nhave 1\n<ANSWER>30; 84-3*(45-30)+3-3*3</ANSWER>",
                     "30; 84-3*(45-30)+3-3*3")
    assert (given.candidates, given.invalid, given.bare_candidates, given.found) == (1, 1, 1, 0)
    assert (given.answer_exprs, given.answer_invalid, given.answer_bare, given.answered) == (2, 2, 1, 0)


SEARCH_PROBLEM = {"numbers": [41, 14, 4, 3], "target": 13, "n_solutions": 4}
SEARCH_TRACE = (
    "<FORK-1>41 14 | 4 3 -> 13</FORK-1>\npair 14 4\nneed 41: 13+41=54 41-13=28 13*41=533\n14+4=18\n"
    "18*3=54 54-41=13 hit (14+4)*3-41\n14-4=10\n10+3=13 hit 14-4+3\n10*3=31 hit 10*3\n"
    "<JOIN-1>(41+14-3)/4; (41-14)/3+5</JOIN-1>\n"
    "<FORK-2@verify>41 14 4 3 -> 13: (41+14-3)/4; (41-14)/3+5; (14+4)*3-41; 14-4+3; 10*3</FORK-2>"
    "<JOIN-2>ok (41+14-3)/4; no (41-14)/3+5: uses 5, which is not given; ok (14+4)*3-41; ok 14-4+3; "
    "no 10*3: uses 10, which is not given</JOIN-2>\nhave 3\n"
    "<ANSWER>(41+14-3)/4; (14+4)*3-41; 14-4+3; 13</ANSWER>"
)


def test_reads_search_traces_hits_joins_and_the_verify_tool() -> None:
    d = diagnose(SEARCH_PROBLEM, SEARCH_TRACE, "(41+14-3)/4; (14+4)*3-41; 14-4+3; 13")
    # candidates: three own hit lines and two joined ones; the verify reply is not a candidate
    assert (d.candidates, d.invalid, d.bare_candidates, d.found) == (5, 2, 0, 3)
    assert (d.answer_exprs, d.answer_invalid, d.answer_bare, d.answered, d.answered_not_found) == (4, 1, 1, 3, 0)
    assert (d.verify_forks, d.answered_not_verified, d.units) == (1, 1, 2)  # "13" was never verified


def test_reads_sequential_check_lines() -> None:
    trace = "pair 14 4\n10+3=13 hit 14-4+3\ncheck 14-4+3: 14-4=10 10+3=13 ok\nhave 1\n<ANSWER>14-4+3; 14+3-4</ANSWER>"
    d = diagnose(SEARCH_PROBLEM, trace, "14-4+3; 14+3-4")
    assert (d.checks, d.answered_not_verified, d.answered, d.answer_invalid) == (1, 1, 1, 0)


def test_summary_is_per_episode() -> None:
    s = summarize([diagnose(PROBLEM, TRACE, "45/3"), diagnose(PROBLEM, "<ANSWER>45-30</ANSWER>", "45-30")])
    assert s["episodes"] == 2
    assert s["candidates_per_episode"] == pytest.approx(1.5)
    assert s["invalid_candidates_pct"] == pytest.approx(100 / 3)
    assert s["answered_not_found_per_episode"] == pytest.approx(0.5)  # the second answers what it never found
    assert summarize([]) == {"episodes": 0}


def test_reads_the_episodes_of_an_eval(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path,
                                       tmp_path: Path) -> None:
    from cli import main as cli

    db = f"sqlite:///{tmp_path / 'e.db'}"
    assert cli(["eval", "-n", "3", "--model", str(tiny_model_dir), "--organizer-budget", "16",
                "--worker-budget", "8", "--db", db]) == 0
    capsys.readouterr()
    assert main(["--db", db, "--json", "--mode", "asyncthink"]) == 0
    assert '"episodes": 3' in capsys.readouterr().out
