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
    given = diagnose({**PROBLEM, "target": 30}, "given 30\nhave 1\n<ANSWER>30; 45-15</ANSWER>", "30; 45-15")
    assert (given.candidates, given.found, given.answered, given.answered_not_found) == (1, 1, 1, 0)


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
