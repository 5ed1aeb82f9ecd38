"""Checkpoints of a GRPO run: save, find the newest, restore.

A checkpoint directory (``out/checkpoint-<step>`` or ``out/final``) is a loadable model directory plus
the run's state:

- the model (``save_pretrained``: ``config.json``, safetensors in the training dtype, fp32 by default)
  and its tokenizer, so ``asyncthink solve --model out/final`` works on it;
- ``grpo_config.json``: the run's :class:`~trainer.grpo.config.GRPOConfigArgs` (not ``config.json``,
  which is the model's);
- ``metrics.jsonl``: every step's metrics up to this step;
- ``trainer_state.pt``: step, optimizer state, torch / CUDA / Python RNG states.

Writes go to a ``.tmp`` sibling that is renamed into place, so a run cut off mid-save leaves the
previous checkpoint intact. Limits: one process; no sharded optimizer states.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
RUN_CONFIG_FILE = "grpo_config.json"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    optimizer: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: Any


def save_checkpoint(
    path: Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    step: int,
    run_config: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> Path:
    """Write a checkpoint to ``path`` atomically (``path.tmp`` then rename); returns ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2) + "\n")
    with (tmp / METRICS_FILE).open("w") as fh:
        for rec in metrics:
            fh.write(json.dumps(rec) + "\n")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": _py_state_to_list(random.getstate()),
    }
    torch.save(state, tmp / STATE_FILE)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def find_latest(out: Path) -> Path | None:
    """The checkpoint in ``out`` with the highest step (``checkpoint-<step>`` or ``final``), if any."""
    best: tuple[int, Path] | None = None
    if not out.is_dir():
        return None
    for child in out.iterdir():
        if not child.is_dir() or not (child / STATE_FILE).is_file():
            continue
        m = _CHECKPOINT_RE.match(child.name)
        if m:
            step = int(m.group(1))
        elif child.name == "final":
            step = read_step(child)
        else:
            continue
        if best is None or step > best[0] or (step == best[0] and child.name != "final"):
            best = (step, child)
    return best[1] if best else None


def read_step(path: Path) -> int:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return int(state["step"])


def load_state(path: Path) -> TrainerState:
    """The trainer state of checkpoint ``path`` (tensors on the CPU)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return TrainerState(
        step=int(state["step"]),
        optimizer=state["optimizer"],
        torch_rng=state["torch_rng"],
        cuda_rng=list(state["cuda_rng"]),
        python_rng=_py_state_from_list(state["python_rng"]),
    )


def restore_rng(state: TrainerState) -> None:
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    random.setstate(state.python_rng)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    file = path / METRICS_FILE
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _py_state_to_list(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_list(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)
