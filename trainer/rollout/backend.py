"""``SlotEngineBackend``: the slot engine behind the async :class:`~shared.backends.base.ModelBackend` API.

Purpose: let many concurrent episodes (each an asyncio task calling ``generate``) share every decode
step. ``generate`` hands its request to one driver thread and awaits a future; the driver admits new
requests between steps, runs steps while anything is active, and resolves each future on the event
loop that asked when its request finishes. The thread (not an asyncio task) keeps device syncs off
the event loop.

``text`` is :meth:`SlotEngineBackend.decode` of ``output_ids``, which drops special tokens (an EOS id stays
the last output id but adds no text), as in the other backends; the engine's own decode keeps them.

Weights: ``update_weights`` takes a torch module (the trainer's model) or a checkpoint directory (read
into a model in a thread first); the driver copies the tensors in between two steps. A request running
across the copy reports both versions (``weight_versions`` spans, cut where the engine's
:meth:`~trainer.rollout.slot_engine.SlotEngine.progress` stood at the copy).

Limits: one engine per backend; requests from several event loops work (each future is resolved on
its own loop); ``aclose`` aborts waiting and running requests with ``FinishReason.ABORT``; an
exception inside a step fails every outstanding request with that exception and stops the driver.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    VersionSpan,
    WeightSource,
    WeightUpdate,
    check_source,
    render_chat,
)
from shared.tasks.prompts import PromptStyle
from trainer.rollout.slot_engine import EngineStats, SlotEngine


class Tokenizer(Protocol):
    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerateResult]


class SlotEngineBackend:
    """A :class:`~shared.backends.base.ModelBackend` over a :class:`SlotEngine`.

    ``update_weights`` takes a torch module with the engine's architecture (the trainer's model) or a
    checkpoint directory of one: the driver thread copies its tensors in place between two steps
    (captured CUDA graphs stay valid).
    """

    weight_sources = frozenset({WeightSource.MODULE, WeightSource.PATH})
    prompt_style = PromptStyle.TRAINED  # the models we train learn the tasks' short prompts

    def __init__(
        self,
        engine: SlotEngine,
        tokenizer: Tokenizer,
        *,
        model_id: str = "slot-engine",
        weight_version: str = "0",
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self._weight_version = weight_version
        self._cond = threading.Condition()
        self._incoming: list[tuple[GenerateRequest, _Waiter]] = []
        self._updates: list[tuple[WeightUpdate, _Waiter]] = []
        self._waiters: dict[int, _Waiter] = {}
        self._cuts: dict[int, list[tuple[str, int]]] = {}  # handle -> (version until then, ids sampled)
        self._closed = False
        self.last_swap_pause_s: float | None = None  # how long the last update_weights held the steps
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drive, name="slot-engine", daemon=True)
        self._thread.start()

    # ModelBackend -----------------------------------------------------------------------------
    @property
    def weight_version(self) -> str:
        return self._weight_version

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a plain tokenizer without the transformers keyword
            return list(self.tokenizer.encode(text))

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        """Special tokens (EOS) decode to nothing, as in every other backend (``TokenizerCodec``)."""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:  # a plain tokenizer without the transformers keyword
            return self.tokenizer.decode(ids)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        with self._cond:
            if self._error is not None:
                raise RuntimeError("the slot engine's driver stopped") from self._error
            if self._closed:
                raise RuntimeError("SlotEngineBackend is closed")
            self._incoming.append((request, waiter))
            self._cond.notify()
        return await waiter.future

    async def aclose(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # extras -----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Engine counters: tokens, steps, mean active slots, tokens/s (read without locking)."""
        return self.engine.stats

    async def update_weights(self, update: WeightUpdate) -> None:
        check_source(self, update)
        if update.path is not None:  # a checkpoint directory: read it into a module off the event loop
            update = WeightUpdate(update.version, module=await asyncio.to_thread(_load_module, update.path))
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise RuntimeError("SlotEngineBackend is closed")
            self._updates.append((update, waiter))
            self._cond.notify()
        await waiter.future

    # driver -----------------------------------------------------------------------------------
    def _apply(self, update: WeightUpdate, waiter: _Waiter) -> None:
        """Copy new weights in (driver thread, between steps); the waiter gets the outcome."""
        t0 = time.perf_counter()
        progress = self.engine.progress()
        try:
            self.engine.update_weights(update.module)
        except Exception as exc:
            _settle(waiter, exc)
            return
        self.last_swap_pause_s = time.perf_counter() - t0  # the driver ran no step meanwhile
        for handle, n in progress.items():  # running requests: what came before the copy is the old version
            self._cuts.setdefault(handle, []).append((self._weight_version, n))
        self._weight_version = update.version
        _settle(waiter, _done())

    def _labelled(self, handle: int, result: GenerateResult) -> GenerateResult:
        """``result`` with the version(s) that produced it (driver thread)."""
        result = replace(result, text=self.decode(result.output_ids), weight_version=self._weight_version)
        cuts = self._cuts.pop(handle, None)
        if not cuts:
            return result
        spans: list[VersionSpan] = []
        start = 0
        for version, end in cuts:
            end = min(end, len(result.output_ids))
            if end > start:
                spans.append(VersionSpan(version, start, end))
                start = end
        spans.append(VersionSpan(self._weight_version, start, len(result.output_ids)))
        return replace(result, weight_versions=tuple(spans)) if len(spans) > 1 else result

    def _drive(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._incoming and not self._updates and not engine.has_work and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                    incoming, self._incoming = self._incoming, []
                    updates, self._updates = self._updates, []
                for update, waiter in updates:
                    self._apply(update, waiter)
                for request, waiter in incoming:
                    try:
                        self._waiters[engine.submit(request)] = waiter
                    except Exception as exc:  # a request the engine refuses fails alone
                        _settle(waiter, exc)
                if engine.has_work:
                    for handle, result in engine.step():
                        # the engine's text keeps special tokens; the contract's is decode(output_ids)
                        _settle(self._waiters.pop(handle), self._labelled(handle, result))
        except BaseException as exc:  # a broken step fails everyone waiting
            with self._cond:
                self._error = exc
                self._closed = True
            for waiter in self._waiters.values():
                _settle(waiter, exc)
            for _, waiter in self._incoming + self._updates:
                _settle(waiter, exc)
            return
        aborted = GenerateResult(output_ids=[], text="", finish=FinishReason.ABORT)
        for waiter in list(self._waiters.values()) + [w for _, w in self._incoming]:
            _settle(waiter, aborted)
        for _, waiter in self._updates:
            _settle(waiter, RuntimeError("SlotEngineBackend closed before the weight update"))


def _done() -> GenerateResult:
    return GenerateResult(output_ids=[], text="", finish=FinishReason.STOP)


def _load_module(path: str) -> Any:
    """A checkpoint directory as a float32 CPU module (the engine copies it into its own dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def _settle(waiter: _Waiter, outcome: GenerateResult | BaseException) -> None:
    def apply() -> None:
        if waiter.future.done():
            return
        if isinstance(outcome, BaseException):
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result(outcome)

    if not waiter.loop.is_closed():
        waiter.loop.call_soon_threadsafe(apply)
