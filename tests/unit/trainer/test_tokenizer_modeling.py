"""The locally trained tokenizer keeps protocol tags intact and round-trips any text; the model presets
build, load offline and fit their size budget."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trainer.modeling import (
    PRESETS,
    SIZE_BUDGET_BYTES,
    build_model,
    count_parameters,
    estimate_parameters,
)
from trainer.tokenizer import TAG_TOKENS, default_corpus, train_tokenizer

PROTOCOL_TEXT = (
    "Numbers: 3, 8, 25, 50. Target: 81.<FORK-1>reach 81 with 50</FORK-1>think<FORK-12@python>print(2**10)"
    "</FORK-12> <JOIN-1>50 + 25 + 8 - 3 - ... = 81</JOIN-1><JOIN-12>1024</JOIN-12>\n<ANSWER>50+25+8-3</ANSWER>"
    "<RETURN>x>y</RETURN>>>"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def test_loads_offline_with_special_tokens_and_adds_nothing(tokenizer: PreTrainedTokenizerBase) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|bos|>",
        "<|endoftext|>",
        "<|pad|>",
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.encode("x", add_special_tokens=True) == _ids(tokenizer, "x")


def test_fork_tag_is_tag_head_digits_and_closing_bracket(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = _ids(tokenizer, "<FORK-12>")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<FORK-", "1", "2", ">"]
    assert tokenizer.decode(ids) == "<FORK-12>"
    for head in TAG_TOKENS:
        assert len(_ids(tokenizer, head)) == 1, head
        assert tokenizer.decode(_ids(tokenizer, head), skip_special_tokens=True) == head  # not special


def _boundaries(tok: PreTrainedTokenizerBase, text: str) -> set[int]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return {a for a, _ in enc["offset_mapping"]} | {b for _, b in enc["offset_mapping"]}


@pytest.mark.parametrize("text", [PROTOCOL_TEXT, *list(default_corpus(n=24, seed=5))])
def test_tag_pieces_are_token_boundaries(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    cuts = _boundaries(tokenizer, text)
    pattern = "|".join(re.escape(t) for t in sorted(TAG_TOKENS, key=len, reverse=True)) + r"|[<>@]|[0-9]"
    for m in re.finditer(pattern, text):
        assert m.start() in cuts and m.end() in cuts, (m.group(0), text[max(0, m.start() - 8) : m.end() + 8])
    assert tokenizer.decode(_ids(tokenizer, text)) == text


def test_digits_are_single_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    text = " ".join(default_corpus(n=60))
    for piece in tokenizer.convert_ids_to_tokens(_ids(tokenizer, text)):
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, piece


@pytest.mark.parametrize(
    "text",
    [
        "",
        " leading and  double  spaces ",
        "tabs\tand\nnewlines\r\n",
        "héllo wörld — 数学 🙂 ×÷ √2",
        "\x00\x7f\ufffd",
        "Ω≈ç",
    ],
)
def test_round_trip_examples(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.decode(_ids(tokenizer, text)) == text


def test_input_is_nfc_normalised(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.decode(_ids(tokenizer, "e\u0301")) == "\u00e9"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_text(tiny_model_dir: Path, text: str) -> None:
    tok = _cached_tokenizer(tiny_model_dir)
    text = unicodedata.normalize("NFC", text)
    assert tok.decode(_ids(tok, text)) == text


def test_every_loader_tokenizes_the_same(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    # In transformers 5, AutoTokenizer on a qwen2 model directory rebuilds Qwen2's fixed pipeline from
    # the vocabulary; the saved pipeline is Qwen2's, so it must agree with loading tokenizer.json as-is.
    raw = PreTrainedTokenizerFast.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert len(raw) == len(tokenizer) and raw.eos_token_id == tokenizer.eos_token_id
    for text in [PROTOCOL_TEXT, "a>(b)>.c>>d@@e<<f 'S I'M\r\n\r\n  y", *default_corpus(n=30, seed=9)]:
        assert _ids(raw, text) == _ids(tokenizer, text)
    # no merge rule ever joins <, > or @ (or a digit) with a neighbour
    for piece in raw.get_vocab():
        if piece not in raw.all_special_tokens and piece not in TAG_TOKENS and len(piece) > 1:
            assert not set(piece) & set("<>@0123456789"), piece


_TOKENIZERS: dict[Path, PreTrainedTokenizerBase] = {}


def _cached_tokenizer(path: Path) -> PreTrainedTokenizerBase:  # hypothesis forbids function-scoped fixtures
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return _TOKENIZERS[path]


def test_vocab_size_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_tokenizer(["abc"], 100)


def test_default_corpus_is_deterministic_and_protocol_shaped() -> None:
    lines = list(default_corpus())
    assert lines == list(default_corpus())
    assert len(lines) >= 300
    joined = "\n".join(lines)
    for head in TAG_TOKENS:
        assert head in joined


# ------------------------------------------------------------------------------------------ modeling
def test_test_preset_builds_loads_offline_and_is_tied(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.eos_token_id and gen["pad_token_id"] == tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n = count_parameters(model)
    assert n == estimate_parameters(len(tokenizer), PRESETS["test"])
    assert 50_000 < n < 200_000


def test_small_preset_fits_the_size_budget(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = build_model(tmp_path / "small", tokenizer, preset="small")
    assert model.config.num_hidden_layers == 5
    assert next(model.parameters()).dtype == torch.bfloat16
    size = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert size < SIZE_BUDGET_BYTES
    assert count_parameters(model) == estimate_parameters(len(tokenizer), PRESETS["small"])
    # With a full 4096-token vocabulary the preset is ~8 M parameters and still fits in bf16.
    n_4096 = estimate_parameters(4096, PRESETS["small"])
    assert n_4096 > 7_000_000 and 2 * n_4096 < SIZE_BUDGET_BYTES - 64 * 1024


def test_overrides_and_bad_presets(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = build_model(
        tmp_path / "m", tokenizer, preset="test", layers=1, hidden_size=32, intermediate_size=64
    )
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    with pytest.raises(ValueError, match="unknown preset"):
        build_model(tmp_path / "x", tokenizer, preset="huge")
    with pytest.raises(ValueError, match="divisible"):
        build_model(tmp_path / "y", tokenizer, hidden_size=30)
