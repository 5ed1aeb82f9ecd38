"""The shipped model: small enough for git, the CLI's default, and it speaks the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main
from shared.config import DEFAULT_MODEL_DIR, Settings

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_the_default_model_is_the_shipped_one() -> None:
    assert Path(Settings().model) == DEFAULT_MODEL_DIR
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["asyncthink-countdown-small", "sequential-baseline-small"])
def test_each_shipped_model_fits_in_16_mib(name: str) -> None:
    files = [p for p in (MODELS / name).iterdir() if p.suffix in (".safetensors", ".json")]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) < 16 * 2**20


def test_solve_forks_workers_out_of_the_box(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["solve", "--json", "--organizer-budget", "96", "--worker-budget", "64"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    organizer = data["segments"][0]
    assert organizer["agent"] == "organizer"
    assert "<FORK-1>" in organizer["text"]  # the model organizes: it forks a worker on a sub-query
    workers = [s for s in data["segments"] if s["role"] == "worker"]
    assert workers and workers[0]["query"]
