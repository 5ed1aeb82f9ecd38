"""One GRPO update: micro-batched clipped policy-gradient steps, and the per-step episode metrics.

:func:`grpo_update` takes a step's training sequences (organizer and worker sequences of every episode,
each with its episode's advantage) and runs ``updates_per_step`` AdamW steps. Micro-batches are
length-sorted and bounded by ``micro_batch_tokens`` padded tokens; gradients accumulate over them and
the loss is divided by the whole step's generated-token count, so the update does not depend on how
the batch was cut. Sequences with zero advantage carry no gradient (without a KL term) and are skipped.
:func:`step_metrics` turns a step's episodes into the logged means (T, η and the reward parts).

Limits: the model is run without an attention mask (right padding under a causal mask is harmless);
log-probs are recomputed by the training model, not taken from the rollout backend, so a bf16 rollout
and an fp32 update differ slightly (with one update per step the ratio is 1 by construction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from shared.engine import EpisodeResult
from shared.messages import EpisodeStatus
from trainer.grpo.config import GRPOConfigArgs
from trainer.grpo.losses import Sequence, collate, policy_loss, token_logprobs


def micro_batches(
    items: list[tuple[Sequence, float]], max_tokens: int
) -> Iterator[list[tuple[Sequence, float]]]:
    """Length-sorted chunks whose padded size (count x longest) stays within ``max_tokens``.

    A sequence longer than ``max_tokens`` gets a chunk of its own.
    """
    chunk: list[tuple[Sequence, float]] = []
    longest = 0
    for item in sorted(items, key=lambda it: len(it[0])):
        n = len(item[0])
        if chunk and (len(chunk) + 1) * max(longest, n) > max_tokens:
            yield chunk
            chunk, longest = [], 0
        chunk.append(item)
        longest = max(longest, n)
    if chunk:
        yield chunk


@dataclass
class UpdateStats:
    loss: float = 0.0
    grad_norm: float = 0.0
    clip_frac: float = 0.0
    kl: float = 0.0
    trained_sequences: int = 0
    trained_tokens: int = 0
    skipped: bool = False


def _forward_logprobs(model: Any, input_ids: torch.Tensor, temperature: float, bf16: bool) -> torch.Tensor:
    # Right padding and a causal model: real tokens never attend to the padding after them, so no
    # attention mask is needed (and SDPA keeps its fused causal path); padded targets are masked.
    ctx = torch.autocast(input_ids.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=input_ids, use_cache=False).logits  # [B, L, V]
    return token_logprobs(logits, input_ids, temperature=temperature)  # [B, L-1] fp32


def grpo_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    sequences: list[Sequence],
    advantages: list[float],
    config: GRPOConfigArgs,
    *,
    pad_id: int,
    device: torch.device,
    bf16: bool,
    ref_model: Any = None,
) -> UpdateStats:
    """``updates_per_step`` optimizer steps on one step's sequences; ``advantages[i]`` is ``sequences[i]``'s."""
    stats = UpdateStats()
    total_tokens = sum(s.n_generated for s in sequences)
    total_seqs = sum(1 for s in sequences if s.n_generated)
    denominator = float(max(total_tokens if config.loss_norm == "tokens" else total_seqs, 1))
    needs_all = config.kl_beta > 0
    active = [(s, a) for s, a in zip(sequences, advantages, strict=True) if a != 0.0 or needs_all]
    if not active:
        stats.skipped = True
        return stats
    chunks = [
        (collate([s for s, _ in c], [a for _, a in c], pad_id).to(device))
        for c in micro_batches(active, config.micro_batch_tokens)
    ]
    stats.trained_sequences = len(active)
    stats.trained_tokens = sum(b.n_tokens for b in chunks)
    model.train()
    old: list[torch.Tensor | None] = [None] * len(chunks)
    ref: list[torch.Tensor | None] = [None] * len(chunks)
    with torch.no_grad():
        for i, b in enumerate(chunks):
            if config.updates_per_step > 1:  # the rollout policy's log-probs, before any update
                old[i] = _forward_logprobs(model, b.input_ids, config.episode.temperature, bf16)
            if ref_model is not None and config.kl_beta > 0:
                ref[i] = _forward_logprobs(ref_model, b.input_ids, config.episode.temperature, bf16)
    losses, clips, kls, norms = [], [], [], []
    for _ in range(config.updates_per_step):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, b in enumerate(chunks):
            logp = _forward_logprobs(model, b.input_ids, config.episode.temperature, bf16)
            old_i = old[i]
            out = policy_loss(
                logp,
                old_i if old_i is not None else logp.detach(),  # one update: ratio 1
                b.advantages,
                b.loss_mask,
                clip_eps=config.clip_eps,
                kl_beta=config.kl_beta,
                ref_logp=ref[i],
                norm=config.loss_norm,  # type: ignore[arg-type]
                denominator=denominator,
            )
            out.loss.backward()
            step_loss += float(out.loss.item())
            clips.append(out.clip_frac)
            kls.append(out.kl)
        if config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        norms.append(float(norm))
        optimizer.step()
        losses.append(step_loss)
    optimizer.zero_grad(set_to_none=True)
    stats.loss = sum(losses) / len(losses)
    stats.grad_norm = sum(norms) / len(norms)
    stats.clip_frac = sum(clips) / len(clips)
    stats.kl = sum(kls) / len(kls)
    return stats


# -------------------------------------------------------------------------------------------- metrics
def step_metrics(
    groups: list[list[EpisodeResult]], rewards: torch.Tensor, advantages: torch.Tensor
) -> dict[str, float]:
    """Per-step means over every episode (rewards/advantages [P, G] in group order)."""
    flat = [r for g in groups for r in g]
    n = len(flat)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    generated = sum(seg.generated_tokens for r in flat for seg in r.segments)
    return {
        "reward": float(rewards.mean()),
        "reward_std_in_group": float(rewards.std(dim=-1, unbiased=False).mean()),
        "reward_accuracy": mean([r.rewards.accuracy for r in flat]),
        "reward_concurrency": mean([r.rewards.concurrency for r in flat]),
        "reward_total": mean([r.rewards.total for r in flat]),
        "format_error_rate": mean([1.0 if r.rewards.format_error else 0.0 for r in flat]),
        "failed_rate": mean([1.0 if r.status is EpisodeStatus.FAILED else 0.0 for r in flat]),
        "accuracy": mean([1.0 if r.score is not None and r.score.accuracy >= 1.0 else 0.0 for r in flat]),
        "latency_T": mean([float(r.latency) for r in flat]),
        "eta_over_c": mean([r.eta_over_c for r in flat]),
        "forks_per_episode": mean([float(r.forks) for r in flat]),
        "zero_advantage_groups": float((advantages.abs().sum(dim=-1) == 0).float().mean()),
        "episodes": float(n),
        "rollout_tokens": float(generated),
    }
