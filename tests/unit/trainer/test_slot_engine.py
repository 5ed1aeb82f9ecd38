"""The slot engine on CPU against transformers' own Qwen2 on a tiny random model (fp32)."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from shared.backends.base import FinishReason, GenerateRequest, GenerateResult, ModelBackend, SamplingParams
from tests.missing import require_module
from tests.unit.trainer.test_decode_attention import TRITON_INSTALL
from trainer.rollout import SlotEngine, SlotEngineBackend, SlotEngineConfig, qwen2
from trainer.rollout.sampling import SampleMode, sample
from trainer.rollout.stops import trigger_chars

VOCAB = 300
EOS = 299
GREEDY = SamplingParams(temperature=0.0)
_ALPHABET = "abcdefghij<>/-0123456789 ."


class TableTokenizer:
    """id ``i`` <-> a fixed 1-2 character string; enough to decode and to match stop patterns."""

    def __init__(self) -> None:
        n = len(_ALPHABET)
        self.table = [_ALPHABET[i % n] + (_ALPHABET[(i // n) % n] if i >= n else "") for i in range(VOCAB)]
        self.eos_token_id = EOS

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(self.table[i] for i in ids)

    def encode(self, text: str, **_: object) -> list[int]:
        return [self.table.index(c) for c in text]  # single characters only: ids 0..n-1


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(1234)
    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.3,  # a larger init than the default keeps greedy output from repeating one id
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> TableTokenizer:
    return TableTokenizer()


def _engine(model: Qwen2ForCausalLM, tok: TableTokenizer, **kw: object) -> SlotEngine:
    eos = kw.pop("eos_token_ids", None)
    cfg = SlotEngineConfig(max_slots=8, max_len=160, min_ctx_bucket=32, **kw)  # type: ignore[arg-type]
    return SlotEngine(model, tok, cfg, device="cpu", eos_token_ids=eos)  # type: ignore[arg-type]


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (n,), generator=g).tolist()


@torch.no_grad()
def _hf_greedy(model: Qwen2ForCausalLM, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos if eos is not None else -1,
        pad_token_id=EOS,
    )
    return out[0, len(ids) :].tolist()


# (a) the forward ---------------------------------------------------------------------------------
@torch.no_grad()
def test_forward_logits_match_transformers(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok)
    ids = _prompt(37, seed=1)
    ref = model(torch.tensor([ids])).logits[0]  # [N, V]
    w, kc, vc = eng.weights, eng.k_cache, eng.v_cache
    # prefill of a prefix, then a continuation from a cached start, into slot 5
    out1 = qwen2.prefill_lists(w, kc, vc, eng.cos, eng.sin, [ids[:20]], [5], [0], return_logits=True)
    out2 = qwen2.prefill_lists(w, kc, vc, eng.cos, eng.sin, [ids[20:36]], [5], [20], return_logits=True)
    assert out1 is not None and out2 is not None
    torch.testing.assert_close(out1[0], ref[:20], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out2[0], ref[20:36], atol=1e-4, rtol=1e-4)
    # one decode step for slot 5 at position 36; the other rows idle on the scratch column
    tokens = torch.zeros(8, dtype=torch.long)
    pos = torch.full((8,), eng.config.max_len, dtype=torch.long)
    tokens[5], pos[5] = ids[36], 36
    logits = qwen2.decode_step(w, kc, vc, eng.cos, eng.sin, tokens, pos, n_ctx=64)
    torch.testing.assert_close(logits[5], ref[36], atol=1e-4, rtol=1e-4)


# (b) greedy equals transformers' generate -------------------------------------------------------
def test_concurrent_greedy_matches_generate(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[])
    prompts = [_prompt(n, seed=n) for n in (3, 11, 26, 50, 7)]
    with torch.no_grad():
        results = eng.run([GenerateRequest(input_ids=p, max_new_tokens=24, sampling=GREEDY) for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        assert r.output_ids == _hf_greedy(model, p, 24)
        assert r.finish == FinishReason.LENGTH
        assert r.text == tok.decode(r.output_ids)
    assert eng.stats.mean_active > 4  # all five shared the steps
    assert not eng.has_work


# (c) admission mid-run ---------------------------------------------------------------------------
def test_admission_mid_run_matches_alone(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[])
    first = [_prompt(n, seed=100 + n) for n in (9, 14, 21)]
    late = _prompt(17, seed=7)
    results: dict[int, GenerateResult] = {}
    with torch.no_grad():
        handles = [
            eng.submit(GenerateRequest(input_ids=p, max_new_tokens=30, sampling=GREEDY)) for p in first
        ]
        for _ in range(6):
            results.update(eng.step())
        late_handle = eng.submit(GenerateRequest(input_ids=late, max_new_tokens=20, sampling=GREEDY))
        while eng.has_work:
            results.update(eng.step())
    assert results[late_handle].output_ids == _hf_greedy(model, late, 20)
    for h, p in zip(handles, first, strict=True):
        assert results[h].output_ids == _hf_greedy(model, p, 30)


# (d) continuation reuses the slot's cache --------------------------------------------------------
def test_continuation_reuses_prefix(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[])
    prompt = _prompt(12, seed=3)
    with torch.no_grad():
        (first,) = eng.run(
            [GenerateRequest(input_ids=prompt, max_new_tokens=10, sampling=GREEDY, session="ep")]
        )
        injected = _prompt(15, seed=4)
        full = prompt + first.output_ids + injected
        (cont,) = eng.run([GenerateRequest(input_ids=full, max_new_tokens=12, sampling=GREEDY, session="ep")])
        # resuming with nothing appended (the stop token was the last id) needs no prefill at all
        again = full + cont.output_ids
        (resumed,) = eng.run(
            [GenerateRequest(input_ids=again, max_new_tokens=5, sampling=GREEDY, session="ep")]
        )
        fresh_engine = _engine(model, tok, eos_token_ids=[])
        (fresh,) = fresh_engine.run([GenerateRequest(input_ids=full, max_new_tokens=12, sampling=GREEDY)])
    assert cont.cached_tokens == len(prompt) + len(first.output_ids) - 1
    assert fresh.cached_tokens == 0
    assert cont.output_ids == fresh.output_ids == _hf_greedy(model, full, 12)
    assert resumed.cached_tokens == len(again) - 1
    assert resumed.output_ids == _hf_greedy(model, again, 5)


def test_prefix_mismatch_falls_back_to_full_prefill(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[])
    prompt = _prompt(12, seed=5)
    with torch.no_grad():
        (first,) = eng.run(
            [GenerateRequest(input_ids=prompt, max_new_tokens=6, sampling=GREEDY, session="s")]
        )
        edited = prompt + [(first.output_ids[0] + 1) % (VOCAB - 1)] + first.output_ids[1:]
        (other,) = eng.run(
            [GenerateRequest(input_ids=edited, max_new_tokens=8, sampling=GREEDY, session="s")]
        )
    assert other.cached_tokens == 0
    assert other.output_ids == _hf_greedy(model, edited, 8)


def test_retained_slots_are_evicted_when_needed(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[])  # 8 slots
    with torch.no_grad():
        eng.run(
            [
                GenerateRequest(input_ids=_prompt(5, seed=s), max_new_tokens=3, sampling=GREEDY)
                for s in range(8)
            ]
        )
        prompts = [_prompt(6, seed=50 + s) for s in range(10)]
        results = eng.run([GenerateRequest(input_ids=p, max_new_tokens=4, sampling=GREEDY) for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        assert r.output_ids == _hf_greedy(model, p, 4)


# (e) endings -------------------------------------------------------------------------------------
def test_stop_regex_ends_at_the_completing_token(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    prompt = _prompt(10, seed=11)
    ref = _hf_greedy(model, prompt, 40)
    eng = _engine(model, tok, eos_token_ids=[])
    for pattern in (re.escape(tok.decode(ref[12:15])), re.escape(tok.decode(ref[20:22])) + r"\w?", r"[<>]"):
        expected_n = next((n for n in range(1, 41) if re.search(pattern, tok.decode(ref[:n]))), None)
        with torch.no_grad():
            (r,) = eng.run(
                [GenerateRequest(input_ids=prompt, max_new_tokens=40, stop_regex=pattern, sampling=GREEDY)]
            )
        if expected_n is None:
            assert r.finish == FinishReason.LENGTH and r.output_ids == ref
            continue
        assert r.finish == FinishReason.STOP, pattern
        assert r.output_ids == ref[:expected_n]
        match = re.search(pattern, r.text)
        assert match is not None and r.matched == match.group(0)


def test_stop_match_far_into_a_long_output(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    """The stop search decodes only the ids since its last search plus a lookback; a match more than
    that lookback into the output, whose trigger ids came up many times before, is still found."""
    prompt = _prompt(5, seed=12)
    ref = _hf_greedy(model, prompt, 140)
    eng = _engine(model, tok, eos_token_ids=[])
    pattern = re.escape(tok.decode(ref[110:114]))
    expected_n = next(n for n in range(1, 141) if re.search(pattern, tok.decode(ref[:n])))
    assert expected_n > 100
    with torch.no_grad():
        (r,) = eng.run([GenerateRequest(prompt, 140, stop_regex=pattern, sampling=GREEDY)])
    assert r.finish == FinishReason.STOP
    assert r.output_ids == ref[:expected_n]
    assert r.text == tok.decode(ref[:expected_n]) and r.matched == tok.decode(ref[110:114])


def test_eos_and_length(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    prompt = _prompt(8, seed=21)
    ref = _hf_greedy(model, prompt, 30)
    eos = ref[7]
    eng = _engine(model, tok, eos_token_ids=[eos])
    with torch.no_grad():
        short, ended, none = eng.run(
            [
                GenerateRequest(input_ids=prompt, max_new_tokens=3, sampling=GREEDY),
                GenerateRequest(input_ids=prompt, max_new_tokens=30, sampling=GREEDY),
                GenerateRequest(input_ids=prompt, max_new_tokens=0, sampling=GREEDY),
            ]
        )
    assert short.finish == FinishReason.LENGTH and short.output_ids == ref[:3]
    assert ended.finish == FinishReason.EOS
    assert ended.output_ids == _hf_greedy(model, prompt, 30, eos=eos)
    assert ended.output_ids[-1] == eos
    assert none.finish == FinishReason.LENGTH and none.output_ids == []


def test_cache_full_ends_with_length_and_long_prompt_is_refused(
    model: Qwen2ForCausalLM, tok: TableTokenizer
) -> None:
    eng = _engine(model, tok, eos_token_ids=[])  # max_len 160
    prompt = _prompt(150, seed=31)
    with torch.no_grad():
        (r,) = eng.run([GenerateRequest(input_ids=prompt, max_new_tokens=50, sampling=GREEDY)])
    assert r.finish == FinishReason.LENGTH and len(r.output_ids) == 160 - 150 + 1
    assert r.output_ids == _hf_greedy(model, prompt, 11)
    with pytest.raises(ValueError, match="max_len"):
        eng.submit(GenerateRequest(input_ids=_prompt(160, seed=1), max_new_tokens=1))


def test_trigger_chars() -> None:
    assert trigger_chars(re.compile(r"</FORK-\d+>|<JOIN-(\d+)>|</ANSWER>")) == {">"}
    assert trigger_chars(re.compile(r"ab[cd]")) == {"c", "d", "C", "D"}
    assert trigger_chars(re.compile(r"x>\s*")) is None  # could end in whitespace
    assert trigger_chars(re.compile(r"end\w")) is None


# sampling ----------------------------------------------------------------------------------------
def test_sampling_is_seeded_per_request(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    prompt = _prompt(9, seed=41)
    hot = SamplingParams(temperature=1.0, top_p=0.95, seed=77)
    with torch.no_grad():
        alone = _engine(model, tok, eos_token_ids=[]).run([GenerateRequest(prompt, 20, sampling=hot)])[0]
        others = [GenerateRequest(_prompt(n, seed=n), 20, sampling=SamplingParams(seed=n)) for n in (4, 13)]
        crowd = _engine(model, tok, eos_token_ids=[]).run(
            [*others, GenerateRequest(prompt, 20, sampling=hot)]
        )
        top1 = _engine(model, tok, eos_token_ids=[]).run(
            [GenerateRequest(prompt, 20, sampling=SamplingParams(temperature=0.7, top_k=1, seed=3))]
        )[0]
    assert crowd[-1].output_ids == alone.output_ids
    assert top1.output_ids == _hf_greedy(model, prompt, 20)


def test_gumbel_sampling_frequencies() -> None:
    rows = 20000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(rows, 5)
    seeds = torch.arange(rows, dtype=torch.long)
    ones = torch.ones(rows)
    args = (ones, ones, torch.full((rows,), 5), seeds, torch.zeros(rows, dtype=torch.long))
    drawn = sample(logits, *args, SampleMode.SAMPLE)
    freq = torch.bincount(drawn, minlength=5).float() / rows
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    # top-p 0.5 keeps only the most likely id (p = 0.53); top-k 2 keeps two
    assert (sample(logits, ones, ones * 0.5, *args[2:], SampleMode.FILTERED) == 0).all()
    top2 = sample(logits, ones, ones, torch.full((rows,), 2), *args[3:], SampleMode.FILTERED)
    assert set(top2.unique().tolist()) == {0, 1}


# the async backend ---------------------------------------------------------------------------------
async def test_backend_shares_steps_between_concurrent_requests(
    model: Qwen2ForCausalLM, tok: TableTokenizer
) -> None:
    backend = SlotEngineBackend(
        _engine(model, tok, eos_token_ids=[]), tok, model_id="tiny", weight_version="v1"
    )
    assert isinstance(backend, ModelBackend)
    prompts = [_prompt(n, seed=60 + n) for n in (4, 9, 15, 22)]
    try:
        with torch.no_grad():
            results = await asyncio.gather(
                *(backend.generate(GenerateRequest(p, 16, sampling=GREEDY)) for p in prompts)
            )
    finally:
        await backend.aclose()
    for p, r in zip(prompts, results, strict=True):
        assert r.output_ids == _hf_greedy(model, p, 16)
        assert r.weight_version == "v1"
    stats = backend.stats()
    assert stats.tokens == 4 * 16 and stats.mean_active > 1
    assert backend.decode(backend.encode("ab<")) == "ab<"


def test_update_weights_forgets_retained_caches(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[])
    prompt = _prompt(10, seed=71)
    with torch.no_grad():
        (first,) = eng.run([GenerateRequest(prompt, 6, sampling=GREEDY, session="w")])
        eng.update_weights(model)  # same weights: outputs unchanged, but caches are no longer trusted
        full = prompt + first.output_ids
        (cont,) = eng.run([GenerateRequest(full, 6, sampling=GREEDY, session="w")])
    assert cont.cached_tokens == 0
    assert cont.output_ids == _hf_greedy(model, full, 6)


# steps in flight ------------------------------------------------------------------------------------
def _mixed_run(eng: SlotEngine, eos: int) -> list[tuple[list[int], FinishReason, str | None, int]]:
    """Twelve requests on eight slots (EOS, length, stop regex): one continuation, then three more."""
    first = [_prompt(16 + 3 * i, seed=200 + i) for i in range(8)]  # 16+: SlotPool keys on 16 ids
    stops = [None, r"[<>]", None, r"a\.|9-", None, None, r"[<>]", None]
    results: dict[int, GenerateResult] = {}
    with torch.no_grad():
        handles = [
            eng.submit(GenerateRequest(p, 6 + 2 * i, stop, GREEDY, session=f"s{i}"))
            for i, (p, stop) in enumerate(zip(first, stops, strict=True))
        ]
        while handles[0] not in results:
            results.update(eng.step())
        cont = first[0] + results[handles[0]].output_ids + _prompt(4, seed=400)
        handles.append(eng.submit(GenerateRequest(cont, 10, sampling=GREEDY, session="s0")))
        handles += [
            eng.submit(GenerateRequest(_prompt(9, seed=300 + i), 12, sampling=GREEDY)) for i in range(3)
        ]
        while eng.has_work:
            results.update(eng.step())
    return [(r.output_ids, r.finish, r.matched, r.cached_tokens) for r in (results[h] for h in handles)]


@pytest.mark.parametrize("depth", [1, 2])
def test_steps_in_flight_change_nothing(model: Qwen2ForCausalLM, tok: TableTokenizer, depth: int) -> None:
    eos = _hf_greedy(model, _prompt(16, seed=200), 6)[3]  # ends the first request early, maybe others
    serial = _mixed_run(_engine(model, tok, eos_token_ids=[eos], pipeline_depth=0), eos)
    piped_engine = _engine(model, tok, eos_token_ids=[eos], pipeline_depth=depth)
    piped = _mixed_run(piped_engine, eos)
    assert piped == serial
    assert {f for _, f, _, _ in serial} == {FinishReason.EOS, FinishReason.LENGTH, FinishReason.STOP}
    assert serial[8][3] > 0  # the continuation reused its slot's cache
    for (out, _, _, _), p in zip(serial[9:], [_prompt(9, seed=300 + i) for i in range(3)], strict=True):
        assert out == _hf_greedy(model, p, 12, eos=eos)
    assert piped_engine.stats.tokens == sum(len(o) for o, _, _, _ in piped)


def test_linear_context_buckets(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    eng = _engine(model, tok, eos_token_ids=[], ctx_bucket_step=32)
    assert eng.ctx_buckets == [32, 64, 96, 128, 160, 161]
    assert _engine(model, tok).ctx_buckets == [32, 64, 128, 161]
    prompts = [_prompt(n, seed=500 + n) for n in (20, 70)]  # windows 64 -> 96 -> 128 as they grow
    with torch.no_grad():
        results = eng.run([GenerateRequest(p, 40, sampling=GREEDY) for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        assert r.output_ids == _hf_greedy(model, p, 40)
    with pytest.raises(ValueError, match="ctx_bucket_step"):
        SlotEngineConfig(ctx_bucket_step=-1)


def test_greedy_with_the_varlen_kernel_matches_generate(model: Qwen2ForCausalLM, tok: TableTokenizer) -> None:
    require_module("triton", TRITON_INSTALL)
    if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it: the kernel on CPU tensors
        pytest.skip("the Triton kernel needs TRITON_INTERPRET=1 on CPU")
    eng = _engine(model, tok, eos_token_ids=[], decode_attention="varlen")
    assert eng.varlen and eng.ctx_buckets == [eng.config.max_len + 1]
    prompts = [_prompt(n, seed=n) for n in (3, 26, 50, 7)]
    with torch.no_grad():
        results = eng.run([GenerateRequest(input_ids=p, max_new_tokens=20, sampling=GREEDY) for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        assert r.output_ids == _hf_greedy(model, p, 20)
    # the attention read each busy row's own context (and one column per idle row), no padded window
    stats = eng.stats
    assert (
        stats.window_slot_steps
        == stats.context_slot_steps + stats.padded_slot_steps - stats.active_slot_steps
    )


def test_slot_pool_finds_continuations_of_short_and_long_caches() -> None:
    from trainer.rollout.slots import SlotPool

    pool = SlotPool(4)
    short, long_ = pool.take_free(), pool.take_free()
    assert (short, long_) == (0, 1)
    pool.release(short, "a", [1, 2, 3])  # fewer ids than the 16 the index keys on
    pool.release(long_, "b", list(range(20)))
    assert pool.take_continuation("a", [1, 2, 3]) is None  # not longer: nothing to continue
    assert pool.take_continuation("b", [1, 2, 3, 4]) is None  # another session
    assert pool.take_continuation("a", [1, 2, 3, 4, 5]) == (0, 3)
    assert pool.take_continuation("a", [1, 2, 3, 4, 5]) is None  # taken
    assert pool.take_continuation("b", [*range(20), 7]) == (1, 20)
    third = pool.take_free()
    pool.release(third, None, [9, 9])
    assert pool.n_available == 2  # slots 0 and 1 went to their continuations
    pool.forget_caches()  # after a weight update every cache is gone, short keys included
    assert pool.take_continuation(None, [9, 9, 1]) is None and pool.n_available == 2
