"""The batched slot engine: many sequences from many episodes share each decode step.

Purpose: fast GRPO rollouts for Qwen2-shaped models. One preallocated KV cache
``[layers, slots, kv_heads, max_len + 1, head_dim]`` holds one *slot* per running sequence (an
organizer or a worker of any episode). Between decode steps the engine

- **admits** waiting requests into free slots (batched prefill of every prompt token but the last;
  the decode step feeds the last one and samples the first output token). While slots are busy,
  admission waits for a batch of ready requests or at most ``admit_interval`` steps, because each
  eager prefill launch costs milliseconds of host time,
- **retires** finished requests (EOS, ``max_new_tokens``, the stop regex), freeing their slots, and
- **reuses a prefix**: a finished sequence's slot keeps its K/V and its token ids; a later request
  whose ``input_ids`` start with exactly those ids (an organizer resuming after a fork stop, or after a
  join appended the worker's text) takes that slot and prefills only the appended ids. Otherwise, or
  once the slot was needed for someone else, it gets a full prefill.

The decode step runs over slots ``0 .. B-1`` (``B`` the smallest batch bucket holding the highest
busy slot; idle slots in that range compute into a scratch column). On CUDA with Triton its attention
is a variable-length kernel that reads only each slot's own columns (:mod:`trainer.rollout.attention`);
otherwise every row attends over the first ``n_ctx`` cache columns (the smallest context bucket past
every busy slot's position), masked to its own. On CUDA each ``(B, n_ctx, sampling mode)`` step
(``n_ctx`` is one fixed value with the kernel) is captured once as a CUDA graph and replayed; on CPU
it runs eagerly. The sampled tokens stay on the device as the next step's input, so the engine keeps
``pipeline_depth`` steps in flight (one on CUDA by default): it launches step ``t + 1`` before reading
step ``t``'s tokens back and checking stops on the CPU. A sequence that finishes at step ``t``
therefore computes ``pipeline_depth`` extra tokens, which are dropped.

Stop checks: EOS and length on every token; the stop regex only after tokens that can end a match
(see :mod:`trainer.rollout.stops`), on the decode of the ids since the last search plus a short
lookback (a match must end in them), never the whole output. The per-slot state
(positions, outputs, budgets) lives in numpy arrays (:mod:`trainer.rollout.ledger`), so appending a
step's ids and finding the slots that need a look costs a few array operations per step; only the
flagged slots reach the Python loop.

Limits: one device, one process; no paged or shared-prefix cache (two episodes with one prompt each
prefill it); a prompt must be shorter than ``max_len`` (``submit`` raises otherwise) and generation
stops with ``LENGTH`` when the slot's cache is full; ``update_weights`` copies new weights in place
(graphs stay valid) but the caller must not call it while a step is in flight on another thread.
"""

from __future__ import annotations

import bisect
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from shared.backends.base import FinishReason, GenerateRequest, GenerateResult, stop_pattern
from trainer.rollout import qwen2
from trainer.rollout.attention import triton_available
from trainer.rollout.config import EngineStats, SlotEngineConfig
from trainer.rollout.ledger import ALWAYS, NEVER, SlotLedger
from trainer.rollout.sampling import SampleMode, sample
from trainer.rollout.slots import SlotPool
from trainer.rollout.stops import trigger_chars, trigger_ids
from trainer.rollout.upload import Uploader

_STOP_LOOKBACK = 64  # ids before the last searched one that a stop match may start in (tags are shorter)


class Decoder(Protocol):
    """The one tokenizer method the engine needs (a transformers tokenizer has it)."""

    def decode(self, ids: list[int]) -> str: ...


@dataclass(eq=False)
class _Seq:
    """A request while it holds a slot (or waits for one)."""

    handle: int
    request: GenerateRequest
    max_new: int
    pattern: re.Pattern[str] | None
    stop_row: int  # the ledger's stop-table row: after which ids to search the pattern
    mode: SampleMode
    seed: int
    out: list[int] = field(default_factory=list)  # filled when the request finishes
    cached: int = 0  # prompt tokens reused from a retained slot
    checked: int = 0  # output ids already searched for the stop pattern


