"""The recipe stage by stage at toy size on the CPU (``test_recipe.py`` runs them all end to end): what each
stage writes, what it skips, a stage that fails and the call that resumes it, export, the ledger's
arithmetic and a bad command line refused before anything runs.

One module-scoped work directory holds the synthesized traces of four training problems; the tests that
train copy them into a directory of their own (SFT of ``sft-async`` only, two steps; one GRPO step).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.tasks.countdown import CountdownTask, held_out_keys, problem_key
from trainer import recipe
from trainer.synth.records import read_jsonl

ROOT = Path(__file__).resolve().parents[3]
TOY = [
    "--preset", "test", "--max-position", "4096", "--vocab-size", "512", "--train-problems", "4",
    "--sft-minutes", "0.5", "--sft-max-steps", "2", "--sft-batch", "8", "--sft-runs", "async",
    "--grpo-minutes", "0.01", "--grpo-steps", "1", "--ablation-minutes", "0", "--grpo-problems", "2",
    "--grpo-group", "2", "--grpo-kl", "0", "--organizer-budget", "24", "--worker-budget", "12",
    "--device", "cpu",
]  # fmt: skip


def run(work: Path, stages: str, *extra: str) -> dict:  # type: ignore[type-arg]
    """One call of the recipe; its ledger afterwards."""
    assert recipe.main(["--work", str(work), "--stages", stages, *TOY, *extra]) == 0
    return recipe.read_ledger(work)


@pytest.fixture(scope="module")
def synthed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("recipe-synth")
    run(work, "synth")
    return work


def _with_traces(synthed: Path, work: Path) -> Path:
    shutil.copytree(synthed / "data", work / "data")
    return work


# ----------------------------------------------------------------------------------------------- synth
def test_synth_writes_traces_of_the_first_training_problems_only(synthed: Path) -> None:
    data = synthed / "data"
    asyncthink, sequential = list(read_jsonl(data / "async.jsonl")), list(read_jsonl(data / "seq.jsonl"))
    assert {r.kind for r in asyncthink} == {"organizer", "worker"}
    assert {r.kind for r in sequential} == {"sequential"}
    problems = CountdownTask().problems(recipe.build_parser().get_default("problems"), 4)
    wanted = {p.id for p in problems}
    assert {r.problem_id for r in sequential} == wanted  # one sequential trace set per problem: all 4
    assert {r.problem_id for r in asyncthink if r.kind == "organizer"} == wanted
    assert not {problem_key(p.payload["numbers"], p.payload["target"]) for p in problems} & held_out_keys()
    organizers = {r.episode_id for r in asyncthink if r.kind == "organizer"}
    assert {r.episode_id for r in asyncthink if r.kind == "worker"} <= organizers  # every worker has its organizer
    stats = json.loads((data / "stats.json").read_text())
    assert set(stats) == {"summary", "lengths"}


def _expected(teacher_class: type, capacity: int, seed: int, vocab_size: int = 512) -> dict[str, object]:
    """What synth must write, computed with the library: the traces are deterministic (the recipe's
    claim that ``data/`` need not be committed)."""
    from trainer.synth.dataset import length_stats, synthesize, token_counter

    task = CountdownTask()
    problems = task.problems(recipe.build_parser().get_default("problems"), 4)
    result = synthesize(teacher_class(task, capacity=capacity), problems, asyncthink=True, sequential=True, seed=seed)
    counter = token_counter("train", result.records, vocab_size=vocab_size, seed=seed)
    return {
        "async": [r.to_json() for r in result.records if r.kind != "sequential"],
        "seq": [r.to_json() for r in result.records if r.kind == "sequential"],
        "lengths": json.loads(json.dumps(length_stats(result.records, counter, capacity))),
    }


def _written(work: Path) -> dict[str, object]:
    data = work / "data"
    return {
        "async": [r.to_json() for r in read_jsonl(data / "async.jsonl")],
        "seq": [r.to_json() for r in read_jsonl(data / "seq.jsonl")],
        "lengths": json.loads((data / "stats.json").read_text())["lengths"],
    }


def test_synth_writes_what_the_chosen_teacher_gives_at_the_chosen_capacity_and_seed(
    synthed: Path, tmp_path: Path
) -> None:
    from trainer.synth.search_teacher import SearchTeacher
    from trainer.synth.teacher import CountdownTeacher

    assert _written(synthed) == _expected(SearchTeacher, capacity=2, seed=0)  # the defaults: search, c = 2
    run(tmp_path, "synth", "--trace-format", "paths", "--capacity", "3", "--seed", "5")
    written = _written(tmp_path)
    assert written == _expected(CountdownTeacher, capacity=3, seed=5)
    assert {r["capacity"] for r in written["async"]} == {3}  # type: ignore[union-attr,index]
    assert written["seq"] != _written(synthed)["seq"]  # another teacher writes other traces
    run(tmp_path / "c3", "synth", "--capacity", "3")  # the search teacher at c = 3 (the default is 2)
    assert _written(tmp_path / "c3") == _expected(SearchTeacher, capacity=3, seed=0)


def test_synth_is_skipped_when_its_traces_are_there(synthed: Path) -> None:
    data = synthed / "data"
    before = {f.name: f.read_bytes() for f in data.iterdir()}
    ledger = run(synthed, "synth", "--train-problems", "2")  # a different count: would change the files
    assert {f.name: f.read_bytes() for f in data.iterdir()} == before
    assert [c["ok"] for c in ledger["stages"]["synth"]["calls"]][-1] is True
    assert ledger["runs"] == {}  # synth trains nothing
    # one of the two files gone (an interrupted synth): it runs again, and writes the same bytes
    (data / "seq.jsonl").unlink()
    (data / "stats.json").unlink()
    run(synthed, "synth")
    assert {f.name: f.read_bytes() for f in data.iterdir()} == before


# ------------------------------------------------------------------------------------------ sft, resume
def test_a_failed_stage_is_recorded_and_the_next_call_resumes_an_interrupted_run(
    synthed: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    ledger = run(work, "sft")  # no traces yet: the stage fails, the recipe goes on and says so
    assert [c["ok"] for c in ledger["stages"]["sft"]["calls"]] == [False]
    assert ledger["runs"] == {} and not (work / "base").exists()
    # what a killed session leaves: a half-written scratch run and a half-saved checkpoint
    _with_traces(synthed, work)
    (work / "scratch" / "sft-async").mkdir(parents=True)
    (work / "scratch" / "sft-async" / "half-written").write_text("x")
    (work / "sft-async.tmp").mkdir()
    (work / "sft-async.tmp" / "model.safetensors").write_text("not a model")
    ledger = run(work, "sft")
    assert [c["ok"] for c in ledger["stages"]["sft"]["calls"]] == [False, True]
    assert recipe.is_model(work / "base") and recipe.is_model(work / "sft-async")
    assert not (work / "sft-async.tmp").exists() and not (work / "scratch" / "sft-async" / "half-written").exists()
    [session] = ledger["runs"]["sft-async"]["sessions"]
    assert session["from"] == "base" and session["steps"] == 2  # --sft-max-steps 2
    assert set(ledger["runs"]) == {"sft-async"}  # --sft-runs async: sft-seq is not trained

    # a run already at its target is not trained again: nothing changes but the stage's call
    weights = (work / "sft-async" / "model.safetensors").read_bytes()
    done = str(ledger["runs"]["sft-async"]["train_minutes"])
    again = run(work, "sft", "--sft-minutes", done)
    assert again["runs"] == ledger["runs"]
    assert (work / "sft-async" / "model.safetensors").read_bytes() == weights
    assert [c["ok"] for c in again["stages"]["sft"]["calls"]] == [False, True, True]

    # GRPO trains what has its start model: grpo-async (from sft-async); grpo-seq has no sft-seq, and the
    # ablations have 0 minutes (--ablation-minutes 0)
    after = run(work, "grpo")
    assert set(after["runs"]) == {"sft-async", "grpo-async"}
    [grpo] = after["runs"]["grpo-async"]["sessions"]
    assert grpo["from"] == "sft-async" and grpo["mode"] == "asyncthink" and grpo["steps"] == 1
    assert recipe.is_model(work / "grpo-async") and not (work / "grpo-seq").exists()

    # export copies the checkpoint's files as they are
    out = tmp_path / "exported"
    ledger = run(work, "export", "--export-from", "grpo-async", "--export-dir", str(out))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == {
        f.name: f.read_bytes() for f in (work / "grpo-async").iterdir()
    }
    ledger = run(work, "export", "--export-from", "grpo-seq", "--export-dir", str(tmp_path / "none"))
    assert [c["ok"] for c in ledger["stages"]["export"]["calls"]] == [True, False]  # no such model
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_checkpoint_replaces_a_stale_save_and_warns_past_the_budget(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "ckpt"
    (tmp_path / "ckpt.tmp").mkdir()
    (tmp_path / "ckpt.tmp" / "stale").write_text("from a killed save")
    recipe.save_checkpoint(tiny_model_dir, dst)
    assert recipe.is_model(dst) and not (tmp_path / "ckpt.tmp").exists() and not (dst / "stale").exists()
    assert not [r for r in caplog.records if "over the" in r.getMessage()]  # the toy model fits 16 MiB
    size = recipe.checkpoint_bytes(dst)  # about 0.23 MiB (bf16 weights of ~100 k parameters + tokenizer)
    monkeypatch.setattr(recipe, "CHECKPOINT_BUDGET_BYTES", size - 1)  # one byte short (whole MiB: 0)
    with caplog.at_level(logging.WARNING, logger="recipe"):
        recipe.save_checkpoint(tiny_model_dir, dst)
    assert recipe.is_model(dst) and recipe.checkpoint_bytes(dst) == size  # saved all the same
    assert [r.getMessage() for r in caplog.records if "over the" in r.getMessage()] == [
        f"{dst} takes {size / 2**20:.1f} MiB, over the 0 MiB a committed checkpoint may take"
    ]


# ------------------------------------------------------------------------------------------ the ledger
def test_the_ledger_adds_sessions_and_stage_calls(tmp_path: Path) -> None:
    recipe.record_run(tmp_path, "sft-async", train_minutes=0.25, steps=3, start="base")
    recipe.record_run(tmp_path, "sft-async", train_minutes=0.5, steps=4, start="sft-async", loss_after=1.5)
    recipe.record_run(tmp_path, "grpo-async", train_minutes=2.0, steps=1, start="sft-async")
    recipe.record_stage(tmp_path, "sft", 1.25, True)
    recipe.record_stage(tmp_path, "sft", 0.5, False)
    recipe.record_stage(tmp_path, "grpo", 3.0, True)
    ledger = json.loads((tmp_path / recipe.LEDGER).read_text())
    sft = ledger["runs"]["sft-async"]
    assert (sft["train_minutes"], sft["steps"]) == (0.75, 7)  # 0.25 + 0.5; 3 + 4
    assert [s["from"] for s in sft["sessions"]] == ["base", "sft-async"] and sft["sessions"][1]["loss_after"] == 1.5
    assert recipe.trained_minutes(tmp_path, "sft-async") == 0.75 and recipe.trained_minutes(tmp_path, "x") == 0.0
    assert ledger["stages"]["sft"]["wall_minutes"] == 1.75  # 1.25 + 0.5, the failed call included
    assert [c["ok"] for c in ledger["stages"]["sft"]["calls"]] == [True, False]
    assert ledger["total_train_minutes"] == 2.75  # 0.75 + 2.0
    assert ledger["total_wall_minutes"] == 4.75  # 1.75 + 3.0


def test_lineage_minutes_follow_the_runs_a_model_started_from() -> None:
    ledger = {"sft-async": {"train_minutes": 1.5}, "grpo-async": {"train_minutes": 2.0},
              "grpo-async-nolam": {"train_minutes": 0.5}, "sft-seq": {"train_minutes": 1.0}}  # fmt: skip
    assert recipe._lineage_minutes(ledger, "grpo-async") == {"grpo-async": 2.0, "sft-async": 1.5}
    assert recipe._lineage_minutes(ledger, "grpo-async-nolam") == {"grpo-async-nolam": 0.5, "sft-async": 1.5}
    assert recipe._lineage_minutes(ledger, "grpo-nosft") == {}  # not trained; base has no minutes
    assert recipe._lineage_minutes(ledger, "grpo-seq") == {"sft-seq": 1.0}  # its parent's only
    assert recipe._lineage_minutes(ledger, "sft-async") == {"sft-async": 1.5}


# ------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "synth,sfft"], "unknown stage 'sfft'"),
        (["--stages", " , "], "no stage given"),
        (["--stages", "synth", "--trace-format", "lines"], "invalid choice: 'lines'"),
        (["--stages", "eval", "--rollout-attention", "flash"], "invalid choice: 'flash'"),
    ],
)
def test_a_bad_command_line_is_refused_before_any_stage_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as info:
        recipe.main(["--work", str(work), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not work.exists()  # synth (listed first) did not run: nothing written


def test_work_is_required_and_help_names_the_stages_without_importing_torch() -> None:
    with pytest.raises(SystemExit) as info:
        recipe.build_parser().parse_args(["--stages", "synth"])
    assert info.value.code == 2
    probe = (
        "import contextlib, io, sys\nfrom trainer import recipe\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit): recipe.main(['--help'])\n"
        "print('torch' in sys.modules, 'synth,sft,grpo,eval,export' in out.getvalue())"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.split() == ["False", "True"], proc.stderr
