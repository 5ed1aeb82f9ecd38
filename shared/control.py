"""Control messages of the weight plane: which weights to serve, who took them, and what the trainer is told.

Two pairs of streams on the bus (names under a prefix, ``asyncthink`` by default or
``ASYNCTHINK_CONTROL_PREFIX``, so tests and stacks can share a Redis side by side):

* ``<prefix>:control:weights`` holds :class:`LoadWeights` entries. It is the log of the weights the
  fleet should serve: every serving process that reads it (the organizers; see
  ``services/control/listener.py``) loads each new entry's checkpoint, and a process that starts later
  loads the newest entry's before it serves (:func:`latest_load`). Each process answers on
  ``<prefix>:control:weights:replies`` with a :class:`WeightsReply` (same ``request_id``): the version it
  serves now, and, when it could not load, the error and the version it keeps serving.
* ``<prefix>:control:trainer`` holds :class:`TrainerCommand` entries (pause, resume, promote, rollback,
  status) for the trainer service, read through a consumer group so one trainer runs each; the answer, a
  :class:`TrainerReply`, goes to ``<prefix>:control:trainer:replies``. The gateway's admin routes and the
  ``asyncthink trainer`` verbs speak this pair (:func:`ask_trainer`).

Celery model workers take the same :class:`LoadWeights` by a Celery broadcast (remote control) and answer
with the same :class:`WeightsReply` (``services/workers/control.py``). :class:`PublishReport` is what one
publication of a version to the whole fleet came to.

Pure data and bus calls: no torch, no database.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.bus.base import Bus

DEFAULT_PREFIX = "asyncthink"
PREFIX_ENV = "ASYNCTHINK_CONTROL_PREFIX"  # overrides the prefix of every serving process (tests, side-by-side stacks)
CONTROL_MAXLEN = 1000  # approximate cap on each control stream
TRAINER_GROUP = "trainers"

ProcessKind = Literal["organizer", "celery", "sglang", "local"]
TrainerOp = Literal["pause", "resume", "promote", "rollback", "status"]


def default_prefix() -> str:
    """The control streams' prefix of this process: ``ASYNCTHINK_CONTROL_PREFIX``, else ``asyncthink``."""
    return os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX


