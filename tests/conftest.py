"""Shared fixtures for the whole test tree.

``tiny_model_dir``: a model directory built locally in about a second (no model hub): a byte-level BPE
tokenizer trained on :func:`trainer.tokenizer.default_corpus` and the ``"test"`` preset of
:func:`trainer.modeling.build_model` (about 100 k parameters, random weights). Session-scoped and
read-only: tests that need to change a model directory copy it first.

Missing tools, packages and servers (``tests/missing.py``): a test that calls ``missing`` is skipped with
an install hint, and under ``CI`` it fails instead (:func:`pytest_runtest_makereport` below), unless it is
marked ``gpu``.

Nothing here imports more than pytest at import time: the GPU tests run where only torch, transformers
and triton are installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.missing import Missing

TINY_VOCAB = 512

# Triton kernels (the rollout engine's decode attention) run under Triton's interpreter on CPU tensors.
# It is chosen when triton is imported, and transformers may import it during collection: set it first.
# (The GPU tests compile the kernel regardless: see tests/gpu/test_rollout_cuda.py.)
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under ``CI``, a skip for want of something (:class:`tests.missing.Missing`) is a failure, except in
    a test marked ``gpu`` (CI has no GPU)."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and call.excinfo is not None
        and isinstance(call.excinfo.value, Missing)
        and os.environ.get("CI")
        and item.get_closest_marker("gpu") is None
    ):
        report.outcome = "failed"
        report.longrepr = f"CI is set, so a missing requirement fails the test: {call.excinfo.value.msg}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.modeling import build_model
    from trainer.tokenizer import default_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-test"
    tokenizer = train_tokenizer(default_corpus(), TINY_VOCAB)
    build_model(out, tokenizer, preset="test", seed=0)
    return out
