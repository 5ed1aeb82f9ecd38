"""The in-process transformers backend: exact greedy decoding, continuous batching, stops and sampling.

The tiny model has random weights with a large init, so its greedy output depends on every position of
its context: a wrong attention mask, position id or cache merge changes the tokens.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shared.backends.base import FinishReason, GenerateRequest, GenerateResult, ModelBackend, SamplingParams
from shared.backends.transformers_backend import TransformersBackend

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "<FORK-1>Find 24 from 3, 8",
    "Numbers: 3, 8, 25, 50. Target: 81. Let me split the search into independent parts.",
    "x",
    "Solve the 4x4 Sudoku:\n1 . . 4\n. 4 1 .\n",
    "héllo <JOIN-2>",
    "Let x = 12 and y = 7. Then x^2 + y^2 =",
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    b = TransformersBackend(tiny_model_dir, max_batch=8)
    yield b
    asyncio.run(b.aclose())


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True).eval()


def _reference_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy search on one unpadded sequence."""
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(ids) :]]


def _req(b: TransformersBackend, text: str, n: int, **kw: object) -> GenerateRequest:
    kw.setdefault("sampling", GREEDY)
    return GenerateRequest(input_ids=b.encode(text), max_new_tokens=n, **kw)  # type: ignore[arg-type]


def test_implements_the_protocol(backend: TransformersBackend, tiny_model_dir: Path) -> None:
    assert isinstance(backend, ModelBackend)
    assert backend.model_id == tiny_model_dir.name
    assert re.fullmatch(r"[0-9a-f]{12}", backend.weight_version)
    text = "<FORK-3>12 + 4</FORK-3>"
    assert backend.decode(backend.encode(text)) == text
    assert TransformersBackend(tiny_model_dir, version="v7").weight_version == "v7"


async def test_greedy_matches_transformers_generate(
    backend: TransformersBackend, reference: torch.nn.Module
) -> None:
    for text in PROMPTS[:3]:
        req = _req(backend, text, 24)
        res = await backend.generate(req)
        expected = _reference_greedy(reference, req.input_ids, 24)
        assert res.output_ids == expected
        assert res.text == backend.decode(expected)
        assert res.finish is (FinishReason.EOS if expected[-1] in backend.eos_ids else FinishReason.LENGTH)
        assert res.weight_version == backend.weight_version


async def test_concurrent_requests_are_batched_and_exact(tiny_model_dir: Path) -> None:
    b = TransformersBackend(tiny_model_dir, max_batch=8)
    try:
        lengths = [20, 32, 12, 28, 16, 24]  # rows finish at different steps and leave the batch
        reqs = [_req(b, t, n) for t, n in zip(PROMPTS, lengths, strict=True)]
        alone = [await b.generate(r) for r in reqs]
        sequential_calls = b.stats["forward_calls"]
        assert sequential_calls == sum(len(r.output_ids) for r in alone)
        assert b.stats["max_batch_seen"] == 1

        # Half arrive together; the rest join a running batch (different cache lengths) a few steps later.
        first = [asyncio.create_task(b.generate(r)) for r in reqs[:3]]
        while b.stats["tokens"] < sum(len(r.output_ids) for r in alone) + 9:
            await asyncio.sleep(0.001)
        later = [asyncio.create_task(b.generate(r)) for r in reqs[3:]]
        prefills = b.stats["prefill_calls"]
        together = await asyncio.gather(*first, *later)
        batched_calls = b.stats["forward_calls"] - sequential_calls
        assert b.stats["prefill_calls"] > prefills  # the late ones were merged into a running batch

        for a, t in zip(alone, together, strict=True):
            assert t.output_ids == a.output_ids
            assert t.text == a.text and t.finish == a.finish
        assert b.stats["max_batch_seen"] > 1
        assert batched_calls < sequential_calls
    finally:
        await b.aclose()


async def test_many_episodes_share_forward_passes(backend: TransformersBackend) -> None:
    reqs = [_req(backend, f"Numbers: {i}, {i + 7}. Target: {i * 3}.", 10) for i in range(12)]
    before = dict(backend.stats)
    results = await asyncio.gather(*(backend.generate(r) for r in reqs))
    calls = backend.stats["forward_calls"] - before["forward_calls"]
    assert calls <= sum(len(r.output_ids) for r in results) / 3  # max_batch 8: 12 requests in ~2 waves
    assert backend.stats["max_batch_seen"] == 8


def _first_stop(b: TransformersBackend, ids: list[int], pattern: str) -> tuple[int, str] | None:
    for k in range(1, len(ids) + 1):
        m = re.search(pattern, b.decode(ids[:k]))
        if m:
            return k, m.group(0)
    return None


async def test_stop_regex_ends_the_request_with_the_match(backend: TransformersBackend) -> None:
    full = await backend.generate(_req(backend, PROMPTS[1], 30))
    ids = [i for i in full.output_ids if i not in backend.eos_ids]
    k = next(k for k in range(3, len(ids)) if "\ufffd" not in backend.decode(ids[:k]))
    prefix = backend.decode(ids[:k])
    pattern = rf"</FORK-\d+>|{re.escape(prefix[-3:])}"
    expected = _first_stop(backend, ids, pattern)
    assert expected is not None
    res = await backend.generate(_req(backend, PROMPTS[1], 30, stop_regex=pattern))
    assert res.finish is FinishReason.STOP
    assert res.output_ids == ids[: expected[0]]
    assert res.matched == expected[1]
    assert res.text == backend.decode(res.output_ids) and res.matched in res.text


