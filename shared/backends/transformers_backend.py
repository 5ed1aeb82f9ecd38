"""In-process Hugging Face transformers backend with continuous batching (CPU or one GPU).

One background thread owns the model. ``generate`` puts a request on a queue and awaits a future; the
thread runs every admitted request together: newly arrived requests are prefilled in one left-padded
batch and merged into the running batch's KV cache between decode steps, each decode step is one
forward pass over all running sequences, and a finished sequence leaves the batch at once. So an
organizer and its concurrent workers (or many episodes) share forward passes instead of queueing.

Each request stops at the first of: its ``stop_regex`` matching the decoded output (checked after every
token, with :func:`shared.backends.base.find_stop`), EOS, ``max_new_tokens`` (or the model's context
length). ``output_ids`` keep the stop text's tokens and an EOS token; ``text`` is ``decode(output_ids)``,
which leaves special tokens (EOS) out. Sampling: temperature 0 is greedy; otherwise temperature, top-k
and top-p, with a per-request ``torch.Generator`` seeded from ``sampling.seed`` when given.

New weights (``update_weights``: a torch module's tensors, or a checkpoint directory) are copied into
the model by the scheduler thread between two forward passes, so a step never sees half-copied weights;
requests in flight go on with the new weights, and a result that lived through the swap says which
tokens each version produced (``weight_versions`` spans; ``weight_version`` is its last token's).

Limits: no prefix cache (every request prefills its whole prefix; ``cached_tokens`` is always 0); the KV
cache is transformers' ``DynamicCache`` whose tensors this module pads, merges and slices directly, so it
grows by concatenation (fine for the embedded default and tests; the trainer's slot engine is the fast
path on a GPU); greedy results of a batched run match a lone run up to floating-point reduction order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    VersionSpan,
    WeightSource,
    WeightUpdate,
    check_source,
    find_stop,
    render_chat,
    stop_pattern,
)
from shared.tasks.prompts import PromptStyle
from shared.weights import initial_label

log = logging.getLogger(__name__)

_BUILD_HINT = (
    "build a local model with `python -m trainer.modeling DIR --preset small` "
    "(or trainer.modeling.build_model), or download a Hugging Face model directory there"
)


def _weights_hash(model_dir: Path) -> str:
    """A short sha256 over the weight files (names and bytes): :func:`shared.weights.initial_label`."""
    return initial_label(model_dir)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory (safetensors files, or a transformers ``*.bin``)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("*.bin"))
    if not bins:
        raise FileNotFoundError(f"{path} has no weight files (*.safetensors or *.bin)")
    state = {}
    for f in bins:
        state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def _check_keys(model: Any, state: dict[str, Any]) -> None:
    """ValueError unless ``state`` has every tensor of ``model`` (a tied copy may be left out) and no other."""
    expected = set(model.state_dict())
    params = dict(model.named_parameters(remove_duplicate=False))
    by_storage: dict[int, set[str]] = {}
    for name, tensor in params.items():
        by_storage.setdefault(tensor.data_ptr(), set()).add(name)
    missing = {
        name for name in expected - set(state)
        if not (name in params and by_storage[params[name].data_ptr()] & set(state))  # not a tied copy
    }
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"the new weights do not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else "auto"
    if dtype == "auto":
        return "auto"
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return resolved


@dataclass
class _Item:
    """A request waiting for or running in the batch, and how to hand its result back."""

    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerateResult]
    cancelled: bool = False  # set (from the loop) when the caller stops waiting


@dataclass
class _Control:
    """Work the scheduler thread runs between two forward passes (a weight copy), and its caller's future."""

    apply: Any  # () -> None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


@dataclass
class _Seq:
    """A running sequence: one row of the batch."""

    item: _Item
    pattern: re.Pattern[str] | None
    limit: int  # max new tokens, capped by the context length
    pos: int  # position id of the next token fed to the model
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    text_len: int = 0  # length of the decoded output at the last stop check
    streamed: int = 0  # characters of the output already handed to the request's on_text
    spans: list[list[Any]] = field(default_factory=list)  # [version, start, end) runs over the output