def weights_stream(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:control:weights"


def weights_replies_stream(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:control:weights:replies"


def trainer_stream(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:control:trainer"


def trainer_replies_stream(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:control:trainer:replies"


def new_request_id() -> str:
    return uuid.uuid4().hex


class LoadWeights(BaseModel):
    """Serve ``version``, whose checkpoint directory is ``path`` (readable by every serving process)."""

    request_id: str = Field(default_factory=new_request_id)
    version: str  # the label every token generated with these weights carries
    path: str  # the checkpoint directory
    model_id: str = ""  # the model lineage the version belongs to
    content_hash: str | None = None  # sha256 of the weight files (shared/weights.py), when known
    reason: str = "publish"  # publish (a trainer cycle), promote, rollback (operator or automatic), startup
    ts: float = Field(default_factory=time.time)


class WeightsReply(BaseModel):
    """One serving process's answer to a :class:`LoadWeights`."""

    request_id: str
    process: str  # the organizer's consumer name, the Celery worker's hostname, the SGLang URL, "local"
    kind: ProcessKind
    ok: bool  # it serves the requested version now
    version: str | None  # the version it serves now (the old one when it failed)
    previous: str | None = None  # what it served before
    error: str | None = None
    # how long taking the weights held its generation: measured by the backend where it can (the copy
    # between two forward passes), else the whole call (an SGLang client: reading the version back)
    seconds: float = 0.0
    ts: float = Field(default_factory=time.time)


class PublishReport(BaseModel):
    """A publication of one version to the fleet: every reply, and whether every process took it."""

    version: str
    path: str
    reason: str
    replies: list[WeightsReply] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)  # processes expected to answer that did not
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and all(r.ok for r in self.replies)

    @property
    def failed(self) -> list[WeightsReply]:
        return [r for r in self.replies if not r.ok]

    def summary(self) -> str:
        good = sum(r.ok for r in self.replies)
        text = f"{self.version}: {good}/{len(self.replies)} processes took it"
        if self.failed:
            text += "; failed: " + "; ".join(f"{r.process} ({r.error}, serves {r.version})" for r in self.failed)
        if self.missing:
            text += "; no answer from " + ", ".join(self.missing)
        return text


class TrainerCommand(BaseModel):
    """An operator's command to the trainer service."""

    request_id: str = Field(default_factory=new_request_id)
    op: TrainerOp
    version: str | None = None  # promote / rollback: the version to serve
    reason: str = ""
    ts: float = Field(default_factory=time.time)
    expires_s: float = 120.0  # a trainer that reads it later than this drops it (no surprise promotions)

    @property
    def expired(self) -> bool:
        return time.time() > self.ts + self.expires_s


class TrainerReply(BaseModel):
    request_id: str
    ok: bool
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


# ----------------------------------------------------------------------------- bus helpers
async def publish_model(bus: Bus, stream: str, message: BaseModel) -> str:
    return await bus.publish(stream, {"data": message.model_dump_json()}, maxlen=CONTROL_MAXLEN)


async def latest_load(bus: Bus, prefix: str = DEFAULT_PREFIX) -> tuple[str, LoadWeights | None]:
    """The id of the weights stream's last entry (``"0"`` when empty) and its newest :class:`LoadWeights`."""
    after, newest = "0", None
    while True:
        entries = await bus.read(weights_stream(prefix), after=after, count=500, block_ms=0)
        if not entries:
            return after, newest
        for entry in entries:
            after = entry.id
            try:
                newest = LoadWeights.model_validate_json(entry.fields.get("data", ""))
            except ValueError:
                continue


async def wait_replies(
    bus: Bus,
    stream: str,
    request_id: str,
    *,
    after: str,
    expected: int | None,
    timeout_s: float,
    model: type[BaseModel],
) -> list[Any]:
    """Replies with ``request_id`` on ``stream`` after id ``after`` until ``expected`` came (None: until the
    timeout) or ``timeout_s`` passed."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while expected is None or len(got) < expected:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        for entry in await bus.read(stream, after=after, count=100, block_ms=min(left_ms, 500)):
            after = entry.id
            try:
                reply = model.model_validate_json(entry.fields.get("data", ""))
            except ValueError:
                continue
            if getattr(reply, "request_id", None) == request_id:
                got.append(reply)
    return got


async def ask_trainer(
    bus: Bus, command: TrainerCommand, *, timeout_s: float = 30.0, prefix: str = DEFAULT_PREFIX
) -> TrainerReply:
    """Send ``command`` to the trainer service and wait for its reply; TimeoutError when none comes."""
    replies = trainer_replies_stream(prefix)
    after = await _last_id(bus, replies)
    await publish_model(bus, trainer_stream(prefix), command)
    got = await wait_replies(
        bus, replies, command.request_id, after=after, expected=1, timeout_s=timeout_s, model=TrainerReply
    )
    if not got:
        raise TimeoutError(
            f"no trainer service answered {command.op!r} within {timeout_s:g} s (is `asyncthink serve trainer` "
            f"running on this bus?); a trainer that starts within {command.expires_s:g} s of the command "
            "still runs it, later ones drop it"
        )
    reply: TrainerReply = got[0]
    return reply


async def _last_id(bus: Bus, stream: str) -> str:
    last = "0"
    while entries := await bus.read(stream, after=last, count=1000, block_ms=0):
        last = entries[-1].id
    return last


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
    except TimeoutError:
        return False
    return True


# ----------------------------------------------------------------------------- taking weights
async def apply_load(backend: Any, message: LoadWeights, *, process: str, kind: ProcessKind) -> WeightsReply:
    """Make ``backend`` serve ``message.version`` and say how that went (never raises).

    A backend with its own weights (in-process transformers, slot engine) loads the checkpoint
    (``update_weights(WeightUpdate(version, path=...))``) after its content hash is checked, so a
    half-written or changed directory is refused; one whose weights live in a shared server
    (``remote_weights``: SGLang, swapped once by the publisher) only reads the server's version back.
    A process that fails keeps serving its old version, and the reply says which and why.
    """
    from shared.backends.base import WeightUpdate

    previous = backend.weight_version
    t0 = time.perf_counter()
    error: str | None = None
    try:
        if getattr(backend, "remote_weights", False):
            sync = getattr(backend, "sync_version", None)
            if sync is not None:
                await sync()
            if backend.weight_version != message.version:
                error = f"the server reports version {backend.weight_version}, not {message.version}"
        elif previous != message.version:
            if message.content_hash is not None:
                from shared.weights import content_hash

                found = await asyncio.to_thread(content_hash, message.path)
                if found != message.content_hash:
                    raise ValueError(
                        f"{message.path} does not hold version {message.version} (content hash {found[:12]}, "
                        f"expected {message.content_hash[:12]})"
                    )
            await backend.update_weights(WeightUpdate(message.version, path=message.path))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    held = getattr(backend, "last_swap_pause_s", None)  # what a local backend measured itself
    return WeightsReply(
        request_id=message.request_id,
        process=process,
        kind=kind,
        ok=error is None,
        version=backend.weight_version,
        previous=previous,
        error=error,
        seconds=float(held) if held is not None and error is None and previous != message.version else time.perf_counter() - t0,
    )
