"""What the pages for people hold while the gateway runs: the signer, key checks, templates, and a live
feed of each episode a page shows.

:class:`EpisodeFeed` reads an episode's event stream incrementally (only what is new since the last look)
and keeps what the pages show: the organizer's text so far (streamed text events, joins' results
included), each worker's streamed tokens, forks, joins, returns, and a :class:`~shared.trace.LiveTrace` for
the timeline. Feeds are kept for the most recently viewed episodes (:class:`Feeds`, bounded).

Limits: an episode that does not stream its text (``stream_text`` off) shows its forks, joins and returns
live, and its text once it is stored; events trimmed off the stream are not shown again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from services.gateway.human.session import Signer
from services.human.endpoint import HumanQueueConfig
from shared.bus.base import Bus
from shared.config import Settings
from shared.messages import EpisodeEvent, EventKind, events_stream
from shared.trace import LiveTrace, child_name

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STATIC = Path(__file__).resolve().parent.parent / "static"
MAX_FEEDS = 256
MAX_TEXT = 200_000  # characters of one agent's text kept by a feed


@dataclass
class ForkInfo:
    agent: str
    fork_id: int
    parent: str
    query: str
    endpoint: str | None
    text: str = ""  # streamed tokens
    returned: str | None = None
    error: str | None = None
    author: str | None = None
    done: bool = False
    joined: bool = False
    waiting: bool = False  # the parent waits for it in a join now

    @property
    def kind(self) -> str:
        if (self.endpoint or "").split(":")[0] == "human":
            return "human"
        return "model" if self.endpoint is None else "tool"


@dataclass
class EpisodeFeed:
    episode_id: str
    after: str = "0"
    organizer_text: str = ""
    forks: dict[str, ForkInfo] = field(default_factory=dict)  # by agent name
    trace: LiveTrace = field(default_factory=LiveTrace)
    finished: bool = False
    status: str | None = None
    answer: str | None = None
    streamed: bool = False  # the organizer's text arrives as text events
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def add(self, event: EpisodeEvent) -> None:
        self.trace.add(event)
        kind, agent, data = event.kind, event.agent, event.data
        if kind is EventKind.TEXT:
            text = str(data.get("text", ""))
            if agent == "organizer":
                self.streamed = True
                self.organizer_text = (self.organizer_text + text)[-MAX_TEXT:]
            elif agent in self.forks:
                self.forks[agent].text = (self.forks[agent].text + text)[-MAX_TEXT:]
        elif kind is EventKind.FORK:
            name = child_name(agent, int(data["fork_id"]))
            self.forks[name] = ForkInfo(name, int(data["fork_id"]), agent, str(data.get("query", "")), data.get("endpoint"))
        elif kind is EventKind.JOIN:
            fork = self.forks.get(child_name(agent, int(data["fork_id"])))
            if fork is not None:
                fork.waiting = True
        elif kind is EventKind.WORKER_RESULT:
            fork = self.forks.get(child_name(agent, int(data["fork_id"])))
            if fork is not None:
                fork.waiting, fork.joined, fork.done = False, True, True
                fork.returned = data.get("returned")
        elif kind is EventKind.SEGMENT:
            seg = data.get("segment") or {}
            fork = self.forks.get(str(seg.get("agent")))
            if fork is not None:
                fork.done = True
                fork.returned = seg.get("returned")
                fork.error = seg.get("error")
                fork.author = seg.get("author")
                if not fork.text and seg.get("text"):
                    fork.text = str(seg.get("text"))[-MAX_TEXT:]
        elif kind is EventKind.ANSWER and agent == "organizer":
            self.answer = data.get("text")
        elif kind is EventKind.FINISHED:
            self.finished = True
            self.status = str(data.get("status"))
            self.answer = data.get("answer", self.answer)

    async def refresh(self, bus: Bus) -> None:
        """Read what is new on the episode's event stream."""
        async with self.lock:
            for _ in range(100):  # at most 50,000 entries per look
                try:
                    entries = await bus.read(events_stream(self.episode_id), after=self.after, count=500, block_ms=0)
                except Exception as exc:
                    log.warning("reading the events of %s failed: %s", self.episode_id, exc)
                    return
                for entry in entries:
                    self.after = entry.id
                    try:
                        self.add(EpisodeEvent.model_validate_json(entry.fields.get("data", "")))
                    except ValueError:
                        continue
                if len(entries) < 500:
                    return

    @property
    def joined(self) -> int:
        return sum(1 for f in self.forks.values() if f.joined)

    @property
    def waiting_on(self) -> list[ForkInfo]:
        return [f for f in self.forks.values() if f.waiting]