class TransformersBackend:
    """A :class:`shared.backends.base.ModelBackend` over a local transformers model directory.

    The scheduler thread starts on the first ``generate`` and runs until :meth:`aclose`, which aborts
    whatever is still queued or running (``FinishReason.ABORT``). ``stats`` counts forward passes,
    generated tokens and the largest batch seen; ``eos_ids`` is the set of ids that end a request.
    """

    weight_sources = frozenset({WeightSource.MODULE, WeightSource.PATH})

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_batch: int = 64,
        version: str | None = None,
        prompt_style: PromptStyle = PromptStyle.TRAINED,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist; {_BUILD_HINT}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model directory; {_BUILD_HINT}"
            )
        if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            raise FileNotFoundError(f"{path} has no weight files (*.safetensors); {_BUILD_HINT}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.tokenizer: Any
        self.model: Any  # a PreTrainedModel with a causal LM head
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=_resolve_dtype(dtype, device)
            )
        except Exception as exc:  # a broken config, tokenizer or weight file: say which directory
            raise ValueError(f"cannot load a model and tokenizer from {path}: {exc}; {_BUILD_HINT}") from exc
        self.model.to(device).eval()
        self.model_id = path.resolve().name
        self.prompt_style = prompt_style
        self.model_dir = path
        self.device = torch.device(device)
        self.max_batch = max_batch
        self._version = version or _weights_hash(path)
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = []
        self.eos_ids: frozenset[int] = frozenset(eos if isinstance(eos, list) else [eos])
        self._pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self._fast = self.tokenizer.backend_tokenizer  # the Rust tokenizer: decode after every token is hot
        self.stats: dict[str, int] = {
            "requests": 0,  # requests finished
            "forward_calls": 0,  # prefill + decode forward passes
            "prefill_calls": 0,
            "decode_calls": 0,
            "tokens": 0,  # tokens generated
            "max_batch_seen": 0,  # most sequences in one forward pass
        }
        self._queue: queue.Queue[_Item | _Control | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.last_swap_pause_s: float | None = None  # how long the last update_weights held generation

    # ----------------------------------------------------------------------------- the protocol
    @property
    def weight_version(self) -> str:
        return self._version

    def encode(self, text: str) -> list[int]:
        return list(self._fast.encode(text, add_special_tokens=False).ids)

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        return str(self._fast.decode(ids, skip_special_tokens=True))

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise RuntimeError("the backend is closed")
        if not request.input_ids:
            raise ValueError("input_ids is empty: a request needs at least one prompt token")
        if len(request.input_ids) >= self.max_length:
            raise ValueError(
                f"the prompt has {len(request.input_ids)} tokens; the model's context is {self.max_length}"
            )
        if request.stop_regex:
            re.compile(request.stop_regex)  # a bad pattern fails here, in the caller, not in the thread
        loop = asyncio.get_running_loop()
        item = _Item(request, loop, loop.create_future())

        def _on_done(fut: asyncio.Future[GenerateResult]) -> None:
            if fut.cancelled():
                item.cancelled = True

        item.future.add_done_callback(_on_done)
        self._ensure_thread()
        self._queue.put(item)
        return await item.future

    async def update_weights(self, update: WeightUpdate) -> None:
        """Copy new weights into the model between two forward passes; ``weight_version`` becomes
        ``update.version`` (a checkpoint directory is read in a thread first)."""
        check_source(self, update)
        if self._closed:
            raise RuntimeError("the backend is closed")
        if update.module is not None:
            state = update.module.state_dict()
        else:
            state = await asyncio.to_thread(_read_state_dict, Path(str(update.path)))

        _check_keys(self.model, state)

        def apply() -> None:
            t0 = time.perf_counter()
            self.model.load_state_dict(state, strict=False)  # tied weights may be absent from a checkpoint
            self._version = update.version
            self.last_swap_pause_s = time.perf_counter() - t0  # generation held between two forward passes

        loop = asyncio.get_running_loop()
        control = _Control(apply, loop, loop.create_future())
        self._ensure_thread()
        self._queue.put(control)
        await control.future
        log.info("backend %s now serves weights %s", self.model_id, update.version)

    async def aclose(self) -> None:
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)
            self._thread = None

    # ------------------------------------------------------------------------------ the scheduler
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"backend-{self.model_id}", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        scheduler = _Scheduler(self)
        try:
            with torch.inference_mode():
                scheduler.loop()
        except BaseException as exc:  # the thread must never die silently with callers waiting
            log.exception("transformers backend scheduler failed")
            scheduler.fail_all(exc)


