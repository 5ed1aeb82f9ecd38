"""One cycle's update: the serving weights, trained on stored sequences, written as a new checkpoint.

:func:`train_candidate` loads the serving version's checkpoint in fp32, runs the GRPO update of
:mod:`trainer.grpo.update` (micro-batched, normalized by the whole batch's generated tokens, gradient
clipping) and writes the result to ``OUT/versions/<version>/`` (``save_pretrained``: weights, config,
tokenizer). The version label is ``<method>-c<cycle>-<first 8 hex digits of the content hash>``.

Filtered SFT is the same update with every sequence's advantage 1 and one optimizer step per pass
(``updates_per_cycle`` passes): with a single update the importance ratio is 1, so the clipped objective's
gradient is exactly the gradient of the mean negative log-likelihood of the generated tokens (the
joined-in text masked). GRPO uses each episode's group advantage on all its sequences (organizer and
workers) and ``updates_per_cycle`` clipped updates against the rollout policy.

Writes go to a temporary sibling that is renamed into place once complete, so a checkpoint directory,
once it exists, is whole; it is never written again (its hash is recorded with the version).

Limits: a fresh AdamW per cycle (no optimizer state carried between cycles); one device; the training
log-probs are recomputed by the training model, not taken from the serving backend.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.episode import EpisodeSettings
from shared.weights import content_hash
from trainer.grpo.losses import Sequence
from trainer.service.config import TrainerServiceConfig

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
HASH_DIGITS = 8


@dataclass
class Candidate:
    version: str
    path: Path
    content_hash: str
    stats: dict[str, Any] = field(default_factory=dict)


def version_label(method: str, cycle: int, digest: str) -> str:
    return f"{method}-c{cycle:04d}-{digest[:HASH_DIGITS]}"


def _grpo_args(config: TrainerServiceConfig, base: Path, updates: int, temperature: float) -> Any:
    from trainer.grpo.config import GRPOConfigArgs

    return GRPOConfigArgs(
        model=base,
        out=config.out,
        updates_per_step=updates,
        micro_batch_tokens=config.micro_batch_tokens,
        clip_eps=config.clip_eps,
        max_grad_norm=config.max_grad_norm,
        lr=config.lr,
        device=config.device,
        progress=False,
        episode=EpisodeSettings(temperature=temperature, mode=config.episode.mode),
    )


def mean_nll(model: Any, sequences: list[Sequence], *, pad_id: int, device: Any, max_tokens: int) -> float:
    """Mean negative log-likelihood of the generated (loss-masked) tokens of ``sequences``."""
    import torch

    from trainer.grpo.losses import collate, token_logprobs
    from trainer.grpo.update import micro_batches

    total, count = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for chunk in micro_batches([(s, 1.0) for s in sequences], max_tokens):
            batch = collate([s for s, _ in chunk], [1.0] * len(chunk), pad_id).to(device)
            logp = token_logprobs(model(input_ids=batch.input_ids, use_cache=False).logits, batch.input_ids)
            total += float(-(logp * batch.loss_mask).sum())
            count += float(batch.loss_mask.sum())
    return total / max(count, 1.0)


def train_candidate(
    config: TrainerServiceConfig,
    *,
    base: Path,
    cycle: int,
    sequences: list[Sequence],
    advantages: list[float],
) -> Candidate | None:
    """Train the ``base`` checkpoint on ``sequences`` and save it; None when no sequence carries a signal
    (every advantage 0: nothing would change)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.grpo.update import grpo_update

    if not sequences or not any(a != 0.0 for a in advantages):
        return None
    t0 = time.monotonic()
    torch.manual_seed(config.seed * 1_000_003 + cycle)
    device = torch.device(config.device)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sft = config.method == "sft"
    temperature = 1.0 if sft else config.episode.temperature
    steps = []
    nll: list[float] = []
    if sft:  # one plain step per pass: ratio 1, the NLL gradient of the generated tokens
        args = _grpo_args(config, base, 1, temperature)
        nll.append(mean_nll(model, sequences, pad_id=int(pad_id), device=device, max_tokens=config.micro_batch_tokens))
        for _ in range(config.updates_per_cycle):
            steps.append(grpo_update(model, optimizer, sequences, advantages, args, pad_id=int(pad_id),
                                     device=device, bf16=False))  # fmt: skip
        nll.append(mean_nll(model, sequences, pad_id=int(pad_id), device=device, max_tokens=config.micro_batch_tokens))
    else:
        args = _grpo_args(config, base, config.updates_per_cycle, temperature)
        steps.append(grpo_update(model, optimizer, sequences, advantages, args, pad_id=int(pad_id),
                                 device=device, bf16=False))  # fmt: skip
    train_s = time.monotonic() - t0
    root = config.out / VERSIONS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-c{cycle:04d}-{uuid.uuid4().hex[:6]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    digest = content_hash(tmp)
    version = version_label(config.method, cycle, digest)
    final = root / version
    if final.exists():  # the same cycle and weights written before (a restarted cycle): keep the first
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    stats = {
        "method": config.method,
        "sequences": len(sequences),
        "generated_tokens": sum(s.n_generated for s in sequences),
        "trained_tokens": sum(s.trained_tokens for s in steps),
        "loss": [s.loss for s in steps],
        "nll_before": nll[0] if nll else None,  # sft: mean NLL of the generated tokens, before and after
        "nll_after": nll[-1] if nll else None,
        "grad_norm": [s.grad_norm for s in steps],
        "clip_frac": [s.clip_frac for s in steps],
        "updates": len(steps),
        "lr": config.lr,
        "train_s": train_s,
        "save_s": time.monotonic() - t0 - train_s,
    }
    log.info("cycle %d: trained %s on %d sequences in %.1fs", cycle, version, len(sequences), train_s)
    return Candidate(version=version, path=final, content_hash=digest, stats=stats)
