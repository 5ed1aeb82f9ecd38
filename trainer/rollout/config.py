"""Configuration and counters of the slot engine (plain dataclasses, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlotEngineConfig:
    """Sizes and switches of a :class:`SlotEngine`."""

    max_slots: int = 256  # sequences decoding at once (KV-cache slots)
    max_len: int = 2048  # tokens per slot: prompt + injected text + output
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # graph batch sizes
    min_ctx_bucket: int = 128  # smallest attention window; windows double up to max_len + 1 ...
    ctx_bucket_step: int = 0  # ... or, when > 0, grow by this once they reach it (less padding, more graphs)
    cuda_graphs: bool = True  # capture and replay the decode step on CUDA (ignored on CPU)
    # decode attention: "varlen" (Triton kernel, reads each row's own columns), "masked" (one padded
    # window for all rows), or "auto" (varlen on CUDA when Triton is installed, else masked)
    decode_attention: str = "auto"
    prefill_token_budget: int = 65536  # padded (sequences x context) per prefill call
    reuse_prefix: bool = True  # keep finished slots' caches for continuations
    pipeline_depth: int | None = None  # steps left in flight while reading back; None: 1 on CUDA, 0 on CPU
    admit_interval: int = 8  # admit at most every this many steps while slots are busy (batches prefills)
    admit_batch: int = 0  # ...or as soon as this many can be admitted (0: max_slots // 16)
    seed: int = 0  # seeds for requests that bring none
    dtype: str | None = None  # "bfloat16" / "float32"; default bf16 on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.pipeline_depth is not None and self.pipeline_depth < 0:
            raise ValueError(
                f"pipeline_depth must be >= 0 (0: wait for every step), got {self.pipeline_depth}"
            )
        if self.ctx_bucket_step < 0:
            raise ValueError(f"ctx_bucket_step must be >= 0 (0: windows double), got {self.ctx_bucket_step}")
        if self.decode_attention not in ("auto", "varlen", "masked"):
            raise ValueError(
                f"decode_attention must be 'auto', 'varlen' or 'masked', got {self.decode_attention!r}"
            )
        if self.min_ctx_bucket < 1:
            raise ValueError(f"min_ctx_bucket must be >= 1, got {self.min_ctx_bucket}")


@dataclass
class EngineStats:
    """Counters since the engine was built (or since :meth:`SlotEngine.reset_stats`)."""

    steps: int = 0  # decode steps launched
    tokens: int = 0  # output tokens delivered to requests
    active_slot_steps: int = 0  # sum over steps of busy slots
    padded_slot_steps: int = 0  # sum over steps of the batch bucket
    window_slot_steps: int = 0  # sum over steps of batch bucket x attention window (the attention's work)
    context_slot_steps: int = 0  # sum over steps of busy slots' context lengths (the work it must do)
    prefill_tokens: int = 0  # prompt tokens run through prefill
    reused_tokens: int = 0  # prompt tokens found in a retained slot's cache
    requests: int = 0  # requests finished
    graphs: int = 0  # CUDA graphs captured
    busy_s: float = 0.0  # wall time inside step()
    admit_s: float = 0.0  # of which: admission (host work and prefill launches)
    prefill_s: float = 0.0  # of admit_s: padding, uploading and launching prefills
    launch_s: float = 0.0  # of which: launching decode steps (on CPU: running them)
    wait_s: float = 0.0  # of which: waiting for the device to finish a step
    readback_s: float = 0.0  # of which: reading sampled ids back, stop checks and retiring (no wait)

    @property
    def mean_active(self) -> float:
        return self.active_slot_steps / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.__dict__.items()}
        out.update(mean_active=self.mean_active, tokens_per_s=self.tokens_per_s)
        return out
