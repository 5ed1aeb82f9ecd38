"""Training verbs (``model``, ``synth``, ``sft``, ``grpo``): argument parsing only; the work is in ``trainer/``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="build a small random-init model with a locally trained tokenizer",
                       description="Train a tokenizer on protocol-shaped text and build a Qwen2-shaped model "
                       "from a preset (no model hub needed).")
    p.add_argument("out_dir", type=Path, help="directory to write (config, safetensors, tokenizer)")
    p.add_argument("--preset", default="small", help="test (~100 k parameters) or small (~8 M; default)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.set_defaults(func=cmd_model)
    try:
        from trainer.cli import register as register_training
    except ImportError:  # training verbs are optional in a serving-only install
        return
    register_training(sub)


def cmd_model(args: argparse.Namespace) -> int:
    from trainer.modeling import main as build_main

    build_main([str(args.out_dir), "--preset", args.preset, "--vocab-size", str(args.vocab_size),
                "--seed", str(args.seed)])
    return 0
