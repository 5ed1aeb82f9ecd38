"""Build small Qwen2-shaped causal language models from a config, locally, with random weights.

There is no model hub here: a model directory is a locally trained tokenizer (:mod:`trainer.tokenizer`)
plus a randomly initialised ``Qwen2ForCausalLM`` with tied embeddings, written with ``save_pretrained``
(safetensors, ``config.json``, ``generation_config.json`` with eos/pad ids). Any code that loads Hugging
Face models (the transformers backend, SFT, GRPO) then loads it offline with ``from_pretrained``.

Presets (parameter counts depend on the tokenizer's vocabulary; see :data:`PRESETS`):

- ``"test"``: about 100 k parameters with a 512-token vocabulary; built in well under a second, for CPU
  tests.
- ``"tiny"``: 4 layers of width 128, about 0.9 M parameters with a ~600-token vocabulary: trains a
  few hundred steps a minute on two CPU cores (``bench/trace_check.py``, the recipe's CI run).
- ``"small"``: 5 layers, about 8 M parameters with a 4096-token vocabulary, saved in bf16 so the
  safetensors file stays under 16 MiB (the shipped-model budget). fp32 would take twice that.

Limits: random weights produce random text; this module only fixes the shape. Training makes it useful.

Command line: ``python -m trainer.modeling OUT_DIR [--preset small] [--vocab-size 4096]`` trains a
tokenizer on :func:`trainer.tokenizer.default_corpus` and writes a model directory.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

SIZE_BUDGET_BYTES = 16 * 1024 * 1024  # the shipped-model budget for the "small" preset


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int  # model width
    layers: int  # decoder layers
    heads: int  # attention heads; hidden_size must be divisible by it
    kv_heads: int  # key/value heads (grouped-query attention); heads must be divisible by it
    intermediate_size: int  # MLP width
    max_position: int  # longest sequence (prompt + output) the model accepts
    dtype: str = "float32"  # dtype of the saved weights
    init_std: float = 0.02  # std of the random initialisation (Qwen2's initializer_range)

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be divisible by kv_heads {self.kv_heads}")
        if min(self.hidden_size, self.layers, self.heads, self.kv_heads, self.intermediate_size) < 1:
            raise ValueError(f"every dimension must be positive: {self}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


PRESETS: dict[str, ModelPreset] = {
    # ~106 k parameters with a 512-token vocabulary (33 k of them the tied embedding).
    # A large init makes the random model's output depend strongly on its context (with 0.02 it repeats one
    # token), so a test comparing batched and lone decoding would notice a wrong mask or position.
    "test": ModelPreset(
        hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, max_position=1024, init_std=0.2
    ),
    # ~0.87 M parameters with a 640-token vocabulary (82 k of them the tied embedding): a CPU-minutes model.
    "tiny": ModelPreset(
        hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384, max_position=4096
    ),
    # ~8.0 M parameters with a 4096-token vocabulary: 15.2 MiB in bf16.
    "small": ModelPreset(
        hidden_size=384,
        layers=5,
        heads=6,
        kv_heads=2,
        intermediate_size=768,
        max_position=8192,
        dtype="bfloat16",
    ),
}


def make_config(tokenizer: PreTrainedTokenizerBase, preset: ModelPreset) -> Qwen2Config:
    """The ``Qwen2Config`` for ``preset`` with the tokenizer's vocabulary and special token ids."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position,
        tie_word_embeddings=True,
        use_sliding_window=False,
        initializer_range=preset.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def estimate_parameters(vocab_size: int, preset: ModelPreset) -> int:
    """Parameter count of a Qwen2 model with tied embeddings, computed without building it."""
    h, i = preset.hidden_size, preset.intermediate_size
    kv = preset.kv_heads * (h // preset.heads)
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o (no bias)
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h  # two RMSNorm weights
    return vocab_size * h + preset.layers * per_layer + h  # + final norm


def build_model(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    *,
    preset: str = "test",
    hidden_size: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position: int | None = None,
    dtype: str | None = None,
    init_std: float | None = None,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Build a random-init Qwen2 model from ``preset`` (keyword arguments override its fields) and save it,
    with the tokenizer, to ``out_dir``. ``tokenizer`` is a tokenizer object or a directory holding one.
    Returns the model (in eval mode, in the saved dtype)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides: dict[str, Any] = {
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "intermediate_size": intermediate_size,
        "max_position": max_position,
        "dtype": dtype,
        "init_std": init_std,
    }
    spec = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer needs eos and pad tokens; build one with trainer.tokenizer.train_tokenizer"
        )
    config = make_config(tokenizer, spec)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, spec.dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return model


def main(argv: list[str] | None = None) -> None:
    from trainer.tokenizer import default_corpus, train_tokenizer

    parser = argparse.ArgumentParser(description="Train a tokenizer and build a random-init model directory.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(default_corpus(), args.vocab_size)
    model = build_model(args.out_dir, tokenizer, preset=args.preset, seed=args.seed)
    size = sum(f.stat().st_size for f in args.out_dir.glob("*.safetensors"))
    print(
        f"wrote {args.out_dir}: {count_parameters(model):,} parameters, vocabulary {len(tokenizer)}, "
        f"{size / 2**20:.1f} MiB of safetensors; preset {asdict(PRESETS[args.preset])}"
    )


if __name__ == "__main__":
    main()
