"""Per-slot token sampling on the device, shape-static so it can live inside a CUDA graph.

Each row has its own temperature, top-p, top-k and seed. Randomness is counter-based: the noise for
row ``b``, vocabulary entry ``t`` at that row's ``n``-th generated token is a hash of
``(seed_b, n, t)``, turned into Gumbel noise, and the sample is ``argmax(logits / T + gumbel)``
(the Gumbel-max trick, exact sampling from ``softmax(logits / T)``). So a request's samples depend on
its seed and its own logits only, not on which other requests share the step, and no global RNG
state is touched (graph replay needs none).

Modes (the engine picks the cheapest one the active rows need, one graph per mode):
``GREEDY`` argmax only; ``SAMPLE`` temperature; ``FILTERED`` temperature plus top-k / top-p through
one sort of each row. Rows with temperature 0 are greedy in every mode.

Limits: the hash gives 24-bit uniforms (the Gumbel tail is cut at about 17 nats), fine for sampling,
not a cryptographic or statistical-test-grade generator.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor


class SampleMode(IntEnum):
    GREEDY = 0
    SAMPLE = 1
    FILTERED = 2


_MASK32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """The 32-bit murmur3 finalizer on int64 tensors holding values in ``[0, 2**32)``."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def gumbel_noise(seeds: Tensor, counters: Tensor, vocab: int) -> Tensor:
    """Gumbel noise ``[B, V]`` (float32) from per-row ``seeds`` and ``counters`` (``[B]`` int64)."""
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)  # [V]
    row = _mix32((seeds & _MASK32) ^ _mix32((counters * 0x9E3779B9) & _MASK32))  # [B]
    h = _mix32((row[:, None] ^ (tok[None, :] * 0x27D4EB2F)) & _MASK32)  # [B, V]
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    top_k: Tensor,
    seeds: Tensor,
    counters: Tensor,
    mode: SampleMode,
) -> Tensor:
    """Next token per row: ``[B]`` int64.

    ``logits`` ``[B, V]`` float32; ``temperature``/``top_p`` ``[B]`` float32; ``top_k`` ``[B]`` int64
    (``V`` or more means no top-k); ``seeds``/``counters`` ``[B]`` int64.
    """
    greedy = logits.argmax(dim=-1)  # [B]
    if mode == SampleMode.GREEDY:
        return greedy
    vocab = logits.shape[-1]
    temp = temperature.clamp(min=1e-5)[:, None]  # [B, 1]
    scaled = logits / temp  # [B, V]
    noise = gumbel_noise(seeds, counters, vocab)  # [B, V]
    if mode == SampleMode.SAMPLE:
        drawn = (scaled + noise).argmax(dim=-1)
    else:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # [B, V] each
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each rank
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        keep = (before < top_p[:, None]) & (ranks < top_k[:, None])
        keep[:, 0] = True
        pick = torch.where(keep, sorted_logits + noise.gather(1, order), float("-inf")).argmax(dim=-1)
        drawn = order.gather(1, pick[:, None])[:, 0]
    return torch.where(temperature > 0, drawn, greedy)
