"""GRPO over thinking structures: a compact loop of our own, not TRL's ``GRPOTrainer``.

Why not TRL: its ``GRPOTrainer`` (and ``rollout_func`` with ``env_mask``) carries **one sequence per
rollout**. An AsyncThink rollout is a whole episode: the organizer's sequence plus one sequence per
forked worker, of different lengths and prompts, produced concurrently by the core
:class:`~shared.engine.Engine`. GRPO here must give *every* token that the organizer and its workers
generated the same group-relative advantage, mask out the text that Joins injected, and take both the
ids and the masks from what the engine recorded (re-tokenizing text changes token boundaries). Packing
several sequences into one TRL rollout would make them attend to each other; a subclass would fight its
batching at every step. The loop itself is small: rollouts, advantages, a clipped policy-gradient
update, a weight refresh of the rollout backend.

Modules:

- :mod:`trainer.grpo.config`: :class:`GRPOConfigArgs` (help text, validation, CLI glue; no torch).
- :mod:`trainer.grpo.losses`: the pure math (advantages, sequences, collation, log-probs, the loss).
- :mod:`trainer.grpo.loop`: :func:`train_grpo`, rollouts through the engine, updates, weight refresh.
- :mod:`trainer.grpo.checkpoint`: checkpoints and resume.

Names are re-exported lazily so that importing the config (for ``asyncthink --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GRPOConfigArgs": "trainer.grpo.config",
    "train_grpo": "trainer.grpo.loop",
    "GRPORun": "trainer.grpo.loop",
    "refresh_weights": "trainer.grpo.loop",
    "group_advantages": "trainer.grpo.losses",
    "episode_sequences": "trainer.grpo.losses",
    "collate": "trainer.grpo.losses",
    "token_logprobs": "trainer.grpo.losses",
    "policy_loss": "trainer.grpo.losses",
    "Sequence": "trainer.grpo.losses",
    "Batch": "trainer.grpo.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer.grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