@dataclass
class _Inflight:
    host: Tensor  # [B] sampled ids, on the CPU (pinned on CUDA)
    event: torch.cuda.Event | None
    rows: np.ndarray  # [n] the busy slots when the step was launched
    gens: np.ndarray  # [n] their owners' admission generation (SlotLedger.gen) then


def _buckets_up_to(values: tuple[int, ...], cap: int) -> list[int]:
    out = sorted({v for v in values if 0 < v < cap} | {cap})
    return out


class SlotEngine:
    """Synchronous core: ``submit`` requests, call ``step`` until ``has_work`` is false.

    Not thread-safe; :class:`trainer.rollout.backend.SlotEngineBackend` drives it from one thread.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Decoder,
        config: SlotEngineConfig | None = None,
        *,
        device: str | torch.device | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        self.config = cfg = config or SlotEngineConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = cfg.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype: torch.dtype = getattr(torch, dtype_name)
        self.tokenizer = tokenizer
        self.weights = qwen2.Qwen2Weights.from_hf(model, device=self.device, dtype=self.dtype)
        w, slots, max_len = self.weights, cfg.max_slots, cfg.max_len
        self._ledger = SlotLedger(slots, max_len, w.vocab_size)  # per-slot host state
        self.eos_ids = frozenset(eos_token_ids if eos_token_ids is not None else _eos_from(model, tokenizer))
        n_layers = len(w.layers)
        # [layers, slots, kv_heads, max_len + 1, head_dim]; column max_len is the scratch column
        cache_shape = (n_layers, slots, w.n_kv_heads, max_len + 1, w.head_dim)
        self.k_cache = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.cos, self.sin = w.rope_table(max_len + 1)  # [max_len + 1, hd] each
        dev = self.device
        # per-slot device state read by the decode step, all [slots]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)  # next id to feed
        self.pos = torch.full((slots,), max_len, dtype=torch.long, device=dev)  # its position
        self.active = torch.zeros(slots, dtype=torch.long, device=dev)  # 1 while busy
        self.counters = torch.zeros(slots, dtype=torch.long, device=dev)  # tokens sampled so far
        self.seeds = torch.zeros(slots, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=dev)
        self.top_k = torch.full((slots,), w.vocab_size, dtype=torch.long, device=dev)
        self.sampled = torch.zeros(slots, dtype=torch.long, device=dev)  # the step's output
        self.batch_buckets = _buckets_up_to(cfg.batch_buckets, slots)
        self.ctx_buckets = _ctx_buckets(cfg.min_ctx_bucket, cfg.ctx_bucket_step, max_len + 1)
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        if cfg.decode_attention == "auto":
            self.varlen = self.device.type == "cuda" and triton_available()
        else:
            self.varlen = cfg.decode_attention == "varlen"
        if self.varlen:  # the kernel reads each row's own columns: one window (and graph) per batch size
            self.ctx_buckets = [max_len + 1]
        self._graphs: dict[tuple[int, int, SampleMode], torch.cuda.CUDAGraph] = {}
        self._graph_pool: Any = None
        self._host_bufs: list[Tensor] = []
        # CPU-side state (the per-slot arrays live in self._ledger)
        self._slot_seq: list[_Seq | None] = [None] * slots
        self._pool = SlotPool(slots)  # free and retained slots
        capacity = cfg.prefill_token_budget + 4 * slots
        self._ints = Uploader(self.device, torch.long, capacity)
        self._floats = Uploader(self.device, torch.float32, 2 * slots)
        self._pending: deque[_Seq] = deque()
        self._last_admit = 0  # stats.steps at the last admission
        self._inflight: deque[_Inflight] = deque()
        self._launches = 0  # decode steps launched since construction
        # steps left in flight while reading back: the host checks step t while the device runs t + 1
        on_cuda = self.device.type == "cuda"
        self._depth = cfg.pipeline_depth if cfg.pipeline_depth is not None else int(on_cuda)
        self._mode_counts = {m: 0 for m in SampleMode}
        self._stop_rows: dict[re.Pattern[str], int] = {}  # stop regex -> its ledger stop-table row
        self._trigger_rows: dict[frozenset[str], int] = {}  # trigger characters -> stop-table row
        self._next_handle = 0
        self._seed_rng = torch.Generator().manual_seed(cfg.seed)
        self.stats = EngineStats()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: SlotEngineConfig | None = None,
        *,
        tokenizer: Decoder | None = None,
        device: str | torch.device | None = None,
    ) -> SlotEngine:
        """Load ``Qwen2ForCausalLM`` weights (and, unless given, the tokenizer) from a local directory."""
        from transformers import AutoTokenizer, Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tok: Any = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))
        return cls(model, tok, config, device=device)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy a model's weights into the engine's tensors in place (captured graphs stay valid)."""
        new = qwen2.Qwen2Weights.from_hf(model, device=self.device, dtype=self.dtype)
        pairs: list[tuple[Tensor | None, Tensor | None]] = [
            (self.weights.embed, new.embed),
            (self.weights.norm, new.norm),
            (self.weights.lm_head, new.lm_head),
        ]
        for old_l, new_l in zip(self.weights.layers, new.layers, strict=True):
            pairs += [(getattr(old_l, f), getattr(new_l, f)) for f in old_l.__dataclass_fields__]
        for dst, src in pairs:
            if dst is not None and src is not None:
                dst.copy_(src)
        self._pool.forget_caches()  # cached K/V came from the old weights

    def progress(self) -> dict[int, int]:
        """Ids sampled so far per running request (handle -> count), decode steps launched but not yet
        read back included: what the weights in the tensors now have produced (for version spans)."""
        counts = {seq.handle: int(self._ledger.n_out[slot]) for slot, seq in enumerate(self._slot_seq) if seq}
        for step in self._inflight:
            for slot in step.rows:
                seq = self._slot_seq[int(slot)]
                if seq is not None:
                    counts[seq.handle] += 1
        return counts

    # ------------------------------------------------------------------ public API
    def submit(self, request: GenerateRequest) -> int:
        """Queue a request; returns its handle (results come back from :meth:`step`)."""
        n = len(request.input_ids)
        if n == 0:
            raise ValueError("input_ids is empty; a request needs at least one token")
        if n >= self.config.max_len:
            raise ValueError(
                f"prompt of {n} tokens does not fit a slot of max_len={self.config.max_len}; raise max_len"
            )
        sp = request.sampling
        mode = SampleMode.GREEDY
        if sp.temperature > 0:
            filtered = sp.top_p < 1.0 or 0 < sp.top_k < self.weights.vocab_size
            mode = SampleMode.FILTERED if filtered else SampleMode.SAMPLE
        if sp.seed is not None:
            seed = sp.seed
        else:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._seed_rng))
        pattern = stop_pattern(request.stop_regex)
        seq = _Seq(
            handle=self._next_handle,
            request=request,
            max_new=min(request.max_new_tokens, self.config.max_len - n + 1),
            pattern=pattern,
            stop_row=self._stop_row_for(pattern) if pattern is not None else NEVER,
            mode=mode,
            seed=seed,
        )
        self._next_handle += 1
        self._pending.append(seq)
        return seq.handle

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self._eos_ids = frozenset(ids)
        self._ledger.set_eos(self._eos_ids)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._inflight or self._ledger.live.any())

    @property
    def n_active(self) -> int:
        return int(self._ledger.live.sum())

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @torch.no_grad()
    def step(self) -> list[tuple[int, GenerateResult]]:
        """Admit, launch one decode step, and read back the oldest step in flight.

        Returns ``(handle, result)`` for every request that finished.
        """
        t0 = time.perf_counter()
        finished: list[tuple[int, GenerateResult]] = []
        self._admit(finished)
        t1 = time.perf_counter()
        self.stats.admit_s += t1 - t0
        launched = self._launch()
        t2 = time.perf_counter()
        self.stats.launch_s += t2 - t1
        depth = self._depth if launched else 0
        wait0 = self.stats.wait_s
        while len(self._inflight) > depth:
            self._process(self._inflight.popleft(), finished)
        t3 = time.perf_counter()
        self.stats.readback_s += t3 - t2 - (self.stats.wait_s - wait0)
        self.stats.busy_s += t3 - t0
        return finished

    def run(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run ``requests`` to completion; results in request order."""
        handles = [self.submit(r) for r in requests]
        results: dict[int, GenerateResult] = {}
        while self.has_work:
            results.update(self.step())
        return [results[h] for h in handles]

    def reset_stats(self) -> None:
        self.stats = EngineStats(graphs=self.stats.graphs)
        self._last_admit = 0

    @torch.no_grad()
    def capture_graphs(self, modes: tuple[SampleMode, ...] = (SampleMode.SAMPLE,)) -> None:
        """Capture every ``(batch, context)`` bucket for ``modes`` now rather than on first use."""
        if not self.use_graphs:
            return
        for mode in modes:
            for bsz in self.batch_buckets:
                for n_ctx in self.ctx_buckets:
                    self._graph(bsz, n_ctx, mode)

    # ------------------------------------------------------------------ admission
    def _stop_row_for(self, pattern: re.Pattern[str]) -> int:
        row = self._stop_rows.get(pattern)
        if row is not None:
            return row
        chars = trigger_chars(pattern)  # parses the regex: ~0.1 ms, so once per pattern
        if chars is None:
            row = ALWAYS
        else:
            if chars not in self._trigger_rows:
                ids = trigger_ids(self.tokenizer.decode, self.weights.vocab_size, chars)
                self._trigger_rows[chars] = self._ledger.stop_row(ids)
            row = self._trigger_rows[chars]
        self._stop_rows[pattern] = row
        return row

    def _admit_now(self) -> bool:
        """Admit on this step? Prefill launches cost host time, so while the device is busy they wait
        for a batch (``admit_batch`` ready requests) or at most ``admit_interval`` steps."""
        if not self._pending:
            return False
        n_busy = self.config.max_slots - self._pool.n_available
        if n_busy == 0 or self.stats.steps - self._last_admit >= self.config.admit_interval:
            return True
        ready = min(len(self._pending), self._pool.n_available)
        return ready >= (self.config.admit_batch or max(1, self.config.max_slots // 16))

    def _admit(self, finished: list[tuple[int, GenerateResult]]) -> None:
        if not self._admit_now():
            return
        self._last_admit = self.stats.steps
        admitted: list[tuple[int, _Seq, int]] = []  # (slot, seq, cached length)
        while self._pending:
            seq = self._pending[0]
            if seq.max_new <= 0:
                self._pending.popleft()
                finished.append((seq.handle, self._result(seq, FinishReason.LENGTH, None)))
                continue
            found = None
            if self.config.reuse_prefix:
                found = self._pool.take_continuation(seq.request.session, seq.request.input_ids)
            if found is not None:
                slot, start = found
            else:
                start = 0
                free = self._pool.take_free()
                if free is None:
                    break
                slot = free
            self._pending.popleft()
            admitted.append((slot, seq, start))
        if not admitted:
            return
        # prefill everything but the last id (the decode step feeds that one), in token-budget chunks
        todo = [(slot, seq, start) for slot, seq, start in admitted if len(seq.request.input_ids) - 1 > start]
        todo.sort(key=lambda t: len(t[1].request.input_ids))
        chunk: list[tuple[int, _Seq, int]] = []
        for item in todo:
            width = len(item[1].request.input_ids)
            if chunk and (len(chunk) + 1) * width > self.config.prefill_token_budget:
                self._prefill(chunk)
                chunk = []
            chunk.append(item)
        if chunk:
            self._prefill(chunk)
        # per-slot state, one indexed write per buffer
        slots = [slot for slot, _, _ in admitted]
        for slot, seq, start in admitted:
            seq.cached = start
            self.stats.reused_tokens += start
            self._slot_seq[slot] = seq
            self._ledger.admit(slot, len(seq.request.input_ids) - 1, seq.max_new, seq.stop_row)
            self._mode_counts[seq.mode] += 1
        seqs = [seq for _, seq, _ in admitted]
        vocab = self.weights.vocab_size
        idx, tokens, pos, seeds, top_k = self._ints.upload(
            slots,
            [s.request.input_ids[-1] for s in seqs],
            [len(s.request.input_ids) - 1 for s in seqs],
            [s.seed for s in seqs],
            [s.request.sampling.top_k if s.request.sampling.top_k > 0 else vocab for s in seqs],
        )
        temperature, top_p = self._floats.upload(
            [s.request.sampling.temperature for s in seqs], [s.request.sampling.top_p for s in seqs]
        )
        self.tokens[idx] = tokens
        self.pos[idx] = pos
        self.seeds[idx] = seeds
        self.top_k[idx] = top_k
        self.temperature[idx] = temperature
        self.top_p[idx] = top_p
        self.active.index_fill_(0, idx, 1)
        self.counters.index_fill_(0, idx, 0)

    def _prefill(self, chunk: list[tuple[int, _Seq, int]]) -> None:
        t0 = time.perf_counter()
        seqs = [seq.request.input_ids[start:-1] for _, seq, start in chunk]
        starts = [start for _, _, start in chunk]
        padded, lens = qwen2.pad_batch(seqs)  # [P, N]
        width = padded.shape[1]
        ids, lens_t, starts_t, slots_t = self._ints.upload(
            padded.ravel(), lens, starts, [slot for slot, _, _ in chunk]
        )
        n_ctx = max(st + n for st, n in zip(starts, lens, strict=True))
        qwen2.prefill(
            self.weights,
            self.k_cache,
            self.v_cache,
            self.cos,
            self.sin,
            ids.view(len(seqs), width),
            lens_t,
            starts_t,
            slots_t,
            n_ctx,
        )
        self.stats.prefill_tokens += sum(lens)
        self.stats.prefill_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ decode
    def _body(self, bsz: int, n_ctx: int, mode: SampleMode) -> None:
        """One decode step over slots ``0 .. bsz-1``; reads and writes only the static buffers."""
        logits = qwen2.decode_step(
            self.weights,
            self.k_cache,
            self.v_cache,
            self.cos,
            self.sin,
            self.tokens[:bsz],
            self.pos[:bsz],
            n_ctx,
            varlen=self.varlen,
        )  # [B, V]
        nxt = sample(
            logits,
            self.temperature[:bsz],
            self.top_p[:bsz],
            self.top_k[:bsz],
            self.seeds[:bsz],
            self.counters[:bsz],
            mode,
        )  # [B]
        self.sampled[:bsz].copy_(nxt)
        self.tokens[:bsz].copy_(nxt)
        act = self.active[:bsz]
        self.pos[:bsz] += act
        self.counters[:bsz] += act

    def _graph(self, bsz: int, n_ctx: int, mode: SampleMode) -> torch.cuda.CUDAGraph:
        key = (bsz, n_ctx, mode)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        state = [t.clone() for t in (self.tokens, self.pos, self.counters, self.sampled)]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up (cuBLAS handles, allocator) off the capture
            self._body(bsz, n_ctx, mode)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for dst, src in zip((self.tokens, self.pos, self.counters, self.sampled), state, strict=True):
            dst.copy_(src)  # undo the warm-up's state advance; its K/V writes are the same as the real step's
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._body(bsz, n_ctx, mode)
        self._graphs[key] = graph
        self.stats.graphs += 1
        return graph

    def _launch(self) -> bool:
        ledger = self._ledger
        busy = ledger.busy()  # [n] ascending
        if not len(busy):
            return False
        top = int(busy[-1]) + 1
        bsz = self.batch_buckets[bisect.bisect_left(self.batch_buckets, top)]
        busy_pos = ledger.pos[busy]  # [n]
        need_ctx = int(busy_pos.max()) + 1
        n_ctx = self.ctx_buckets[bisect.bisect_left(self.ctx_buckets, need_ctx)]
        counts = self._mode_counts
        mode = (
            SampleMode.FILTERED
            if counts[SampleMode.FILTERED]
            else SampleMode.SAMPLE
            if counts[SampleMode.SAMPLE]
            else SampleMode.GREEDY
        )
        if self.use_graphs:
            self._graph(bsz, n_ctx, mode).replay()
        else:
            self._body(bsz, n_ctx, mode)
        event = None
        if self.device.type == "cuda":
            if len(self._host_bufs) < self._depth + 2:  # a buffer is rewritten only after its step was read
                self._host_bufs.append(torch.empty(self.config.max_slots, dtype=torch.long, pin_memory=True))
            host = self._host_bufs[self._launches % len(self._host_bufs)][:bsz]
            host.copy_(self.sampled[:bsz], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = self.sampled[:bsz].clone()
        self._inflight.append(_Inflight(host=host, event=event, rows=busy, gens=ledger.gen[busy]))
        self._launches += 1  # not stats.steps: reset_stats() must not make a buffer in flight look free
        ledger.advance(busy)
        self.stats.steps += 1
        self.stats.active_slot_steps += len(busy)
        self.stats.padded_slot_steps += bsz
        context = int(busy_pos.sum()) + len(busy)
        # columns the attention reads: the varlen kernel reads each busy row's own, an idle row one
        self.stats.window_slot_steps += context + bsz - len(busy) if self.varlen else bsz * n_ctx
        self.stats.context_slot_steps += context
        return True

    # ------------------------------------------------------------------ read back and stop checks
    def _process(self, step: _Inflight, finished: list[tuple[int, GenerateResult]]) -> None:
        if step.event is not None:
            t0 = time.perf_counter()
            step.event.synchronize()
            self.stats.wait_s += time.perf_counter() - t0
        ledger = self._ledger
        n_tokens, flagged = ledger.record(step.rows, step.gens, step.host.numpy())  # every row's id appended
        self.stats.tokens += n_tokens
        if not len(flagged):
            return
        # only the flagged slots come back to Python: EOS, length, or an id that can end a stop match
        retired: list[int] = []
        for slot, eos, trigger, full in zip(*ledger.reasons(flagged), strict=True):
            seq = self._slot_seq[slot]
            assert seq is not None
            match: re.Match[str] | None = None
            reason: FinishReason | None = None
            if eos:
                reason = FinishReason.EOS
            elif trigger and seq.pattern is not None:
                # a match must end in the ids since the last search; a tag spans fewer than
                # _STOP_LOOKBACK ids (each id decodes to at least one character), so decoding that
                # tail finds it without decoding the whole output at every trigger
                n_out = int(ledger.n_out[slot])
                match = seq.pattern.search(
                    self.tokenizer.decode(ledger.tail(slot, seq.checked - _STOP_LOOKBACK))
                )
                seq.checked = n_out
                if match is not None:
                    reason = FinishReason.STOP
            if reason is None and full:
                reason = FinishReason.LENGTH
            if reason is not None:
                seq.out = ledger.output(slot)
                finished.append((seq.handle, self._result(seq, reason, match)))
                retired.append(slot)
        if retired:
            self._retire(retired)

    def _retire(self, slots: list[int]) -> None:
        max_len = self.config.max_len
        for slot in slots:
            seq = self._slot_seq[slot]
            assert seq is not None
            self._slot_seq[slot] = None
            self._ledger.retire(slot)
            self._mode_counts[seq.mode] -= 1
            full = seq.request.input_ids + seq.out
            # the last sampled id was never fed for sure, so its K/V may be missing
            cached = full[:-1] if self.config.reuse_prefix else None
            self._pool.release(slot, seq.request.session, cached)
        (idx,) = self._ints.upload(slots)
        self.active.index_fill_(0, idx, 0)
        self.pos.index_fill_(0, idx, max_len)  # idle slots write to the scratch column

    def _result(self, seq: _Seq, reason: FinishReason, match: re.Match[str] | None) -> GenerateResult:
        self.stats.requests += 1
        return GenerateResult(
            output_ids=list(seq.out),
            text=self.tokenizer.decode(seq.out),
            finish=reason,
            matched=match.group(0) if match is not None else None,
            cached_tokens=seq.cached,
        )


def _ctx_buckets(smallest: int, step: int, cap: int) -> list[int]:
    """Attention windows: doubling from ``smallest``; with ``step`` > 0, growing by ``step`` once
    they reach it; the last one is ``cap``."""
    ctx = [smallest]
    while ctx[-1] < cap:
        ctx.append(ctx[-1] + step if 0 < step <= ctx[-1] else ctx[-1] * 2)
    return _buckets_up_to(tuple(ctx), cap)


def _eos_from(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config, else its config, else the tokenizer."""
    sources: list[Callable[[], Any]] = [
        lambda: model.generation_config.eos_token_id,
        lambda: model.config.eos_token_id,
        lambda: tokenizer.eos_token_id,
    ]
    for get in sources:
        try:
            value = get()
        except AttributeError:
            continue
        if value is None:
            continue
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return []
