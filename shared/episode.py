"""How one episode runs: the settings declared once, with their bounds and their help text.

:class:`EpisodeSettings` is the single declaration of an episode's knobs (mode, pool capacity, token
budgets, worker timeout, sampling, recursion). Everything that carries them embeds or derives from it:

* the engine's :class:`~shared.engine.EngineConfig` is ``EpisodeSettings`` plus the reward settings;
* the bus message :class:`~shared.messages.SubmitProblem` carries one in its ``settings`` field;
* the REST request bodies (``POST /v1/problems`` and the chat completion's extra fields) inherit it,
  so the JSON keys stay flat;
* the command line builds one option per field from the field's ``description`` (``cli/options.py``);
* the GRPO config embeds one for its rollouts.

Each field's ``description`` is its only help text. Bounds are what a request may ask for; they are
the same for a REST client, a CLI user and a training run. Pure data: no I/O, no heavy imports.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.tasks.base import Mode

# Agent pool size c: the most a request may ask for (the paper uses 2 and 4). A deployment sets its own,
# lower limit as an operator setting (``Settings.max_capacity``, ASYNCTHINK_MAX_CAPACITY, default 1024),
# which the gateway enforces.
MAX_CAPACITY = 4096
MAX_BUDGET = 131_072  # tokens per agent
MAX_PARALLEL_K = 64  # traces for parallel thinking
MAX_WORKER_TIMEOUT_S = 24 * 3600.0
MAX_DEPTH = 8  # recursive organization: workers forking workers
MAX_SEED = 2**31 - 1


class EpisodeSettings(BaseModel):
    """How an episode runs: mode, agent pool, token budgets, worker timeout, sampling and recursion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Field(
        Mode.ASYNCTHINK,
        description="asyncthink (an organizer that forks and joins workers), sequential (one trace, no "
        "forks) or parallel (k independent traces, aggregated by vote)",
    )
    capacity: int | None = Field(
        None,
        ge=1,
        le=MAX_CAPACITY,
        description="agent pool size c: the organizer plus at most c-1 active workers; default: the "
        "task's (2 for countdown and sudoku, 4 for math); a gateway may set a lower limit",
    )
    organizer_budget: int = Field(
        1024, ge=1, le=MAX_BUDGET, description="most tokens the organizer (or each parallel trace) may decode"
    )
    worker_budget: int = Field(512, ge=1, le=MAX_BUDGET, description="most tokens each worker may decode")
    parallel_k: int = Field(4, ge=1, le=MAX_PARALLEL_K, description="number of traces in parallel mode")
    worker_timeout_s: float = Field(
        300.0,
        gt=0,
        le=MAX_WORKER_TIMEOUT_S,
        description="seconds before a worker gives up; its join then reads an error text and the "
        "episode goes on",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass, in (0, 1]")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="sampling seed; each agent derives its own from it"
    )
    recursive: bool = Field(
        False, description="extension: workers may fork their own workers (recursive organization)"
    )
    max_depth: int = Field(
        2, ge=1, le=MAX_DEPTH, description="with recursive: how deep workers may fork (1 = only the organizer)"
    )
    stream_text: bool = Field(
        False,
        description="publish the organizer's text as it is decoded (text events), join results included; "
        "streaming chat completions turn it on",
    )

    @field_validator("worker_timeout_s", "temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def episode_settings(self) -> EpisodeSettings:
        """Only the episode settings of this object (a request or a config that inherits them)."""
        if type(self) is EpisodeSettings:
            return self
        return EpisodeSettings(**{name: getattr(self, name) for name in EpisodeSettings.model_fields})

    def resolved_capacity(self, default: int) -> int:
        """c for this episode: parallel mode decodes k traces at once; otherwise ``capacity`` or the
        task's ``default``."""
        if self.mode is Mode.PARALLEL:
            return self.parallel_k
        return self.capacity or default
