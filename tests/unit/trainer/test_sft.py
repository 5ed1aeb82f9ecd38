"""Format SFT: the loss mask (exact positions), TRL's labels, config validation, a few real steps, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.tasks.countdown import CountdownTask
from trainer.sft import SFTConfigArgs
from trainer.synth.dataset import synthesize
from trainer.synth.records import OrganizerWriter, TraceRecord, write_jsonl
from trainer.synth.teacher import CountdownTeacher


def _hand_made() -> TraceRecord:
    w = OrganizerWriter()
    w.think("ab")
    w.fork(1, "q")
    w.join(1, "xy")
    w.think("c")
    w.answer("d")
    return TraceRecord(kind="organizer", problem_id="p", prompt="PP", completion=w.text, injected=w.injected)


def test_mask_excludes_prompt_and_injected_tokens_exactly() -> None:
    from trainer.sft import tokenize_record

    rec = _hand_made()
    assert rec.completion == "ab<FORK-1>q</FORK-1><JOIN-1>xy</JOIN-1>c<ANSWER>d</ANSWER>"
    row = tokenize_record(rec, lambda text: [ord(ch) for ch in text], eos_id=0)  # one id per character
    text = rec.prompt + rec.completion
    assert row["input_ids"] == [ord(ch) for ch in text] + [0]
    a, b = rec.injected[0]
    assert rec.completion[a:b] == "xy</JOIN-1>"
    expected = [0, 0] + [0 if a <= k < b else 1 for k in range(len(rec.completion))] + [1]
    assert row["completion_mask"] == expected
    masked = [ch for ch, m in zip(text, row["completion_mask"], strict=False) if not m]
    assert "".join(masked) == "PP" + "xy</JOIN-1>"


def test_trl_builds_labels_from_the_mask(tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trainer.sft import tokenize_record

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    rec = _hand_made()
    row = tokenize_record(
        rec, lambda t: tok.backend_tokenizer.encode(t, add_special_tokens=False).ids, tok.eos_token_id
    )
    enc = tok.backend_tokenizer.encode
    n_prompt = len(enc(rec.prompt, add_special_tokens=False).ids)
    assert row["completion_mask"][:n_prompt] == [0] * n_prompt
    pieces = rec.pieces()
    assert [g for _, g in pieces] == [True, False, True]
    n1 = len(enc(pieces[0][0], add_special_tokens=False).ids)
    n2 = len(enc(pieces[1][0], add_special_tokens=False).ids)
    assert row["completion_mask"][n_prompt : n_prompt + n1] == [1] * n1
    assert row["completion_mask"][n_prompt + n1 : n_prompt + n1 + n2] == [0] * n2
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    args = SFTConfig(
        output_dir=str(tmp_path), completion_only_loss=True, max_length=512, report_to="none", bf16=False
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tok)
    prepared: Any = trainer.train_dataset
    labels = prepared[0]["labels"]
    assert labels == [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"], strict=True)]


def test_config_validation_names_the_fix(tmp_path: Path) -> None:
    from trainer.sft import SFTConfigArgs

    with pytest.raises(ValueError, match="exactly one of --model"):
        SFTConfigArgs(data=["x.jsonl"], out=str(tmp_path))
    with pytest.raises(ValueError, match="unknown preset"):
        SFTConfigArgs(data=["x.jsonl"], out=str(tmp_path), preset="huge")
    with pytest.raises(ValueError, match="asyncthink synth"):
        SFTConfigArgs(data=[], out=str(tmp_path), preset="test")
    with pytest.raises(ValueError, match="lr"):
        SFTConfigArgs(data=["x.jsonl"], out=str(tmp_path), preset="test", lr=0)


def test_a_few_sft_steps_lower_the_loss_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trainer.sft import CONFIG_FILE, METRICS_FILE, SFTConfigArgs, run_sft

    task = CountdownTask()
    result = synthesize(CountdownTeacher(task), task.problems("test", 12), sequential=True, seed=0)
    data = tmp_path / "cd.jsonl"
    write_jsonl(result.records, data)
    out = tmp_path / "run"
    cfg = SFTConfigArgs(
        data=[str(data)],
        out=str(out),
        model=str(tiny_model_dir),
        max_steps=12,
        lr=3e-3,
        batch_size=8,
        save_steps=6,
        eval_records=16,
        progress=False,
        logging_steps=4,
    )
    metrics = run_sft(cfg)
    assert metrics["global_step"] == 12
    assert metrics["loss_after"] < metrics["loss_before"] - 0.3
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / METRICS_FILE).read_text())["loss_after"] == metrics["loss_after"]
    ckpt = out / "checkpoint-6"
    assert (ckpt / CONFIG_FILE).is_file() and (ckpt / METRICS_FILE).is_file()
    cfg2 = SFTConfigArgs(**{**cfg.__dict__, "max_steps": 14})
    again = run_sft(cfg2)
    assert again["resumed_from"] and again["resumed_from"].endswith("checkpoint-12")
    assert again["global_step"] == 14


def test_torch_engine_lowers_the_loss_with_the_same_masks(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trainer.sft import METRICS_FILE, SFTConfigArgs, run_sft

    task = CountdownTask()
    result = synthesize(CountdownTeacher(task), task.problems("test", 12), sequential=True, seed=0)
    data = tmp_path / "cd.jsonl"
    write_jsonl(result.records, data)
    out = tmp_path / "torch-run"
    cfg = SFTConfigArgs(data=[str(data)], out=str(out), model=str(tiny_model_dir), max_steps=12, lr=3e-3,
                        batch_size=8, eval_records=16, progress=False, logging_steps=4, engine="torch")
    metrics = run_sft(cfg)
    assert metrics["engine"] == "torch" and metrics["global_step"] == 12
    assert metrics["loss_after"] < metrics["loss_before"] - 0.3
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / METRICS_FILE).read_text())["global_step"] == 12
    with pytest.raises(ValueError, match="engine must be"):
        SFTConfigArgs(data=[str(data)], out=str(out), model=str(tiny_model_dir), engine="jax")


def test_cli_registers_verbs_and_stays_light() -> None:
    code = (
        "import sys, argparse\n"
        "import cli.train as c\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='verb')\n"
        "c.register(sub)\n"
        "a = p.parse_args(['synth', '--out', 'x.jsonl', '--n', '5'])\n"
        "b = p.parse_args(['sft', '--data', 'x.jsonl', '--out', 'o', '--preset', 'small'])\n"
        "assert a.func.__name__ == 'cmd_synth' and b.func.__name__ == 'cmd_sft'\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


def test_synth_cli_writes_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from cli import train as cli
    from trainer.synth import dataset

    task = CountdownTask()
    monkeypatch.setattr(dataset, "train_problems", lambda t, n, seed, jobs=1: task.problems("test", n))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="verb"))
    out = tmp_path / "cd.jsonl"
    args = parser.parse_args(["synth", "--n", "6", "--out", str(out), "--with-sequential"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "kept: asyncthink" in printed and "sequential" in printed and "dropped" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"organizer", "worker", "sequential"}
    assert any("@verify>" in r["completion"] for r in rows)  # the default: search traces
    args = parser.parse_args(["synth", "--n", "6", "--out", str(out), "--format", "paths",
                              "--stats-tokenizer", "train"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert '"critical_path_T"' in printed and '"p90"' in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not any("@verify>" in r["completion"] for r in rows) and rows[0]["completion"].startswith("split by pair")


def test_sft_options_come_from_the_config() -> None:
    """Every SFT setting is an option with the config's own help text; the older flags still parse."""
    import argparse
    import dataclasses

    from cli import train as cli
    from cli.options import collect

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["sft", "--data", "a.jsonl", "b.jsonl", "--out", "o", "--preset", "test",
                              "--kinds", "organizer,worker", "--bf16", "off", "--no-resume", "--no-progress",
                              "--warmup-ratio", "0.1", "--engine", "torch"])
    cfg = SFTConfigArgs(**collect(args, SFTConfigArgs))
    assert cfg.data == ["a.jsonl", "b.jsonl"] and cfg.kinds == ("organizer", "worker")
    assert cfg.bf16 is False and cfg.resume is False and cfg.progress is False
    assert cfg.warmup_ratio == 0.1 and cfg.engine == "torch" and cfg.lr == 1e-3
    sft = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "sft")[1]  # type: ignore[union-attr]
    helps = {a.dest: a.help or "" for a in sft._actions}
    for f in dataclasses.fields(SFTConfigArgs):
        assert helps[f.name].startswith(f.metadata["help"]), f.name
    with pytest.raises(SystemExit):
        parser.parse_args(["sft", "--data", "a.jsonl", "--out", "o", "--bf16", "maybe"])


def test_lr_schedule_warms_up_then_decays_within_the_run() -> None:
    from trainer.sft import lr_schedule

    assert lr_schedule(1e-3, 0.1, 0.0) == 0.0
    assert lr_schedule(1e-3, 0.1, 0.05) == pytest.approx(5e-4)  # half-way through warmup
    assert lr_schedule(1e-3, 0.1, 0.1) == pytest.approx(1e-3)  # the peak
    assert lr_schedule(1e-3, 0.1, 0.55) == pytest.approx(5e-4)  # cosine half-way
    assert lr_schedule(1e-3, 0.1, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_schedule(1e-3, 0.1, 3.0) == pytest.approx(0.0, abs=1e-12)  # past the end: clamped
    assert lr_schedule(1e-3, 0.0, 0.0) == pytest.approx(1e-3)  # no warmup
