"""The recipe end to end at toy size on the CPU: every stage, the ledger, the checkpoints, both splits.

The ``test`` preset (about 100 k parameters), eight training problems, two SFT steps and one GRPO step
per run, two problems per evaluation with small budgets. Then a second call continues SFT from the
committed checkpoints, and the ledger counts both sessions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from trainer import recipe

TOY = [
    "--preset", "test", "--max-position", "4096", "--vocab-size", "512", "--train-problems", "8",
    "--sft-minutes", "0.5", "--sft-max-steps", "2", "--sft-batch", "8", "--grpo-minutes", "0.01", "--grpo-steps", "1",
    "--grpo-problems", "2", "--grpo-group", "2", "--grpo-kl", "0", "--organizer-budget", "24",
    "--worker-budget", "12", "--eval-n", "2", "--device", "cpu", "--sweep-budgets", "8,16",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("recipe")
    assert recipe.main(["--work", str(work), "--stages", "synth,sft,grpo,eval", *TOY]) == 0
    return work


def test_every_run_is_in_the_ledger_with_its_minutes(work: Path) -> None:
    ledger = json.loads((work / "minutes.json").read_text())
    runs = ledger["runs"]
    assert set(runs) == {"sft-async", "sft-seq", "grpo-async", "grpo-seq", "grpo-async-nolam", "grpo-nosft"}
    for name, entry in runs.items():
        assert entry["train_minutes"] > 0 and entry["steps"] >= 1 and len(entry["sessions"]) == 1, name
    assert runs["grpo-nosft"]["sessions"][0]["from"] == "base"
    assert runs["grpo-async-nolam"]["sessions"][0]["lam"] == 0.0 and runs["grpo-async"]["sessions"][0]["lam"] > 0
    assert runs["grpo-seq"]["sessions"][0]["mode"] == "sequential"
    assert all(ledger["stages"][s]["calls"][0]["ok"] for s in ("synth", "sft", "grpo", "eval"))
    assert ledger["total_wall_minutes"] >= ledger["total_train_minutes"] > 0


def test_checkpoints_are_bf16_and_small_enough_to_commit(work: Path) -> None:
    for name in ("base", "sft-async", "sft-seq", "grpo-async", "grpo-seq", "grpo-async-nolam", "grpo-nosft"):
        path = work / name
        assert recipe.is_model(path) and (path / "tokenizer.json").is_file(), name
        assert recipe.checkpoint_bytes(path) <= recipe.CHECKPOINT_BUDGET_BYTES
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}  # noqa: SIM118
    tokenizers = {(work / n / "tokenizer.json").read_text() for n in ("base", "sft-async", "sft-seq")}
    assert len(tokenizers) == 1  # one tokenizer for every model


def test_eval_covers_both_splits_every_mode_and_the_ablations(work: Path) -> None:
    table = json.loads((work / "eval.json").read_text())
    names = {"asyncthink", "sequential", "parallel", "asyncthink-sft-only", "sequential-sft-only",
             "ablation-no-r-eta", "ablation-no-format-sft"}
    for split in ("test", "test2"):
        assert set(table[split]) == names, split
        for entry in table[split].values():
            assert entry["episodes"] == 2 and entry["split"] == split and "diagnosis" in entry
        assert (work / f"eval-{split}.png").is_file()
    assert table["test"]["asyncthink"]["train_minutes"].keys() == {"grpo-async", "sft-async"}
    sweep = table["sweep"]
    assert sweep["budgets"] == [8, 16] and set(sweep["curves"]) == {"asyncthink", "sequential"}
    assert [c["organizer_budget"] for c in sweep["curves"]["asyncthink"]] == [8, 16]
    assert (work / "eval-sweep.png").is_file()


def test_training_continues_from_the_checkpoints_and_counts_every_minute(work: Path) -> None:
    before = json.loads((work / "minutes.json").read_text())
    args = ["--work", str(work), "--stages", "sft", *TOY]
    args[args.index("--sft-minutes") + 1] = "1.5"  # a larger total: each run trains again (2 steps)
    assert recipe.main(args) == 0
    after = json.loads((work / "minutes.json").read_text())
    for name in ("sft-async", "sft-seq"):
        sessions = after["runs"][name]["sessions"]
        assert len(sessions) == 2 and sessions[1]["from"] == name  # from its own checkpoint
        assert after["runs"][name]["train_minutes"] > before["runs"][name]["train_minutes"]
    assert len(after["stages"]["sft"]["calls"]) == 2
    assert after["runs"]["grpo-async"] == before["runs"]["grpo-async"]  # untouched
