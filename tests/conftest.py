"""Shared fixtures for the whole test tree.

``tiny_model_dir``: a model directory built locally in about a second (no model hub): a byte-level BPE
tokenizer trained on :func:`trainer.tokenizer.default_corpus` and the ``"test"`` preset of
:func:`trainer.modeling.build_model` (about 100 k parameters, random weights). Session-scoped and
read-only: tests that need to change a model directory copy it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_VOCAB = 512

# Triton kernels (the rollout engine's decode attention) run under Triton's interpreter on CPU tensors.
# It is chosen when triton is imported, and transformers may import it during collection: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.modeling import build_model
    from trainer.tokenizer import default_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-test"
    tokenizer = train_tokenizer(default_corpus(), TINY_VOCAB)
    build_model(out, tokenizer, preset="test", seed=0)
    return out
