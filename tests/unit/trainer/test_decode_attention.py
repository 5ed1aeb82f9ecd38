"""The variable-length decode attention kernel (Triton, run by its interpreter on CPU) against the
masked matmul form. The slot engine's greedy output with it: ``test_slot_engine.py``. Inputs are fp32:
the interpreter computes bf16 wrongly (the bf16 kernel is checked on the GPU by the rollout bench)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.missing import require_module
from trainer.rollout import SlotEngineConfig, attention

TRITON_INSTALL = "pip install -e '.[test]' (triton is a test extra on Linux x86_64)"


@pytest.fixture
def interpreted() -> Iterator[None]:
    """A kernel defined under the interpreter (the kernel is defined on first use and cached); tests/conftest.py
    sets TRITON_INTERPRET=1 before anything imports triton."""
    require_module("triton", TRITON_INSTALL)
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("TRITON_INTERPRET is set to something else")
    attention._kernel.cache_clear()
    yield
    attention._kernel.cache_clear()


def _cache(slots: int, nkv: int, max_len: int, hd: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, slots, nkv, max_len + 1, hd)  # two layers; the kernel gets one (a strided view)
    return torch.randn(shape, generator=g)[1], torch.randn(shape, generator=g)[1]


@pytest.mark.parametrize(("nh", "nkv", "hd"), [(6, 2, 64), (4, 4, 16), (8, 1, 32)])
def test_kernel_matches_masked_attention(interpreted: None, nh: int, nkv: int, hd: int) -> None:
    max_len = 200
    k, v = _cache(8, nkv, max_len, hd, seed=nh + hd)
    # lengths across block edges (64), a one-column row, and an idle row on the scratch column
    pos = torch.tensor([0, 5, 63, 64, 127, 190, max_len])
    q = torch.randn(len(pos), nh, hd, generator=torch.Generator().manual_seed(3))
    ref = attention.masked_decode_attention(q, k, v, attention.visible_columns(pos, 192), hd**-0.5)
    out = attention.varlen_decode_attention(q, k, v, attention.row_lengths(pos, max_len), hd**-0.5)
    active = pos < max_len
    torch.testing.assert_close(out[active], ref[active], atol=1e-5, rtol=1e-5)
    # the idle row attends over column 0 only: its output is that column's value row
    idle = out[-1].view(nh, hd)
    torch.testing.assert_close(idle, v[len(pos) - 1, :, 0].repeat_interleave(nh // nkv, dim=0))


def test_kernel_reads_only_each_rows_columns(interpreted: None) -> None:
    k, v = _cache(3, 2, 160, 16, seed=9)
    q = torch.randn(3, 4, 16)
    lens = torch.tensor([10, 70, 1], dtype=torch.int32)
    before = attention.varlen_decode_attention(q, k, v, lens, 0.25)
    k[:, :, 80:] = float("nan")  # columns no row may read
    v[:, :, 80:] = float("nan")
    after = attention.varlen_decode_attention(q, k, v, lens, 0.25)
    torch.testing.assert_close(after, before)


def test_head_dim_must_suit_the_kernel() -> None:
    k, v = _cache(2, 1, 32, 24, seed=1)
    with pytest.raises(ValueError, match="head_dim"):
        attention.varlen_decode_attention(torch.randn(2, 2, 24), k, v, torch.ones(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="decode_attention"):
        SlotEngineConfig(decode_attention="flash")
