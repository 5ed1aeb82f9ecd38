"""In-process backends swapped while a request runs: the request goes on, and says which tokens came from
which weights (``weight_versions`` spans), so nothing generated before the swap carries the new label."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.backends.base import GenerateRequest, SamplingParams, WeightUpdate

GREEDY = SamplingParams(temperature=0.0)


async def _swap_while_running(backend: Any, update: WeightUpdate, prompt: list[int], n: int) -> Any:
    """Start a request of ``n`` tokens, swap once it has produced a few, return its result."""
    running = asyncio.create_task(backend.generate(GenerateRequest(prompt, n, sampling=GREEDY)))
    while not running.done() and _tokens(backend) < 3:
        await asyncio.sleep(0.01)
    await backend.update_weights(update)
    return await running


def _tokens(backend: Any) -> int:
    stats = backend.stats
    return int(stats["tokens"]) if isinstance(stats, dict) else int(stats().tokens)


async def test_transformers_backend_labels_tokens_by_version(tiny_model_dir: Path) -> None:
    from shared.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, version="v1")
    try:
        prompt = backend.encode("Numbers: 3 7 25 50 target: 75")
        update = WeightUpdate("v2", path=str(tiny_model_dir))
        result = await _swap_while_running(backend, update, prompt, 400)
        assert backend.weight_version == "v2"
        spans = result.weight_versions
        assert [s.version for s in spans] == ["v1", "v2"], spans
        assert spans[0].start == 0 and spans[0].end == spans[1].start and spans[1].end == len(result.output_ids)
        assert result.weight_version == "v2" and result.versions == ["v1", "v2"]
        after = await backend.generate(GenerateRequest(prompt, 4, sampling=GREEDY))
        assert after.weight_versions == () and after.versions == ["v2"]
    finally:
        await backend.aclose()


async def test_slot_engine_backend_labels_tokens_by_version_and_loads_a_directory(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    engine = SlotEngine(model, tok, SlotEngineConfig(max_slots=4, max_len=512, min_ctx_bucket=32), device="cpu",
                        eos_token_ids=[])  # fmt: skip
    backend = SlotEngineBackend(engine, tok, model_id="tiny", weight_version="v1")
    try:
        prompt = backend.encode("Numbers: 3 7 25 50 target: 75")
        with torch.no_grad():
            result = await _swap_while_running(backend, WeightUpdate("v2", path=str(tiny_model_dir)), prompt, 300)
        spans = result.weight_versions
        assert [s.version for s in spans] == ["v1", "v2"], spans
        assert spans[-1].end == len(result.output_ids)
        assert backend.weight_version == "v2"
    finally:
        await backend.aclose()


def test_a_version_label_never_holds_the_separator() -> None:
    with pytest.raises(ValueError, match="contains"):
        WeightUpdate("a+b", path="/x")
