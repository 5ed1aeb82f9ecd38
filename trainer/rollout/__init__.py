"""Rollout generation for training: a batched slot engine for Qwen2-shaped models.

- :class:`SlotEngine` (``slot_engine.py``): the synchronous core — KV-cache slots, admission and
  retirement between decode steps, prefix reuse for continuations, CUDA-graph decode steps.
- :class:`SlotEngineBackend` (``backend.py``): the async ``ModelBackend`` adapter that lets many
  episodes share each step.
- ``qwen2.py`` (the forward pass), ``attention.py`` (decode attention: a variable-length Triton
  kernel, or one masked window), ``sampling.py`` (per-slot sampling), ``stops.py`` (cheap stop
  checks), ``ledger.py`` (per-slot host state as arrays, the per-step checks), ``slots.py`` (free and
  retained slots, prefix reuse), ``upload.py`` (host-to-device copies), ``config.py``
  (:class:`SlotEngineConfig`, :class:`EngineStats`).

Importing this package imports torch; import it only where generation runs.
"""

from trainer.rollout.backend import SlotEngineBackend
from trainer.rollout.slot_engine import EngineStats, SlotEngine, SlotEngineConfig

__all__ = ["EngineStats", "SlotEngine", "SlotEngineBackend", "SlotEngineConfig"]
