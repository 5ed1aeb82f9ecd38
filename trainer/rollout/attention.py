"""Decode attention over each slot's own cache columns.

Purpose: the decode step's attention is the part of a rollout step that grows with context. The
masked form (:func:`masked_decode_attention`) reads the same window of ``n_ctx`` columns for every
row and hides the columns past each row's position; on real episodes that window is about three
times the mean context (an organizer near its budget sets it for the worker rows beside it), so most
of the K/V it reads is thrown away. :func:`varlen_decode_attention` is a Triton kernel that reads only
columns ``0 .. lens[b]-1`` of row ``b``: one program per (row, KV head) walks its own columns in
blocks with an online softmax and serves the ``n_heads / n_kv_heads`` query heads of that KV head at
once. The lengths are a device tensor, so a captured CUDA graph replays it for any mix of lengths.

The slot engine chooses between them (``SlotEngineConfig.decode_attention``: by default the kernel
on CUDA when Triton is importable, the masked form elsewhere); a decode step builds the mask
(:func:`visible_columns`) or the lengths (:func:`row_lengths`) once and reuses them in every layer. With ``TRITON_INTERPRET=1`` set before triton is imported the kernel also runs on CPU
tensors, which is how the tests check it against the masked form.

Layouts: ``q`` ``[B, n_heads, hd]``; ``k``/``v`` one layer of the slot cache,
``[slots, n_kv_heads, max_len + 1, hd]`` (only the first ``B`` slots are read); ``lens`` ``[B]``
int32, at least 1. Returns ``[B, n_heads * hd]`` in ``q``'s dtype.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import Tensor

_BLOCK = 64  # cache columns per inner step
_MIN_ROWS = 16  # tl.dot wants at least 16 rows: the query heads of one KV head are padded to this


def visible_columns(pos: Tensor, n_ctx: int) -> Tensor:
    """The masked form's mask, ``[B, 1, 1, n_ctx]`` bool: row ``b`` sees columns ``0 .. pos[b]``.

    Column 0 is always visible, so an idle row (``pos`` = the scratch column) never softmaxes over
    nothing. One decode step builds it once for all its layers.
    """
    cols = torch.arange(n_ctx, device=pos.device)  # [Lb]
    return ((cols[None, :] <= pos[:, None]) | (cols[None, :] == 0))[:, None, None, :]


def masked_decode_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Attention over the first ``n_ctx`` columns (``visible``'s width), each row masked by ``visible``."""
    bsz, nh, hd = q.shape
    nkv, n_ctx = k.shape[1], visible.shape[-1]
    keys = k[:bsz, :, :n_ctx]  # [B, nkv, Lb, hd] (a view)
    vals = v[:bsz, :, :n_ctx]
    qg = q.view(bsz, nkv, nh // nkv, hd)  # [B, nkv, G, hd]
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, nkv, G, Lb]
    scores = scores.float().masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, vals).reshape(bsz, nh * hd)


def row_lengths(pos: Tensor, max_len: int) -> Tensor:
    """The kernel's lengths, ``[B]`` int32: ``pos[b] + 1`` columns, one for an idle row (``pos`` =
    ``max_len``, the scratch column; its output is discarded). Built once per decode step."""
    return torch.where(pos < max_len, pos + 1, 1).to(torch.int32)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel() -> Any:
    """Define (and so jit-wrap) the kernel on first use: ``TRITON_INTERPRET`` is read at definition."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        lens_ptr,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_ob,
        stride_oh,
        scale,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        HD: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)  # the KV head
        n = tl.load(lens_ptr + b)
        g = tl.arange(0, ROWS)
        d = tl.arange(0, HD)
        live = g < GROUP
        q = tl.load(
            q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
            mask=live[:, None],
            other=0.0,
        )  # [ROWS, HD]
        m = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HD], tl.float32)
        k_row = k_ptr + b * stride_kb + h * stride_kh
        v_row = v_ptr + b * stride_vb + h * stride_vh
        start = 0
        while start < n:  # not range(0, n, BLOCK): the interpreter cannot index with a loaded scalar
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n
            keys = tl.load(k_row + cols[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale  # [ROWS, BLOCK] float32
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, 1)
            vals = tl.load(v_row + cols[:, None] * stride_vt + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PRECISION)
            m = m_new
            start += BLOCK
        out = acc / total[:, None]
        tl.store(
            o_ptr + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=live[:, None],
        )

    return decode_kernel


def varlen_decode_attention(q: Tensor, k: Tensor, v: Tensor, lens: Tensor, scale: float) -> Tensor:
    """The Triton kernel: row ``b`` attends over its columns ``0 .. lens[b]-1`` only."""
    bsz, nh, hd = q.shape
    nkv = k.shape[1]
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"the varlen kernel needs a power-of-two head_dim >= 16, got {hd}")
    group = nh // nkv
    rows = max(_MIN_ROWS, 1 << (group - 1).bit_length())
    q = q.contiguous()
    out = torch.empty_like(q)
    _kernel()[(bsz, nkv)](
        q,
        k,
        v,
        out,
        lens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        scale,
        GROUP=group,
        ROWS=rows,
        HD=hd,
        BLOCK=_BLOCK,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 rows stay exact; bf16 ignores it
    )
    return out.view(bsz, nh * hd)
