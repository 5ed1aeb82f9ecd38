"""The trainer service: learn from the traces the system stores, gate, hot-swap the served weights.

Modules:

- :mod:`trainer.service.config`: :class:`TrainerServiceConfig` (help text, validation; no torch).
- :mod:`trainer.service.data`: finished episodes read back from the store, and the filters.
- :mod:`trainer.service.train`: one cycle's update and its checkpoint.
- :mod:`trainer.service.gate`: the held-out evaluation and the publish decision.
- :mod:`trainer.service.publish`: the :class:`WeightPublisher` interface and the in-process publisher.
- :mod:`trainer.service.metrics`: the service's Prometheus metrics.
- :mod:`trainer.service.service`: :class:`TrainerService`, the loop and the operator commands.

Names are re-exported lazily, so importing the config (for ``asyncthink --help``) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainerServiceConfig": "trainer.service.config",
    "TrainerService": "trainer.service.service",
    "LocalPublisher": "trainer.service.publish",
    "WeightPublisher": "trainer.service.publish",
    "TrainerMetrics": "trainer.service.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer.service' has no attribute {name!r}")
