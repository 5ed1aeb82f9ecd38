"""The rollout engine's CUDA paths on a real GPU: the compiled Triton decode-attention kernel and the
CUDA-graph decode step (``trainer/rollout/``). The CPU suite runs the same kernel under Triton's
interpreter (``tests/unit/trainer/test_decode_attention.py``) and the engine eagerly; neither compiles
the kernel for a device or captures a graph, which is what these check.

Run (from the repository root, on a machine with an NVIDIA GPU)::

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_rollout_cuda.py

They need only pytest, torch (CUDA), transformers, numpy and triton; they build a small random Qwen2
model in memory (no files, no network). Without a CUDA device (CI never has one) every test is skipped,
and the ``gpu`` marker keeps that skip from failing under ``CI`` (``tests/conftest.py``).

What each proves:

- the kernel is compiled (a ``JITFunction``, not the interpreter's function) and matches the masked
  attention in fp32 (to 1e-4) and bf16 (to 2e-2) across block edges, GQA groups and an idle row, and
  reads no column past a row's length (NaNs there change nothing);
- the slot engine with CUDA graphs gives the same greedy tokens as without (same kernels, so exactly),
  each token is the HF model's greedy choice (teacher-forced: its logit is the row's maximum up to
  float noise), with the kernel and with the masked form;
- graphs were captured (``stats.graphs`` and the engine's graph table: one per batch bucket used),
  a second run of the same shapes captures none and gives the same tokens (replayed), and weights copied
  in place reach the captured graphs (the output follows the new weights with no new capture).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m gpu on a GPU machine)"),
]

VOCAB = 256
EOS = 255
ALPHABET = "abcdefghij<>/-0123456789 ."


class TableTokenizer:
    """id ``i`` <-> a fixed 1-2 character string: enough for the engine's decode and stop checks."""

    eos_token_id = EOS

    def __init__(self) -> None:
        n = len(ALPHABET)
        self.table = [ALPHABET[i % n] + (ALPHABET[(i // n) % n] if i >= n else "") for i in range(VOCAB)]

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(self.table[i] for i in ids)


def tiny_qwen2(seed: int) -> Any:
    """A random Qwen2 (head_dim 32, 2 query heads per KV head), fp32, eval, on the GPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, vocab_size=VOCAB, max_position_embeddings=1024, eos_token_id=EOS,
        pad_token_id=EOS, bos_token_id=0, tie_word_embeddings=True,
        initializer_range=0.3,  # a larger init than the default keeps greedy output from repeating one id
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval().to("cuda")


@pytest.fixture(autouse=True)
def compiled(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The kernel defined with the interpreter off (it is defined on first use and cached, reading
    ``TRITON_INTERPRET`` then; tests/conftest.py sets it to 1 for the CPU suite unless it is set)."""
    pytest.importorskip("triton")
    from trainer.rollout import attention

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attention._kernel.cache_clear()
    yield attention
    attention._kernel.cache_clear()


def test_the_kernel_is_compiled_not_interpreted(compiled: Any) -> None:
    from triton.runtime.jit import JITFunction

    kernel = compiled._kernel()
    assert isinstance(kernel, JITFunction) and type(kernel).__name__ != "InterpretedFunction", type(kernel)
    assert os.environ["TRITON_INTERPRET"] == "0"


def _cache(slots: int, nkv: int, max_len: int, hd: int, seed: int, dtype: Any) -> tuple[Any, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, slots, nkv, max_len + 1, hd)  # two layers; the kernel gets one (a strided view)
    k = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)[1].to(dtype)
    v = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)[1].to(dtype)
    return k, v


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize(("nh", "nkv", "hd"), [(6, 2, 64), (4, 4, 16), (8, 1, 32), (14, 2, 64)])
def test_compiled_kernel_matches_masked_attention(compiled: Any, dtype_name: str, nh: int, nkv: int, hd: int) -> None:
    dtype = getattr(torch, dtype_name)
    max_len = 1100
    k, v = _cache(16, nkv, max_len, hd, seed=nh + hd, dtype=dtype)
    # lengths across block edges (64), a one-column row, a long one and an idle row on the scratch column
    pos = torch.tensor([0, 5, 63, 64, 127, 190, 1000, 1099, max_len], device="cuda")
    q = torch.randn(len(pos), nh, hd, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    q = q.to(dtype)
    scale = hd**-0.5
    # the reference in fp32 from the same (rounded) inputs
    ref = compiled.masked_decode_attention(q.float(), k.float(), v.float(), compiled.visible_columns(pos, 1101), scale)
    out = compiled.varlen_decode_attention(q, k, v, compiled.row_lengths(pos, max_len), scale)
    assert out.dtype == dtype and out.shape == (len(pos), nh * hd)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    active = pos < max_len
    torch.testing.assert_close(out[active].float(), ref[active], atol=tol, rtol=tol)
    # the idle row attends over column 0 only: its output is that column's value row
    idle = out[-1].view(nh, hd).float()
    torch.testing.assert_close(idle, v[len(pos) - 1, :, 0].float().repeat_interleave(nh // nkv, dim=0), atol=tol, rtol=tol)


def test_compiled_kernel_reads_only_each_rows_columns(compiled: Any) -> None:
    k, v = _cache(3, 2, 300, 32, seed=9, dtype=torch.float32)
    q = torch.randn(3, 4, 32, device="cuda")
    lens = torch.tensor([10, 130, 1], dtype=torch.int32, device="cuda")
    before = compiled.varlen_decode_attention(q, k, v, lens, 0.25)
    k[:, :, 140:] = float("nan")  # columns no row may read
    v[:, :, 140:] = float("nan")
    after = compiled.varlen_decode_attention(q, k, v, lens, 0.25)
    assert not after.isnan().any()
    torch.testing.assert_close(after, before, atol=0, rtol=0)


# -------------------------------------------------------------------------------------------- the engine
def _engine(model: Any, **config: Any) -> Any:
    from trainer.rollout import SlotEngine, SlotEngineConfig

    cfg = SlotEngineConfig(max_slots=8, max_len=256, min_ctx_bucket=32, **config)
    return SlotEngine(model, TableTokenizer(), cfg, device="cuda", eos_token_ids=[])


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in (3, 26, 50, 7, 90)]


def _greedy(engine: Any, prompts: list[list[int]], n: int = 24) -> list[list[int]]:
    from shared.backends.base import GenerateRequest, SamplingParams

    with torch.no_grad():
        results = engine.run([GenerateRequest(p, n, sampling=SamplingParams(temperature=0.0)) for p in prompts])
    return [r.output_ids for r in results]


@torch.no_grad()
def _assert_hf_greedy(model: Any, prompt: list[int], output: list[int], slack: float = 1e-3) -> None:
    """Teacher-forced: each generated id is the HF model's argmax after the ids before it, up to float
    noise (its logit within ``slack`` of the row's maximum, relative), so near-ties cannot flake."""
    ids = torch.tensor([prompt + output], device="cuda")
    logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(output)].float()  # [n, V]
    top = logits.max(dim=-1).values
    chosen = logits.gather(1, torch.tensor(output, device="cuda")[:, None])[:, 0]
    gap = (top - chosen) / top.abs().clamp(min=1.0)
    assert (gap <= slack).all(), f"not greedy at {gap.argmax().item()}: gap {gap.max().item():.2e}"
    assert (gap == 0).float().mean() >= 0.9  # and mostly the exact argmax


@pytest.mark.parametrize("attention", ["varlen", "masked"])
def test_cuda_graphs_give_the_tokens_of_eager_steps_and_of_hf(attention: str) -> None:
    model = tiny_qwen2(seed=1234)
    prompts = _prompts()
    graphed = _engine(model, cuda_graphs=True, decode_attention=attention, dtype="float32")
    eager = _engine(model, cuda_graphs=False, decode_attention=attention, dtype="float32")
    assert graphed.use_graphs and not eager.use_graphs and graphed.varlen is (attention == "varlen")
    with_graphs, without = _greedy(graphed, prompts), _greedy(eager, prompts)
    assert with_graphs == without  # the same kernels, captured or launched one by one
    assert all(len(out) == 24 for out in with_graphs)
    for prompt, out in zip(prompts, with_graphs, strict=True):
        _assert_hf_greedy(model, prompt, out)
    # graphs were captured (one per (batch bucket, window, mode) used), none when off
    assert graphed.stats.graphs == len(graphed._graphs) > 0 and eager.stats.graphs == 0
    if attention == "varlen":  # one window for every step: max_len + 1 columns
        assert {n_ctx for _, n_ctx, _ in graphed._graphs} == {257}


def test_graphs_are_replayed_and_follow_weights_copied_in_place() -> None:
    model = tiny_qwen2(seed=1234)
    engine = _engine(model)  # the defaults on CUDA: bf16, the kernel when Triton is there, graphs on
    assert engine.varlen and engine.use_graphs and engine.dtype == torch.bfloat16
    prompts = _prompts()
    first = _greedy(engine, prompts)
    captured = engine.stats.graphs
    assert captured > 0 and all(n_ctx == 257 for _, n_ctx, _ in engine._graphs)  # the kernel: one window
    assert _greedy(engine, prompts) == first  # replayed: same shapes, same tokens ...
    assert engine.stats.graphs == captured  # ... and not one new capture
    eager = _engine(model, cuda_graphs=False)
    assert _greedy(eager, prompts) == first  # bf16 too: captured and eager steps agree exactly

    other = tiny_qwen2(seed=99)
    engine.update_weights(other)  # copied into the tensors the graphs read
    moved = _greedy(engine, prompts)
    assert engine.stats.graphs == captured  # the old graphs ran the new weights
    assert moved != first
    assert moved == _greedy(_engine(other, cuda_graphs=False), prompts)


def test_capture_graphs_captures_every_bucket_up_front() -> None:
    from trainer.rollout.sampling import SampleMode

    engine = _engine(tiny_qwen2(seed=5), decode_attention="masked")
    engine.capture_graphs((SampleMode.GREEDY, SampleMode.SAMPLE))
    # batch buckets up to 8 slots: 1, 2, 4, 8; windows from 32 doubling to max_len + 1: 32, 64, 128, 256, 257
    assert engine.batch_buckets == [1, 2, 4, 8] and engine.ctx_buckets == [32, 64, 128, 256, 257]
    assert engine.stats.graphs == len(engine._graphs) == 2 * 4 * 5
    before = engine.stats.graphs
    _greedy(engine, _prompts())
    assert engine.stats.graphs == before  # every step found its graph