class Feeds:
    """The feeds of the most recently viewed episodes."""

    def __init__(self, bus: Bus, limit: int = MAX_FEEDS) -> None:
        self.bus = bus
        self.limit = limit
        self._feeds: OrderedDict[str, EpisodeFeed] = OrderedDict()

    async def get(self, episode_id: str) -> EpisodeFeed:
        feed = self._feeds.pop(episode_id, None) or EpisodeFeed(episode_id)
        self._feeds[episode_id] = feed
        while len(self._feeds) > self.limit:
            self._feeds.popitem(last=False)
        await feed.refresh(self.bus)
        return feed


class KeyLiveness:
    """Whether a session's key is still live (not revoked), checked at most every ``cache_s`` per key."""

    def __init__(self, session_factory: Callable[[], Any], cache_s: float) -> None:
        self.session_factory = session_factory
        self.cache_s = cache_s
        self._seen: dict[str, tuple[float, bool]] = {}

    def _lookup(self, key_id: str) -> tuple[bool, list[str] | None]:
        from shared.store import repository

        with self.session_factory() as session:
            row = repository.get_api_key(session, key_id=key_id)
            if row is None or row.revoked_at is not None:
                return False, None
            return True, list(row.pools) if row.pools is not None else None

    async def pools(self, key_id: str) -> tuple[bool, list[str] | None]:
        return await asyncio.to_thread(self._lookup, key_id)

    async def live(self, key_id: str, *, bootstrap: bool) -> bool:
        if bootstrap:
            return True
        now = time.monotonic()
        seen = self._seen.get(key_id)
        if seen is not None and seen[0] > now:
            return seen[1]
        alive, _ = await asyncio.to_thread(self._lookup, key_id)
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen[key_id] = (now + self.cache_s, alive)
        return alive


@dataclass
class HumanPages:
    """Everything the pages for people need beside the gateway's own state."""

    settings: Settings
    signer: Signer
    config: HumanQueueConfig
    feeds: Feeds
    liveness: KeyLiveness
    templates: jinja2.Environment
    secure_cookies: bool = False  # set Secure on cookies even over plain HTTP (behind a TLS proxy)
    planning_backend: Any = None  # the model that proposes plans (opened on first use where none is given)
    backend_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    verifier: Any = None  # a KeyVerifier when the JSON API runs without keys (sign-in still needs one)

    def endpoint_names(self) -> list[str]:
        return ["python", *self.config.endpoint_names()]

    async def backend(self) -> Any:
        """The model for proposals: the embedded organizer's, an injected one, or the configured one."""
        async with self.backend_lock:
            if self.planning_backend is None:
                from services.runtime import open_service_backend

                self.planning_backend = await asyncio.to_thread(open_service_backend, self.settings)
            return self.planning_backend


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html", "svg"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ago"] = _ago
    return env


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s}s"


def session_secret(settings: Settings) -> bytes:
    """``ASYNCTHINK_SECRET_KEY`` or, in development only, a random key for this process."""
    settings.check_secret_key()
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    log.warning(
        "ASYNCTHINK_SECRET_KEY is not set: the pages for people sign sessions with a random key of this "
        "process (development only; sessions end when the gateway restarts)"
    )
    return secrets.token_bytes(32)
