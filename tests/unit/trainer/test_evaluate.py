"""The trainer's evaluation helpers: whole episodes with the tools, and the model as a countdown worker."""

from __future__ import annotations

from pathlib import Path

from trainer.evaluate import arithmetic_lines, evaluate_model, evaluate_workers


def test_arithmetic_lines_counts_false_statements() -> None:
    text = "55-3=52 52/4=13 hit (41+14-3)/4\n41*14=574\n6+10=70\nneed 4: 13-4=9 x(3+4)=7\n7/2=3"
    assert arithmetic_lines(text) == (6, 2)  # 6+10=70 and 7/2=3 are false; "(3+4)=7" is no statement


def test_evaluate_workers_prompts_every_pair_unit(tiny_model_dir: Path) -> None:
    out = evaluate_workers(tiny_model_dir, split="test", n=2, budget=8)
    assert 10 <= out["units"] <= 12  # six pairs a problem (fewer when a number repeats)
    assert 0 <= out["returned_pct"] <= 100 and out["candidates"] >= out["invalid"] >= 0


def test_evaluate_model_diagnoses_countdown(tiny_model_dir: Path) -> None:
    summary = evaluate_model(tiny_model_dir, "countdown", "asyncthink", split="test2", n=2, organizer_budget=12,
                             worker_budget=8, examples=1)
    assert summary["episodes"] == 2 and summary["split"] == "test2" and len(summary["examples"]) == 1
    assert summary["diagnosis"]["episodes"] == 2
