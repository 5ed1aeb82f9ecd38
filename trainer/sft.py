"""Format SFT with TRL's ``SFTTrainer`` on synthesized organizer / worker / sequential records.

Loss mask. Each record (:mod:`trainer.synth.records`) is tokenized the way the engine builds a
sequence: the prompt, then the completion cut at its injected spans, **each piece tokenized on its own
and the ids concatenated** (the engine also encodes a join's injected text separately). Prompt and
injected pieces get mask 0, generated pieces mask 1 (:func:`tokenize_record`). The installed TRL
(1.x) accepts such a pre-tokenized dataset directly: with ``completion_only_loss=True`` it turns an
``input_ids`` + ``completion_mask`` dataset into ``labels`` with ``-100`` wherever the mask is 0. So no
subclass or custom collator is needed: a mask that is 0 *inside* the completion (a join's result) is
expressed the same way as the prompt. Records longer than ``max_length`` are dropped (and counted),
never truncated, so a model never learns a cut-off trace.

Models. ``--model DIR`` fine-tunes any local Hugging Face causal LM directory. ``--preset NAME`` builds
one from scratch (:mod:`trainer.modeling`) with a byte-level BPE tokenizer trained locally on the
records' own text (:mod:`trainer.tokenizer`), written to ``OUT/base``.

Output. Checkpoints ``OUT/checkpoint-<step>`` (Trainer format, resumable) each carry
``asyncthink_sft_config.json`` and ``asyncthink_metrics.json``; a run resumes from the last one when
``resume`` is on; the final model and tokenizer are written to ``OUT`` with ``save_pretrained``, with
the config and final metrics (loss on a held-in sample before and after training) beside them.

Limits: single process (no multi-GPU launch here); bf16 autocast only on CUDA; the loss sample used
for before/after metrics is taken from the training data, so it measures fitting, not generalisation.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.synth.records import KINDS, TraceRecord, read_jsonl

CONFIG_FILE = "asyncthink_sft_config.json"
METRICS_FILE = "asyncthink_metrics.json"


def _f(default: Any = None, help: str = "", *, factory: Any = None, **cli: Any) -> Any:
    """A config field with its help text (the CLI's ``--help``) and command-line hints (:mod:`cli.options`)."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SFTConfigArgs:
    """Settings of :func:`run_sft`. Field help doubles as ``asyncthink sft --help``."""

    data: list[str] = _f(help="JSONL files written by `asyncthink synth`", factory=list, required=True)
    out: str = _f("", "output directory: checkpoints, then the final model", required=True)
    model: str | None = _f(None, "a local Hugging Face model directory to fine-tune (or give --preset)")
    preset: str | None = _f(None, "build a model from scratch instead: test (~100 k), tiny (~0.9 M) or small (~8 M parameters)")
    vocab_size: int = _f(4096, "tokenizer vocabulary when building from a preset")
    kinds: tuple[str, ...] = _f(KINDS, "record kinds to train on, comma-separated")
    epochs: float = _f(1.0, "passes over the data (ignored when --max-steps > 0)")
    max_steps: int = _f(-1, "optimizer steps; overrides --epochs when > 0")
    lr: float = _f(1e-3, "peak learning rate (cosine schedule after a linear warmup)")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent warming up, in [0, 1)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(32, "sequences per optimizer step (per device)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_length: int = _f(1024, "longest tokenized record kept, in tokens (longer ones are dropped, never cut)")
    seed: int = _f(0, "seed of the data order, the initialisation and the tokenizer")
    bf16: bool | None = _f(
        None, "bf16 autocast (auto: on when CUDA is available)", choices={"auto": None, "on": True, "off": False}
    )
    append_eos: bool = _f(True, "end each sequence with EOS (in the loss)")
    logging_steps: int = _f(10, "log every N steps")
    save_steps: int = _f(500, "checkpoint every N steps")
    save_total_limit: int = _f(2, "checkpoints kept on disk")
    resume: bool = _f(True, "resume from the last checkpoint in --out, if there is one")
    eval_records: int = _f(64, "records in the before/after loss sample")
    progress: bool = _f(True, "show a progress bar")
    engine: str = _f(
        "auto",
        "trl: TRL's SFTTrainer; torch: a plain loop with the same masks (for machines without TRL); "
        "auto: trl when installed",
        choices=("auto", "trl", "torch"),
    )
    max_minutes: float = _f(
        0.0,
        "torch engine: stop and save after this many minutes (0 = no limit); the learning rate then "
        "warms up and decays within those minutes",
    )
    clock: str = _f(
        "wall",
        "what --max-minutes counts: wall (elapsed time) or cpu (this process's CPU time, every thread: "
        "equal budgets on a machine that others share)",
        choices=("wall", "cpu"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError(
                "SFT needs at least one data file (--data path.jsonl); make one with `asyncthink synth`"
            )
        if not self.out:
            raise ValueError("SFT needs an output directory (--out DIR)")
        if (self.model is None) == (self.preset is None):
            raise ValueError(
                "give exactly one of --model DIR (fine-tune) or --preset NAME (build from scratch)"
            )
        if self.preset is not None:
            from trainer.modeling import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        for name in (
            "batch_size",
            "grad_accum",
            "max_length",
            "logging_steps",
            "save_steps",
            "save_total_limit",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.engine not in ("auto", "trl", "torch"):
            raise ValueError(f"engine must be auto, trl or torch, got {self.engine!r}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be wall or cpu, got {self.clock!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


# ---------------------------------------------------------------------------------- tokenization
def tokenize_record(record: TraceRecord, encode: Any, eos_id: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``completion_mask`` (1 = a token this agent generated) for one record.

    The prompt and every piece of the completion are encoded separately and concatenated, so each
    injected span maps exactly onto masked tokens. ``encode(text) -> list[int]`` adds no special tokens.
    """
    ids: list[int] = list(encode(record.prompt))
    mask = [0] * len(ids)
    for text, generated in record.pieces():
        piece = list(encode(text))
        ids += piece
        mask += [int(generated)] * len(piece)
    if eos_id is not None:
        ids.append(eos_id)
        mask.append(1)
    return {"input_ids": ids, "completion_mask": mask}


def load_records(paths: list[str], kinds: tuple[str, ...]) -> list[TraceRecord]:
    out: list[TraceRecord] = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"no data file {p}; make one with `asyncthink synth --out {p}`")
        out.extend(r for r in read_jsonl(p) if r.kind in kinds)
    if not out:
        raise ValueError(f"no records of kinds {kinds} in {paths}")
    return out


def masked_loss(model: Any, rows: list[dict[str, list[int]]], batch_size: int = 16) -> float:
    """Mean cross-entropy over the tokens with mask 1 (what SFT trains), in eval mode, no grad."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(rows), batch_size):
            for row in rows[k : k + batch_size]:  # one at a time: no padding subtleties
                ids = torch.tensor([row["input_ids"]], device=device)
                labels = ids.clone()
                labels[0, torch.tensor(row["completion_mask"], device=device) == 0] = -100
                logits = model(input_ids=ids).logits[0, :-1].float()
                target = labels[0, 1:]
                loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
                total += float(loss)
                count += int((target != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------- training
def _load_or_build(cfg: SFTConfigArgs, records: list[TraceRecord]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(cfg.model) if cfg.model else Path(cfg.out) / "base"
    if cfg.preset is not None and not (model_dir / "config.json").is_file():
        from trainer.modeling import build_model
        from trainer.tokenizer import default_corpus, train_tokenizer

        corpus = [r.prompt + r.completion for r in records]
        new_tokenizer = train_tokenizer([*corpus, *default_corpus(seed=cfg.seed)], cfg.vocab_size)
        build_model(model_dir, new_tokenizer, preset=cfg.preset, seed=cfg.seed)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model directory (no config.json); build one with `asyncthink model`"
        )
    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _prepare(cfg: SFTConfigArgs) -> tuple[Path, list[TraceRecord], Any, Any, list[dict[str, list[int]]], int]:
    """Output dir, records, model, tokenizer, the tokenized rows kept, and how many were too long."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(cfg.data, cfg.kinds)
    model, tokenizer = _load_or_build(cfg, records)
    fast = tokenizer.backend_tokenizer

    def encode(text: str) -> list[int]:
        return list(fast.encode(text, add_special_tokens=False).ids)

    eos = tokenizer.eos_token_id if cfg.append_eos else None
    rows = [tokenize_record(r, encode, eos) for r in records]
    kept = [r for r in rows if len(r["input_ids"]) <= cfg.max_length and any(r["completion_mask"])]
    if not kept:
        raise ValueError(f"every record is longer than max_length={cfg.max_length}; raise --max-length")
    return out, records, model, tokenizer, kept, len(rows) - len(kept)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _use_trl(cfg: SFTConfigArgs) -> bool:
    if cfg.engine != "auto":
        return cfg.engine == "trl"
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


def run_sft(cfg: SFTConfigArgs) -> dict[str, Any]:
    """Train; returns the final metrics (also written to ``OUT/asyncthink_metrics.json``)."""
    if not _use_trl(cfg):
        return run_sft_torch(cfg)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    out, records, model, tokenizer, kept, too_long = _prepare(cfg)
    sample = random.Random(cfg.seed).sample(kept, min(cfg.eval_records, len(kept)))
    loss_before = masked_loss(model, sample)
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
        seed=cfg.seed,
        bf16=bf16,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    config_json = {
        **asdict(cfg),
        "records": len(records),
        "sequences": len(kept),
        "dropped_too_long": too_long,
    }

    class _SaveSidecars(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ckpt = out / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                _write_json(ckpt / CONFIG_FILE, config_json)
                logs = [h for h in state.log_history if "loss" in h]
                _write_json(
                    ckpt / METRICS_FILE, {"step": state.global_step, "last_log": logs[-1] if logs else {}}
                )

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(kept),
        processing_class=tokenizer,
        callbacks=[_SaveSidecars()],
    )
    last = get_last_checkpoint(str(out)) if cfg.resume and out.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    trained: Any = trainer.model
    loss_after = masked_loss(trained, sample)
    trained.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    metrics = {
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "sequences": len(kept),
        "dropped_too_long": too_long,
        "resumed_from": last,
        "bf16": bf16,
        **{k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
    }
    _write_json(out / CONFIG_FILE, config_json)
    _write_json(out / METRICS_FILE, metrics)
    return metrics


def lr_schedule(lr: float, warmup_ratio: float, done: float) -> float:
    """Linear warmup over the first ``warmup_ratio`` of the run, then cosine decay to 0.

    ``done`` is the fraction of the run behind us (of its steps, or of its minutes when that is
    further): a time-bounded run warms up and decays within its minutes however many epochs it was
    nominally given.
    """
    done = min(1.0, max(0.0, done))
    if done < warmup_ratio:
        return lr * done / warmup_ratio
    progress = (done - warmup_ratio) / max(1e-9, 1 - warmup_ratio)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def run_sft_torch(cfg: SFTConfigArgs) -> dict[str, Any]:
    """The same SFT without TRL: one plain AdamW loop over the same tokenized rows and masks.

    For machines where TRL and ``datasets`` (with pyarrow) are not installed, such as the lent GPU
    machine that trains the shipped model. Loss: mean cross-entropy over mask-1 tokens of each batch
    (the same objective as TRL's ``completion_only_loss``); cosine schedule with linear warmup; bf16
    autocast on CUDA; batches of similar length; ``max_minutes`` stops early and still saves. No
    mid-run checkpoints: a run is short; resume by passing the saved directory as ``--model``.
    """
    import time

    import torch

    out, records, model, tokenizer, kept, too_long = _prepare(cfg)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    sample = rng.sample(kept, min(cfg.eval_records, len(kept)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    loss_before = masked_loss(model, sample)
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    per_epoch = math.ceil(len(kept) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(per_epoch * cfg.epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    clock = time.process_time if cfg.clock == "cpu" else time.monotonic

    def lr_at(step: int) -> float:
        done = (step + 1) / total
        if cfg.max_minutes:  # a time-bounded run is as far along as whichever ends first: steps or minutes
            done = max(done, (clock() - t0) / (60 * cfg.max_minutes))
        return lr_schedule(cfg.lr, cfg.warmup_ratio, done)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batches() -> Any:
        while True:
            order = sorted(kept, key=lambda r: len(r["input_ids"]) + rng.random() * 32)
            chunks = [order[k : k + cfg.batch_size] for k in range(0, len(order), cfg.batch_size)]
            rng.shuffle(chunks)
            yield from chunks

    t0 = clock()
    wall0 = time.monotonic()
    step, losses = 0, []
    log: list[dict[str, float]] = []
    stream = batches()
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sft", disable=not cfg.progress, mininterval=2.0)
    while step < total:
        if cfg.max_minutes and clock() - t0 > 60 * cfg.max_minutes:
            break
        batch = next(stream)
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # right padding
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = torch.tensor(r["completion_mask"], dtype=torch.bool)
            attn[i, :n] = 1
        ids, mask, attn = ids.to(device), mask.to(device), attn.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [B, L-1, V]
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # predict token t+1 where it was generated
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % cfg.logging_steps == 0:
            entry = {"step": step, "loss": sum(losses[-cfg.logging_steps :]) / cfg.logging_steps,
                     "lr": lr_at(step), "elapsed_s": time.monotonic() - wall0}
            log.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
    bar.close()
    model.eval()
    loss_after = masked_loss(model, sample)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    metrics = {
        "engine": "torch",
        "train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "global_step": step,
        "planned_steps": total,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "sequences": len(kept),
        "dropped_too_long": too_long,
        "bf16": bf16,
        "train_runtime": time.monotonic() - wall0,
        "train_clock_s": clock() - t0,
        "clock": cfg.clock,
        "log": log,
    }
    _write_json(out / CONFIG_FILE, {**asdict(cfg), "records": len(records), "sequences": len(kept),
                                    "dropped_too_long": too_long})
    _write_json(out / METRICS_FILE, metrics)
    return metrics