async def test_length_and_eos(backend: TransformersBackend) -> None:
    full = await backend.generate(_req(backend, PROMPTS[0], 12))
    short = await backend.generate(_req(backend, PROMPTS[0], 3))
    assert short.finish is FinishReason.LENGTH and short.output_ids == full.output_ids[:3]
    # Make the third greedy token count as EOS: the request ends there, EOS id kept, text without it.
    saved = backend.eos_ids
    backend.eos_ids = frozenset({full.output_ids[2]})
    try:
        res = await backend.generate(_req(backend, PROMPTS[0], 12))
    finally:
        backend.eos_ids = saved
    stop_at = full.output_ids.index(full.output_ids[2]) + 1
    assert res.finish is FinishReason.EOS and res.output_ids == full.output_ids[:stop_at]


async def test_seeded_sampling_is_reproducible(backend: TransformersBackend) -> None:
    def sampled(seed: int, top_p: float = 1.0) -> GenerateRequest:
        return _req(backend, PROMPTS[3], 16, sampling=SamplingParams(temperature=1.0, seed=seed, top_p=top_p))

    a = await backend.generate(sampled(1))
    b, noise, c = await asyncio.gather(
        backend.generate(sampled(1)), backend.generate(sampled(2)), backend.generate(sampled(1, top_p=0.9))
    )
    assert a.output_ids == b.output_ids  # alone or batched beside others: the same tokens
    seeds = await asyncio.gather(*(backend.generate(sampled(s)) for s in range(3, 7)))
    assert len({tuple(r.output_ids) for r in [a, noise, *seeds]}) > 2
    assert len(c.output_ids) > 0
    greedy = await backend.generate(_req(backend, PROMPTS[3], 16))
    top1 = await backend.generate(
        _req(backend, PROMPTS[3], 16, sampling=SamplingParams(temperature=0.7, top_k=1))
    )
    assert top1.output_ids == greedy.output_ids


async def test_cancelled_request_leaves_the_batch(backend: TransformersBackend) -> None:
    slow = asyncio.create_task(backend.generate(_req(backend, PROMPTS[1], 400)))
    start = backend.stats["tokens"]
    while backend.stats["tokens"] < start + 3:
        await asyncio.sleep(0.001)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    res: GenerateResult = await backend.generate(_req(backend, PROMPTS[2], 4))
    assert len(res.output_ids) <= 4
    assert backend.stats["tokens"] - start < 200


async def test_bad_requests(backend: TransformersBackend) -> None:
    with pytest.raises(ValueError, match="empty"):
        await backend.generate(GenerateRequest(input_ids=[], max_new_tokens=3))
    with pytest.raises(ValueError, match="context"):
        await backend.generate(GenerateRequest(input_ids=[5] * 5000, max_new_tokens=3))
    with pytest.raises(re.error):
        await backend.generate(_req(backend, "x", 3, stop_regex="(unclosed"))
    zero = await backend.generate(_req(backend, "x", 0))
    assert zero.finish is FinishReason.LENGTH and zero.output_ids == []


async def test_closed_backend_refuses(tiny_model_dir: Path) -> None:
    b = TransformersBackend(tiny_model_dir)
    await b.generate(_req(b, "x", 2))
    await b.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await b.generate(_req(b, "x", 2))


def test_bad_model_dirs_give_clear_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*trainer\.modeling"):
        TransformersBackend(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformersBackend(empty)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot load .*broken"):
        TransformersBackend(broken)


async def test_update_weights_from_a_module_and_from_a_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """New weights change what greedy decoding produces and the version every result carries; the
    original checkpoint directory restores the original output exactly."""
    from shared.backends.base import WeightSource, WeightUpdate

    b = TransformersBackend(tiny_model_dir)
    try:
        assert b.weight_sources == {WeightSource.MODULE, WeightSource.PATH}
        before = await b.generate(_req(b, PROMPTS[1], 12))
        other: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
        with torch.no_grad():
            other.get_input_embeddings().weight.mul_(-1.0)  # type: ignore[operator]
        await b.update_weights(WeightUpdate(version="flipped", module=other))
        changed = await b.generate(_req(b, PROMPTS[1], 12))
        assert b.weight_version == "flipped" and changed.weight_version == "flipped"
        assert changed.output_ids != before.output_ids
        await b.update_weights(WeightUpdate(version="again", path=str(tiny_model_dir)))
        back = await b.generate(_req(b, PROMPTS[1], 12))
        assert back.output_ids == before.output_ids and back.weight_version == "again"
        with pytest.raises(FileNotFoundError):
            await b.update_weights(WeightUpdate(version="x", path=str(tmp_path)))
        assert b.weight_version == "again"  # a failed update changes nothing
    finally:
        await b.aclose()


async def test_backends_without_weight_updates_say_so() -> None:
    from shared.backends.base import WeightUpdate, WeightUpdateUnsupported
    from shared.backends.scripted import ScriptedBackend

    scripted = ScriptedBackend({"organizer": "x"})
    assert scripted.weight_sources == frozenset()
    with pytest.raises(WeightUpdateUnsupported, match="accepts: none"):
        await scripted.update_weights(WeightUpdate(version="v2", path="/ckpt"))
    with pytest.raises(ValueError, match="exactly one of"):
        WeightUpdate(version="v2")
