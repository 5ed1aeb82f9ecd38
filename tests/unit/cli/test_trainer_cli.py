"""``asyncthink serve trainer`` and ``asyncthink trainer ...``: options from the config, versions and cycles
read from the store, commands that need a reachable trainer say how to reach one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import build_parser, main
from cli.trainer import resolve_config
from shared.store import db
from shared.store import versions as registry
from trainer.service.config import TrainerServiceConfig


def test_serve_trainer_takes_the_config_options(tiny_model_dir: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "trainer", "--method", "grpo", "--group-size", "8", "--temperature", "0.8", "--base-model",
         str(tiny_model_dir), "--gate-tolerance", "0.05", "--no-allow-format-errors"]
    )  # fmt: skip
    from cli.options import collect

    config = TrainerServiceConfig(**collect(args, TrainerServiceConfig))
    assert config.method == "grpo" and config.group_size == 8 and config.episode.temperature == 0.8
    assert config.gate_tolerance == 0.05 and config.base_model == tiny_model_dir
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "trainer", "--method", "dpo"])


def test_the_base_model_comes_from_the_serving_spec(tiny_model_dir: Path) -> None:
    config = TrainerServiceConfig()
    assert resolve_config(config, str(tiny_model_dir)).base_model == tiny_model_dir
    spec = f"sglang:http://sglang:30000?tokenizer={tiny_model_dir}"
    assert resolve_config(config, spec).base_model == tiny_model_dir
    with pytest.raises(ValueError, match="tokenizer="):
        resolve_config(config, "sglang:http://sglang:30000")
    with pytest.raises(FileNotFoundError, match="--base-model"):
        resolve_config(config, "/nowhere/model")


def test_versions_and_show_read_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.migrate(url)
    with db.session_factory(db.make_engine(url))() as s:
        registry.register(s, model_id="m", version="init0", path="/models/m", kind="init", metrics={"cycle": 0})
        registry.set_serving(s, model_id="m", version="init0", event="initial")
        registry.register(
            s, model_id="m", version="sft-c0001-12345678", path="/ckpt/v1", kind="sft", parent="init0", step=1,
            metrics={"cycle": 1, "content_hash": "12345678" + "0" * 56,
                     "data_window": {"used": 40, "seen": 90, "skipped": {"low_accuracy": 50}},
                     "train": {"method": "sft", "sequences": 70, "trained_tokens": 5000, "nll_before": 1.5,
                               "nll_after": 1.2, "train_s": 3.0},
                     "gate": {"metric": "accuracy", "tolerance": 0.02, "delta": -0.1, "passed": False,
                              "candidate": {"accuracy": 0.5}, "serving": {"accuracy": 0.6}}},
        )  # fmt: skip
        registry.patch(s, model_id="m", version="sft-c0001-12345678", values={"status": "rejected"}, event="gate_failed")
    assert main(["trainer", "versions", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "init0" in out and "serving" in out and "sft-c0001-12345678" in out and "rejected" in out
    assert "-0.100" in out and "40" in out
    assert main(["trainer", "show", "1", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "40 episodes used of 90 seen" in out and "NLL 1.500 -> 1.200" in out
    assert "candidate 0.5 vs serving 0.6" in out and "failed" in out and "gate_failed" in out
    assert main(["trainer", "show", "sft-c0001-12345678", "--db", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["status"] == "rejected"
    assert main(["trainer", "show", "7", "--db", url]) == 2
    assert "no cycle 7" in capsys.readouterr().err


def test_commands_in_the_embedded_setup_need_the_gateways_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.config import get_settings

    monkeypatch.setenv("ASYNCTHINK_BUS", "inprocess")
    get_settings.cache_clear()
    try:
        assert main(["trainer", "pause"]) == 2
    finally:
        get_settings.cache_clear()
    assert "--url" in capsys.readouterr().err