class _Scheduler:
    """The batch state, owned by the backend thread."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.b = backend
        self.model = backend.model
        self.waiting: list[_Item] = []
        self.controls: list[_Control] = []
        self.running: list[_Seq] = []
        self.cache: Any = None  # a DynamicCache over the running rows
        self.mask: torch.Tensor | None = None  # (rows, cache_len) 1 = real token, 0 = padding
        self.last: torch.Tensor | None = None  # (rows,) the token each row feeds next
        self.stopping = False
        # transformers 5.x renamed the forward's `past_key_values` to `cache`; the cache is updated in place
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def loop(self) -> None:
        while True:
            self._collect(block=not self.running and not self.waiting)
            self._run_controls()
            if self.stopping:
                break
            self._drop_cancelled()
            self._admit()
            if self.running:
                self._decode_step()
        self.fail_all(None)

    # ----------------------------------------------------------------------------- admission
    def _collect(self, *, block: bool) -> None:
        try:
            got = self.b._queue.get(block=block)
            while True:
                if got is None:
                    self.stopping = True
                elif isinstance(got, _Control):
                    self.controls.append(got)
                else:
                    self.waiting.append(got)
                got = self.b._queue.get_nowait()
        except queue.Empty:
            pass

    def _run_controls(self) -> None:
        controls, self.controls = self.controls, []
        for control in controls:
            error: BaseException | None = None
            try:
                control.apply()
            except Exception as exc:  # a bad checkpoint fails its caller, not the batch
                error = exc

            def settle(c: _Control = control, e: BaseException | None = error) -> None:
                if c.future.done():
                    return
                if e is None:
                    c.future.set_result(None)
                else:
                    c.future.set_exception(e)

            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
                control.loop.call_soon_threadsafe(settle)

    def _drop_cancelled(self) -> None:
        self.waiting = [it for it in self.waiting if not it.cancelled]
        gone = [i for i, s in enumerate(self.running) if s.item.cancelled]
        if gone:
            self._retire(gone)

    def _admit(self) -> None:
        room = self.b.max_batch - len(self.running)
        if room <= 0 or not self.waiting:
            return
        batch, self.waiting = self.waiting[:room], self.waiting[room:]
        seqs = [self._new_seq(item) for item in batch]
        ready = [s for s in seqs if s.limit > 0]
        for s in seqs:
            if s.limit <= 0:
                self._finish(s, FinishReason.LENGTH)
        if not ready:
            return
        device = self.b.device
        width = max(len(s.item.request.input_ids) for s in ready)
        ids = torch.full((len(ready), width), self.b._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ready), width), dtype=torch.long)
        for row, s in enumerate(ready):
            prompt = s.item.request.input_ids
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        from transformers import DynamicCache

        cache: Any = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: cache},
        )
        self._count(len(ready), prefill=True)
        keep = mask.bool()[:, None, :, None]
        for layer in cache.layers:  # padded positions may hold NaN from fully masked rows: zero them
            layer.keys = layer.keys.masked_fill(~keep, 0)
            layer.values = layer.values.masked_fill(~keep, 0)
        log.debug("prefill: %d new sequences, width %d, %d running", len(ready), width, len(self.running))
        self._merge(ready, cache, mask)
        first = len(self.running) - len(ready)
        self._advance(out.logits[:, -1, :], list(range(first, len(self.running))))

    def _new_seq(self, item: _Item) -> _Seq:
        req = item.request
        sampling = req.sampling
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.b.device)
            if sampling.seed is not None:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()
        return _Seq(
            item=item,
            pattern=stop_pattern(req.stop_regex),
            limit=min(req.max_new_tokens, self.b.max_length - len(req.input_ids)),
            pos=len(req.input_ids),
            generator=generator,
        )

    def _merge(self, seqs: list[_Seq], cache: Any, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        if self.cache is None or self.mask is None or not self.running:
            self.cache, self.mask, self.running = cache, mask, list(seqs)
            self.last = torch.zeros(len(seqs), dtype=torch.long, device=mask.device)
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
            if length == width:
                return t
            shape = list(t.shape)
            shape[dim] = width - length
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([pad(old.keys, old_len, 2), pad(new.keys, new_len, 2)], dim=0)
            old.values = torch.cat([pad(old.values, old_len, 2), pad(new.values, new_len, 2)], dim=0)
        self.mask = torch.cat([pad(self.mask, old_len, 1), pad(mask, new_len, 1)], dim=0)
        assert self.last is not None
        self.last = torch.cat([self.last, self.last.new_zeros(len(seqs))])
        self.running.extend(seqs)

    # ---------------------------------------------------------------------------------- decoding
    def _decode_step(self) -> None:
        assert self.mask is not None and self.last is not None
        rows = len(self.running)
        self.mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        positions = torch.tensor([[s.pos] for s in self.running], dtype=torch.long, device=self.mask.device)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: self.cache},
        )
        for s in self.running:
            s.pos += 1
        self._count(rows, prefill=False)
        self._advance(out.logits[:, -1, :], list(range(rows)))

    def _count(self, rows: int, *, prefill: bool) -> None:
        stats = self.b.stats
        stats["forward_calls"] += 1
        stats["prefill_calls" if prefill else "decode_calls"] += 1
        stats["max_batch_seen"] = max(stats["max_batch_seen"], rows)
        log.debug("%s forward over %d sequences", "prefill" if prefill else "decode", rows)

    def _advance(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Pick the next token of each of ``rows`` (logits[k] belongs to rows[k]); retire finished rows."""
        assert self.last is not None
        tokens = self._pick(logits.float(), [self.running[r] for r in rows])
        self.last[rows] = torch.tensor(tokens, dtype=torch.long, device=self.last.device)
        done: list[int] = []
        for r, tok in zip(rows, tokens, strict=True):
            seq = self.running[r]
            seq.output.append(tok)
            version, n = self.b._version, len(seq.output)
            if seq.spans and seq.spans[-1][0] == version:
                seq.spans[-1][2] = n
            else:
                seq.spans.append([version, n - 1, n])
            self.b.stats["tokens"] += 1
            reason = self._check(seq, tok)
            self._stream(seq)
            if reason is not None:
                self._finish(seq, reason)
                done.append(r)
        if done:
            self._retire(done)

    def _pick(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        picked: list[int] = []
        for k, seq in enumerate(seqs):
            sp = seq.item.request.sampling
            if sp.temperature == 0:
                picked.append(int(greedy[k]))
            else:
                picked.append(_sample(logits[k], sp.temperature, sp.top_k, sp.top_p, seq.generator))
        return picked

    def _check(self, seq: _Seq, tok: int) -> FinishReason | None:
        if tok in self.b.eos_ids:
            return FinishReason.EOS
        if seq.pattern is not None:
            text = self.b.decode(seq.output)
            if find_stop(text, seq.pattern, seq.text_len) is not None:
                return FinishReason.STOP
            seq.text_len = len(text)
        if len(seq.output) >= seq.limit:
            return FinishReason.LENGTH
        return None

    def _stream(self, seq: _Seq) -> None:
        """Hand the newly decoded text to the request's ``on_text``, on its event loop (whole characters
        only: a byte-level token can end inside one)."""
        callback = seq.item.request.on_text
        if callback is None:
            return
        text = self.b.decode(seq.output)
        if len(text) <= seq.streamed or text.endswith("\ufffd"):
            return
        piece, seq.streamed = text[seq.streamed :], len(text)
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
            seq.item.loop.call_soon_threadsafe(callback, piece)

    # --------------------------------------------------------------------------------- retiring
    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        text = self.b.decode(seq.output)
        matched = None
        if reason is FinishReason.STOP and seq.pattern is not None:
            m = find_stop(text, seq.pattern, seq.text_len)
            matched = m.group(0) if m else None
        spans = tuple(VersionSpan(v, a, b) for v, a, b in seq.spans)
        result = GenerateResult(
            output_ids=list(seq.output),
            text=text,
            finish=reason,
            matched=matched,
            weight_version=spans[-1].version if spans else self.b.weight_version,
            weight_versions=spans if len(spans) > 1 else (),
        )
        self.b.stats["requests"] += 1
        self._deliver(seq.item, result)

    def _retire(self, rows: list[int]) -> None:
        gone = set(rows)
        keep = [i for i in range(len(self.running)) if i not in gone]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return
        assert self.mask is not None and self.last is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0  # drop leading columns that are padding in every row
        self.mask = mask[:, start:]
        self.last = self.last.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _deliver(self, item: _Item, result: GenerateResult) -> None:
        def _set() -> None:
            if not item.future.done():
                item.future.set_result(result)

        try:
            item.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            log.debug("dropping a result for a closed event loop (%s)", item.request.tag)

    def fail_all(self, exc: BaseException | None) -> None:
        """Hand every waiting and running request back: ABORT on shutdown, the exception on a crash."""
        items = [s.item for s in self.running] + self.waiting
        try:
            while True:
                got = self.b._queue.get_nowait()
                if isinstance(got, _Control):
                    self.controls.append(got)
                elif got is not None:
                    items.append(got)
        except queue.Empty:
            pass
        self._run_controls()
        self.running, self.waiting = [], []
        self.cache = self.mask = self.last = None
        for item in items:
            if exc is None:
                self._deliver(
                    item, GenerateResult([], "", FinishReason.ABORT, weight_version=self.b.weight_version)
                )
            else:
                self._deliver_error(item, exc)

    def _deliver_error(self, item: _Item, exc: BaseException) -> None:
        def _set() -> None:
            if not item.future.done():
                item.future.set_exception(RuntimeError(f"transformers backend failed: {exc!r}"))

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
            item.loop.call_soon_threadsafe(_set)


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from ``logits`` (V,) with temperature, top-k (-1: off) and top-p (1.0: off)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    if 0 < top_k < sorted_probs.numel():
        sorted_probs = sorted_probs[:top_k]
        order = order[:top_k]
    if top_p < 1.0:
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        keep = before < top_p  # the first token is always kept
        sorted_probs, order = sorted_probs[keep], order[keep]
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[choice])
