"""Checkpoint identity: the content hash of a model directory's weights, and the label of the initial model.

:func:`content_hash` is the sha256 over a checkpoint's weight files in name order (each file's name, then
its bytes): ``*.safetensors``, or ``*.bin`` when there are none. Config, tokenizer and any other file are
left out, so two directories with the same weights have the same hash. The in-process transformers
backend labels a directory it loads without an explicit version with the hash's first 12 hex digits
(:func:`initial_label`), so every process that loads the same initial model reports the same version.
The trainer records the full hash of every version it registers and checks it again before it serves
that version again (rollback), so a checkpoint changed on disk is refused instead of served.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

LABEL_DIGITS = 12  # hex digits of the hash in the initial model's version label


def weight_files(model_dir: str | Path) -> list[Path]:
    """The files :func:`content_hash` reads: ``*.safetensors``, else ``*.bin``, sorted by name."""
    path = Path(model_dir)
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def content_hash(model_dir: str | Path) -> str:
    """sha256 (hex) over the weight files' names and bytes; FileNotFoundError when there are none."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def initial_label(model_dir: str | Path) -> str:
    """The version label of a model directory loaded without one (the hash's first 12 hex digits)."""
    return content_hash(model_dir)[:LABEL_DIGITS]
