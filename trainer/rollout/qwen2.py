"""A Qwen2 forward pass over a preallocated, slot-indexed KV cache.

Purpose: the math of the rollout engine, kept apart from its scheduling. It takes the weights of a
transformers ``Qwen2ForCausalLM`` (embeddings, RMSNorm, rotary, grouped-query attention with q/k/v
bias, SwiGLU MLP, tied or untied lm head), fuses q/k/v and gate/up into single matrices, and runs two
kinds of call:

- :func:`prefill` — a few sequences, each written into its own cache slot from its own start
  position (0 for a fresh sequence, the cached length for a continuation), with SDPA and a causal mask
  over the slot's prefix; returns nothing (the last prompt token is fed by the decode step, which
  samples the first output token).
- :func:`decode_step` — one new token for each of the first ``B`` slots, each at its own position,
  attending over its own valid cache columns via a length mask. Shape-static given ``(B, Lb)``, so
  it can be captured as a CUDA graph and replayed.

Cache layout: ``k``/``v`` are ``[layers, slots, kv_heads, max_len + 1, head_dim]``; column ``max_len``
is a scratch column that idle slots write into, so an idle slot never corrupts a cached prefix.

Limits: the default rotary embedding and the static rope scalings (linear, llama3, yarn ...) that only
rescale ``inv_freq``; no sliding-window attention (``use_sliding_window`` must be off); no
tensor parallelism; weights are copied at construction, so a weight update needs a new
:class:`Qwen2Weights`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.rollout import attention

# cuDNN attention builds an execution plan for every new shape (~10 ms of host time on an H100), and
# every prefill batch has a new shape; the memory-efficient kernel takes the mask with no such cost.
_PREFILL_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@dataclass
class LayerWeights:
    """One decoder layer, q/k/v and gate/up fused."""

    ln1: Tensor  # [H]  input RMSNorm weight
    wqkv: Tensor  # [(nh + 2*nkv) * hd, H]
    bqkv: Tensor | None  # [(nh + 2*nkv) * hd]
    wo: Tensor  # [H, nh * hd]
    ln2: Tensor  # [H]  post-attention RMSNorm weight
    wgu: Tensor  # [2 * I, H]  gate rows then up rows
    wd: Tensor  # [H, I]


@dataclass
class Qwen2Weights:
    """All weights and shape facts the forward needs, on one device in one dtype."""

    embed: Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: Tensor  # [H]
    lm_head: Tensor  # [V, H]
    inv_freq: Tensor  # [hd / 2] float32
    rope_scale: float  # multiplies cos and sin (1.0 for the default rope)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    vocab_size: int

    @classmethod
    def from_hf(cls, model: Any, *, device: torch.device, dtype: torch.dtype) -> Qwen2Weights:
        """Copy (and fuse) the weights of a transformers ``Qwen2ForCausalLM`` (duck-typed)."""
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError(
                "sliding-window attention is not supported; set use_sliding_window=False"
            )
        rotary = model.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope type {rope_type!r} changes with length; use a static rope type")
        n_heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)

        def cp(t: Tensor) -> Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        layers = []
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            biases = [att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]
            bqkv = None if any(b is None for b in biases) else cp(torch.cat(biases))
            layers.append(
                LayerWeights(
                    ln1=cp(layer.input_layernorm.weight),
                    wqkv=cp(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                    bqkv=bqkv,
                    wo=cp(att.o_proj.weight),
                    ln2=cp(layer.post_attention_layernorm.weight),
                    wgu=cp(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    wd=cp(mlp.down_proj.weight),
                )
            )
        return cls(
            embed=cp(model.model.embed_tokens.weight),
            layers=layers,
            norm=cp(model.model.norm.weight),
            lm_head=cp(model.lm_head.weight),
            inv_freq=rotary.inv_freq.detach().to(device=device, dtype=torch.float32).clone(),
            rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
            n_heads=n_heads,
            n_kv_heads=int(cfg.num_key_value_heads),
            head_dim=head_dim,
            eps=float(cfg.rms_norm_eps),
            vocab_size=int(cfg.vocab_size),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def rope_table(self, n_positions: int) -> tuple[Tensor, Tensor]:
        """cos and sin for positions ``0 .. n_positions-1``: two ``[n_positions, hd]`` tensors in the model dtype."""
        pos = torch.arange(n_positions, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [P, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Qwen2 computes it: statistics in float32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding; ``cos``/``sin`` broadcast against ``x`` ([..., hd])."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def _mlp(lw: LayerWeights, h: Tensor) -> Tensor:
    gu = F.linear(h, lw.wgu)  # [..., 2I]
    gate, up = gu.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, lw.wd)  # [..., H]


def decode_step(
    w: Qwen2Weights,
    k_cache: Tensor,
    v_cache: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    tokens: Tensor,
    pos: Tensor,
    n_ctx: int,
    *,
    varlen: bool = False,
) -> Tensor:
    """One token for each of the first ``B`` slots; returns float32 logits ``[B, V]``.

    ``tokens``/``pos``: ``[B]`` int64, the token to feed to slot ``b`` and its position (its K/V are
    written to column ``pos[b]`` of slot ``b``). ``n_ctx``: attend over columns ``0 .. n_ctx-1``; must
    exceed every active slot's ``pos``. Idle slots carry ``pos = max_len`` (the scratch column).
    ``varlen``: attend with the Triton kernel, which reads only each row's own columns and ignores
    ``n_ctx`` (:mod:`trainer.rollout.attention`).
    """
    bsz = tokens.shape[0]
    nh, nkv, hd = w.n_heads, w.n_kv_heads, w.head_dim
    rows = torch.arange(bsz, device=tokens.device)  # [B]
    cos = cos_table[pos][:, None, :]  # [B, 1, hd]
    sin = sin_table[pos][:, None, :]
    scale = hd**-0.5
    attend: Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k layer, v layer) -> [B, nh * hd]
    if varlen:  # lengths (or the mask) once per step, not once per layer
        lens = attention.row_lengths(pos, k_cache.shape[3] - 1)
        attend = functools.partial(attention.varlen_decode_attention, lens=lens, scale=scale)
    else:
        visible = attention.visible_columns(pos, n_ctx)
        attend = functools.partial(attention.masked_decode_attention, visible=visible, scale=scale)
    x = w.embed[tokens]  # [B, H]
    for li, lw in enumerate(w.layers):
        h = rms_norm(x, lw.ln1, w.eps)
        qkv = F.linear(h, lw.wqkv, lw.bqkv)  # [B, (nh + 2 nkv) hd]
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(q.view(bsz, nh, hd), cos, sin)  # [B, nh, hd]
        k = apply_rope(k.view(bsz, nkv, hd), cos, sin)  # [B, nkv, hd]
        k_cache[li, rows, :, pos] = k
        v_cache[li, rows, :, pos] = v.view(bsz, nkv, hd)
        att = attend(q, k_cache[li], v_cache[li])  # [B, nh * hd]
        x = x + F.linear(att, lw.wo)
        x = x + _mlp(lw, rms_norm(x, lw.ln2, w.eps))
    x = rms_norm(x, w.norm, w.eps)
    return F.linear(x, w.lm_head).float()  # [B, V]


def prefill(
    w: Qwen2Weights,
    k_cache: Tensor,
    v_cache: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    ids: Tensor,
    lens: Tensor,
    starts: Tensor,
    slots: Tensor,
    n_ctx: int,
    *,
    return_logits: bool = False,
) -> Tensor | None:
    """Write the K/V of ``P`` new id sequences into their slots; optionally return their logits.

    ``ids`` ``[P, N]`` int64, right-padded; ``lens``/``starts``/``slots`` ``[P]`` int64: how many of
    row ``i``'s ids are real, the cache column the first one goes to (0 for a fresh sequence, the
    cached length for a continuation) and the slot. ``n_ctx``: at least ``max(starts + lens)``.
    Padded ids write to the scratch column. Each new id attends causally over its slot's columns
    ``0 .. starts[i] + j`` (cached prefix plus the new ids so far). With ``return_logits`` it returns
    float32 ``[P, N, V]`` logits (for tests); the engine never needs them.
    """
    n_seq, n_new = ids.shape
    device = k_cache.device
    max_len = k_cache.shape[3] - 1
    nh, nkv, hd = w.n_heads, w.n_kv_heads, w.head_dim
    steps = torch.arange(n_new, device=device)[None, :]  # [1, N]
    pos = starts[:, None] + steps  # [P, N]
    valid = steps < lens[:, None]  # [P, N]
    write_pos = torch.where(valid, pos, max_len)  # padding -> scratch column
    pos = pos.clamp(max=max_len)
    cos = cos_table[pos][:, None]  # [P, 1, N, hd]
    sin = sin_table[pos][:, None]
    cols = torch.arange(n_ctx, device=device)
    mask = (cols[None, None, :] <= pos[:, :, None])[:, None]  # [P, 1, N, Lc] causal over the slot's prefix
    x = w.embed[ids]  # [P, N, H]
    for li, lw in enumerate(w.layers):
        h = rms_norm(x, lw.ln1, w.eps)
        qkv = F.linear(h, lw.wqkv, lw.bqkv)  # [P, N, (nh + 2 nkv) hd]
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(q.view(n_seq, n_new, nh, hd).transpose(1, 2), cos, sin)  # [P, nh, N, hd]
        k = apply_rope(k.view(n_seq, n_new, nkv, hd).transpose(1, 2), cos, sin)  # [P, nkv, N, hd]
        v = v.view(n_seq, n_new, nkv, hd).transpose(1, 2)
        # scatter into the cache: index [P, N] pairs (slot, column); value [P, N, nkv, hd]
        k_cache[li, slots[:, None], :, write_pos] = k.transpose(1, 2)
        v_cache[li, slots[:, None], :, write_pos] = v.transpose(1, 2)
        keys = k_cache[li, slots, :, :n_ctx]  # [P, nkv, Lc, hd] (a gather)
        vals = v_cache[li, slots, :, :n_ctx]
        if nkv != nh:
            keys = keys.repeat_interleave(nh // nkv, dim=1)  # [P, nh, Lc, hd]
            vals = vals.repeat_interleave(nh // nkv, dim=1)
        with sdpa_kernel(_PREFILL_BACKENDS):
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)  # [P, nh, N, hd]
        att = att.transpose(1, 2).reshape(n_seq, n_new, nh * hd)
        x = x + F.linear(att, lw.wo)
        x = x + _mlp(lw, rms_norm(x, lw.ln2, w.eps))
    if not return_logits:
        return None
    return F.linear(rms_norm(x, w.norm, w.eps), w.lm_head).float()  # [P, N, V]


def pad_batch(seqs: list[list[int]]) -> tuple[np.ndarray, list[int]]:
    """Right-pad id lists with zeros to one width: (``[P, N]`` int64 ids, lengths)."""
    lens = [len(s) for s in seqs]
    out = np.zeros((len(seqs), max(lens)), dtype=np.int64)
    for row, s in zip(out, seqs, strict=True):
        row[: len(s)] = s  # numpy converts a list of ints in C; a flat Python list costs ~15x more
    return out, lens


def prefill_lists(
    w: Qwen2Weights,
    k_cache: Tensor,
    v_cache: Tensor,
    cos_table: Tensor,
    sin_table: Tensor,
    seqs: list[list[int]],
    slots: list[int],
    starts: list[int],
    *,
    return_logits: bool = False,
) -> Tensor | None:
    """:func:`prefill` from Python lists (tests and one-off calls; the engine uploads in one copy)."""
    padded, lens = pad_batch(seqs)
    dev = k_cache.device

    def t(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=dev)

    n_ctx = max(st + n for st, n in zip(starts, lens, strict=True))
    return prefill(
        w,
        k_cache,
        v_cache,
        cos_table,
        sin_table,
        torch.from_numpy(padded).to(dev),
        t(lens),
        t(starts),
        t(slots),
        n_ctx,
        return_logits=return_logits,
    )
