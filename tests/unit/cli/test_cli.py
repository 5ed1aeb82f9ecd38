"""The ``asyncthink`` CLI: clear errors for bad input, and solve/eval/trace end to end on a tiny local model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main
from shared.store.db import DEFAULT_CONNECT_TIMEOUT_S
from tests.helpers import recorded_connects


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_instant_and_lists_the_verbs() -> None:
    """Instant: ``--help`` imports none of the heavy packages (checked by name, not timed)."""
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, check=True)
    for verb in ("solve", "eval", "trace", "serve", "db", "model"):
        assert verb in proc.stdout
    probe = (
        "import contextlib, sys\nfrom cli import main\nwith contextlib.redirect_stdout(None):\n"
        "    with contextlib.suppress(SystemExit): main(['--help'])\n"
        "print(sorted({'torch', 'transformers', 'sqlalchemy'} & set(sys.modules)), 'argparse' in sys.modules)"
    )
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[] True"  # argparse: the probe did get as far as parsing


def test_unknown_task(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("solve", "--task", "chess", capsys=capsys)
    assert code == 2
    assert "unknown task 'chess'" in err and "countdown" in err


def test_bad_numbers(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    code, _, err = run_cli("solve", "--numbers", "3", "7", "--model", str(tiny_model_dir), capsys=capsys)
    assert code == 2
    assert "--target" in err
    code, _, err = run_cli("solve", "--payload", "[1, 2]", "--model", str(tiny_model_dir), capsys=capsys)
    assert code == 2 and "JSON object" in err
    code, _, err = run_cli("eval", "-n", "0", "--model", str(tiny_model_dir), capsys=capsys)
    assert code == 2 and "-n must be at least 1" in err


def test_missing_model_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli("solve", "--model", str(tmp_path / "nope"), capsys=capsys)
    assert code == 2
    assert str(tmp_path / "nope") in err


def test_unreachable_database(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    with recorded_connects() as attempts:
        code, _, err = run_cli("eval", "-n", "1", "--model", str(tiny_model_dir),
                               "--db", "postgresql+psycopg://postgres@127.0.0.1:1/none", capsys=capsys)
    assert code == 2
    assert "127.0.0.1:1" in err
    assert [a.get("connect_timeout") for a in attempts] == [DEFAULT_CONNECT_TIMEOUT_S]  # tried once, bounded


def test_solve_prints_answer_trace_and_metrics(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path) -> None:
    code, out, _ = run_cli("solve", "--numbers", "3", "7", "25", "50", "--target", "75", "--model",
                           str(tiny_model_dir), "--organizer-budget", "24", "--worker-budget", "16", capsys=capsys)
    assert code == 0
    assert "T = " in out and "η/c" in out and "wall" in out
    code, out, _ = run_cli("solve", "--json", "--model", str(tiny_model_dir), "--organizer-budget", "16",
                           capsys=capsys)
    data = json.loads(out)
    assert data["task"] == "countdown"
    assert data["latency"] >= 1
    assert data["segments"][0]["agent"] == "organizer"


@pytest.mark.parametrize("mode", ["asyncthink", "sequential", "parallel"])
def test_eval_stores_every_episode_in_sqlite(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path,
                                             tmp_path: Path, mode: str) -> None:
    db = f"sqlite:///{tmp_path / 'eval.db'}"
    code, out, _ = run_cli("eval", "--task", "countdown", "--mode", mode, "-n", "3", "--model", str(tiny_model_dir),
                           "--organizer-budget", "24", "--worker-budget", "16", "--parallel-k", "2",
                           "--db", db, "--json", capsys=capsys)
    assert code == 0
    data = json.loads(out)
    summary = data["modes"][mode]
    assert summary["episodes"] == 3
    assert {"all_correct", "at_least_1", "mean_latency", "mean_eta_over_c"} <= set(summary)
    ids = data["episode_ids"][mode]
    code, out, _ = run_cli("trace", ids[0], "--db", db, "--json", capsys=capsys)
    assert code == 0
    stored = json.loads(out)
    assert stored["id"] == ids[0] and stored["mode"] == mode
    assert stored["segments"]
    code, out, _ = run_cli("trace", "missing-id", "--db", db, capsys=capsys)
    assert code == 2


def test_eval_plot(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "plot.png"
    code, _, _ = run_cli("eval", "-n", "2", "--mode", "asyncthink", "--mode", "sequential", "--model",
                         str(tiny_model_dir), "--organizer-budget", "16", "--worker-budget", "8",
                         "--db", f"sqlite:///{tmp_path / 'p.db'}", "--plot", str(png), capsys=capsys)
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("task", "row"),
    [("countdown", '{"id": "mine-1", "numbers": [3, 7, 25, 50], "target": 75}'),
     ("sudoku", '{"puzzle": "123.....4..1...."}')],
)
def test_eval_takes_any_problem_file(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path,
                                     task: str, row: str) -> None:
    split = tmp_path / f"{task}.jsonl"
    split.write_text(row + "\n")
    code, out, _ = run_cli("eval", "--task", task, "--split", str(split), "-n", "1", "--model", str(tiny_model_dir),
                           "--organizer-budget", "8", "--worker-budget", "8", "--db",
                           f"sqlite:///{tmp_path / 'e.db'}", "--json", capsys=capsys)
    assert code == 0
    data = json.loads(out)
    assert data["split"] == str(split) and data["n"] == 1 and data["modes"]["asyncthink"]["episodes"] == 1
    code, _, err = run_cli("eval", "--task", task, "--split", str(split), "-n", "2", "--model", str(tiny_model_dir),
                           "--db", f"sqlite:///{tmp_path / 'e.db'}", capsys=capsys)
    assert code == 2 and "has 1 problems" in err


def test_eval_budget_sweep_draws_one_curve_per_mode(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    code, out, _ = run_cli("eval", "-n", "2", "--mode", "asyncthink", "--mode", "sequential", "--budgets", "16,8",
                           "--worker-budget", "12", "--model", str(tiny_model_dir), "--db",
                           f"sqlite:///{tmp_path / 's.db'}", "--plot", str(png), "--json", capsys=capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data["modes"]) == {"asyncthink@8", "sequential@8", "asyncthink@16", "sequential@16"}
    curve = data["curves"]["asyncthink"]
    assert [(c["organizer_budget"], c["worker_budget"]) for c in curve] == [(8, 8), (16, 12)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_cli("eval", "-n", "1", "--budgets", "0,8", "--model", str(tiny_model_dir), capsys=capsys)
    assert code == 2 and "--budgets" in err


def test_plot_several_metrics_one_marker_each(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from shared.evaluation import plot_accuracy_latency

    summaries = {"asyncthink": {"mean_latency": 280.0, "accuracy": 19.0, "at_least_1": 64.0, "all_correct": 0.0},
                 "sequential": {"mean_latency": 400.0, "accuracy": 30.0}}  # no per-metric keys: falls back
    seen: list[tuple[str, tuple[float, float]]] = []
    real_scatter = plt.Axes.scatter

    def spy(self, x, y, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append((kw["label"], (x[0], y[0])))
        return real_scatter(self, x, y, *a, **kw)

    plt.Axes.scatter = spy  # type: ignore[method-assign]
    try:
        png = plot_accuracy_latency(summaries, tmp_path / "p.png", metrics=("at_least_1", "all_correct"))
    finally:
        plt.Axes.scatter = real_scatter  # type: ignore[method-assign]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dict(seen) == {
        "asyncthink, ≥1 correct": (280.0, 64.0), "sequential, ≥1 correct": (400.0, 30.0),
        "asyncthink, all correct": (280.0, 0.0), "sequential, all correct": (400.0, 30.0),
    }
