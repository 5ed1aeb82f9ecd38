"""The AsyncThink thinking protocol: tags, actions, an incremental parser and format errors.

Paper format (arXiv 2510.26658), kept byte-compatible:

    <FORK-i>sub-query</FORK-i>   start worker i on the sub-query; the organizer keeps decoding
    <JOIN-i>                     the organizer waits for worker i; the runtime appends the worker's
                                 returned text and ``</JOIN-i>``, then the organizer resumes
    <ANSWER>...</ANSWER>         the final answer; ends the episode
    <RETURN>...</RETURN>         a worker's takeaway (what the Join injects)

Optional extension (documented in the README): an endpoint on a fork, ``<FORK-i@python>...</FORK-i>``,
sends the sub-query to a named worker kind instead of the model. Plain paper text never contains ``@``
inside a tag, so plain traces parse exactly as the paper defines them.

The parser is pure and incremental: feed it text in any chunks as it streams and it emits each action
the moment its closing text arrives (a Fork at ``</FORK-i>``, a Join at ``<JOIN-i>``, the Answer at
``</ANSWER>``). Text that the runtime injects after a Join goes through :meth:`ProtocolParser.inject`
(live) or is recognised up to ``</JOIN-i>`` (replaying a stored trace), and is never parsed as actions.

"Active workers" for the capacity rule are the forked, not yet joined ones. That makes every format
error a function of the text alone, so a reward never depends on how fast a worker happened to run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

# The regular expressions a backend stops at, so the runtime can act on a tag the moment it closes.
ORGANIZER_STOP_REGEX = r"</FORK-\d+>|<JOIN-\d+>|</ANSWER>"
WORKER_STOP_REGEX = r"</RETURN>"
RECURSIVE_WORKER_STOP_REGEX = r"</FORK-\d+>|<JOIN-\d+>|</RETURN>"

_ENDPOINT = r"[A-Za-z][A-Za-z0-9_.-]{0,63}"
_TAG = re.compile(
    r"<(?P<close>/?)(?P<name>FORK|JOIN|ANSWER|RETURN)"
    rf"(?:-(?P<id>[0-9]{{1,9}})(?:@(?P<endpoint>{_ENDPOINT}))?)?>"
)
_HEADS = ("<FORK-", "</FORK-", "<JOIN-", "</JOIN-", "<ANSWER>", "</ANSWER>", "<RETURN>", "</RETURN>")
_TAG_TAIL = re.compile(rf"[0-9]{{0,9}}(?:@(?:{_ENDPOINT})?)?")
MAX_TAG_LEN = 96


class ErrorKind(StrEnum):
    """Every format error of DESIGN.md §2."""

    DUPLICATE_FORK = "duplicate_fork"  # a fork id used twice
    CAPACITY_EXCEEDED = "capacity_exceeded"  # a fork while c-1 workers are active
    JOIN_UNKNOWN = "join_unknown"  # a join of an id never forked
    JOIN_REPEATED = "join_repeated"  # a join of an id already joined
    FORK_NOT_ALLOWED = "fork_not_allowed"  # a fork where the mode forbids forks (sequential)
    MISSING_ANSWER = "missing_answer"  # stopping without an answer (or a worker without a return)
    MALFORMED_TAG = "malformed_tag"  # a tag that is not well formed, or one in the wrong place
    UNCLOSED_TAG = "unclosed_tag"  # a FORK, ANSWER or RETURN left open at the end
    BUDGET_EXCEEDED = "budget_exceeded"  # the token budget ran out


@dataclass(frozen=True)
class Think:
    text: str


@dataclass(frozen=True)
class Fork:
    fork_id: int
    query: str
    endpoint: str | None = None
    offset: int = field(default=0, compare=False)  # character offset of the closing </FORK-i>


@dataclass(frozen=True)
class Join:
    fork_id: int
    offset: int = field(default=0, compare=False)  # character offset of <JOIN-i>


@dataclass(frozen=True)
class Answer:
    text: str
    offset: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Return:
    text: str
    offset: int = field(default=0, compare=False)


@dataclass(frozen=True)
class FormatError:
    kind: ErrorKind
    offset: int
    message: str


Action = Think | Fork | Join | Answer | Return
Event = Action | FormatError


class Role(StrEnum):
    ORGANIZER = "organizer"
    WORKER = "worker"


@dataclass
class _Open:
    name: str  # FORK, ANSWER or RETURN
    fork_id: int | None
    endpoint: str | None
    offset: int
    body: list[str]


class ProtocolParser:
    """Incremental parser for one agent's stream (an organizer or a worker).

    ``capacity`` is the agent pool size c (organizer plus at most c-1 active workers);
    ``allow_fork`` is False for sequential thinking and for plain (non-recursive) workers.
    """

    def __init__(self, role: Role = Role.ORGANIZER, *, capacity: int = 2, allow_fork: bool = True) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 (the organizer itself), got {capacity}")
        self.role = role
        self.capacity = capacity
        self.allow_fork = allow_fork
        self.errors: list[FormatError] = []
        self.forked: set[int] = set()
        self.joined: set[int] = set()
        self.final: Answer | Return | None = None
        self._buf = ""
        self._pos = 0  # absolute offset of _buf[0]
        self._open: _Open | None = None
        self._awaiting: int | None = None  # fork id whose injected result has not arrived yet
        self._closed = False

    # ---------------------------------------------------------------- public
    @property
    def active(self) -> set[int]:
        """Forked and not yet joined workers."""
        return self.forked - self.joined

    @property
    def done(self) -> bool:
        return self.final is not None or self._closed

    @property
    def offset(self) -> int:
        """Characters consumed so far (generated plus injected)."""
        return self._pos + len(self._buf)

    def feed(self, text: str) -> list[Event]:
        """Parse generated text; return the actions and errors it completes."""
        if self.done or not text:
            return []
        self._buf += text
        return list(self._drain())

    def inject(self, text: str) -> list[Event]:
        """Record text that the runtime appended (a Join's result and ``</JOIN-i>``): never parsed."""
        self._awaiting = None  # any overflow after <JOIN-i> in the same token is plain generated text
        self._pos += len(self._buf) + len(text)
        self._buf = ""
        return []

    def close(self, *, budget_exhausted: bool = False) -> list[Event]:
        """End of stream: report what was left open, and a missing answer."""
        if self._closed:
            return []
        out: list[Event] = []
        if self.final is None:
            if self._buf and self._open is None and self._awaiting is None:
                out.append(Think(self._buf))
            end = self.offset
            if budget_exhausted:
                out.append(self._error(ErrorKind.BUDGET_EXCEEDED, end, "the token budget ran out"))
            if self._open is not None:
                out.append(
                    self._error(ErrorKind.UNCLOSED_TAG, self._open.offset, f"<{self._open.name}> is never closed")
                )
            elif self._awaiting is not None:
                out.append(
                    self._error(ErrorKind.UNCLOSED_TAG, end, f"the result of <JOIN-{self._awaiting}> never ends")
                )
            tag = "ANSWER" if self.role is Role.ORGANIZER else "RETURN"
            out.append(self._error(ErrorKind.MISSING_ANSWER, end, f"the stream ended without <{tag}>"))
        self._closed = True
        self._buf = ""
        return out

    # --------------------------------------------------------------- internal
    def _error(self, kind: ErrorKind, offset: int, message: str) -> FormatError:
        err = FormatError(kind, offset, message)
        self.errors.append(err)
        return err

    def _drain(self) -> Iterator[Event]:
        while self._buf and not self.done:
            if self._awaiting is not None:
                end_tag = f"</JOIN-{self._awaiting}>"
                k = self._buf.find(end_tag)
                if k < 0:
                    return  # still inside injected text (replaying a stored trace)
                self._consume(k + len(end_tag))
                self._awaiting = None
                continue
            lt = self._buf.find("<")
            if lt < 0:
                yield from self._text(self._buf)
                return
            if lt > 0:
                yield from self._text(self._buf[:lt])
                continue
            status, match = self._classify(self._buf)
            if status == "wait":
                return
            if status == "text":
                yield from self._text("<")
                continue
            if status == "malformed":
                gt = self._buf.find(">")
                n = gt + 1 if 0 <= gt < MAX_TAG_LEN else 1
                shown = self._buf[: max(n, min(len(self._buf), 24))]  # enough text to see what went wrong
                yield self._error(ErrorKind.MALFORMED_TAG, self._pos, f"malformed tag at {shown!r}")
                yield from self._text(self._buf[:n])
                continue
            assert match is not None
            yield from self._tag(match)

    def _consume(self, n: int) -> str:
        s, self._buf = self._buf[:n], self._buf[n:]
        self._pos += n
        return s

    def _text(self, s: str) -> Iterator[Event]:
        self._consume(len(s))
        if self._open is not None:
            self._open.body.append(s)
        else:
            yield Think(s)

    @staticmethod
    def _classify(buf: str) -> tuple[str, re.Match[str] | None]:
        """At a '<': a whole tag, a tag still arriving ('wait'), plain text, or a malformed tag."""
        m = _TAG.match(buf)
        if m:
            return "tag", m
        for head in _HEADS:
            if head.startswith(buf[: len(head)]) and len(buf) < len(head):
                return "wait", None  # buf is a prefix of a tag head
            if buf.startswith(head):
                if head.endswith(">"):
                    return "tag", _TAG.match(buf)  # pragma: no cover - matched above
                rest = buf[len(head) :]
                tail = _TAG_TAIL.match(rest)
                if tail and tail.end() == len(rest) and len(buf) < MAX_TAG_LEN:
                    return "wait", None
                return "malformed", None
        for word in ("<FORK", "</FORK", "<JOIN", "</JOIN", "<ANSWER", "</ANSWER", "<RETURN", "</RETURN"):
            if buf.startswith(word):
                return "malformed", None
        return "text", None

    def _tag(self, m: re.Match[str]) -> Iterator[Event]:
        at = self._pos
        raw = self._consume(m.end())
        close = m.group("close") == "/"
        name = m.group("name")
        fid = int(m.group("id")) if m.group("id") is not None else None
        endpoint = m.group("endpoint")
        needs_id = name in ("FORK", "JOIN")
        if needs_id != (fid is not None) or (endpoint is not None and (name != "FORK" or close)):
            yield self._error(ErrorKind.MALFORMED_TAG, at, f"malformed tag {raw!r}")
            return
        opened = self._open
        if not close and name in ("FORK", "ANSWER", "RETURN"):
            if opened is not None:
                yield self._error(ErrorKind.MALFORMED_TAG, at, f"{raw} inside <{opened.name}>")
                return
            if name == "FORK" and not self.allow_fork:
                yield self._error(ErrorKind.FORK_NOT_ALLOWED, at, "forks are not allowed here")
                return
            final = "ANSWER" if self.role is Role.ORGANIZER else "RETURN"
            if name in ("ANSWER", "RETURN") and name != final:
                yield self._error(ErrorKind.MALFORMED_TAG, at, f"{raw} is not valid for a {self.role.value}")
                return
            if name == "FORK" and fid in self.forked:
                yield self._error(ErrorKind.DUPLICATE_FORK, at, f"fork id {fid} is used twice")
                return
            self._open = _Open(name, fid, endpoint, at, [])
            return
        if close and name in ("FORK", "ANSWER", "RETURN"):
            if opened is None or opened.name != name or opened.fork_id != fid:
                yield self._error(ErrorKind.MALFORMED_TAG, at, f"{raw} closes nothing that is open")
                return
            self._open = None
            body = "".join(opened.body)
            if name == "FORK":
                assert fid is not None
                if len(self.active) >= self.capacity - 1:
                    yield self._error(
                        ErrorKind.CAPACITY_EXCEEDED,
                        at,
                        f"fork {fid} while {len(self.active)} workers are active (capacity {self.capacity})",
                    )
                    return
                self.forked.add(fid)
                yield Fork(fid, body, opened.endpoint, at)
            elif name == "ANSWER":
                self.final = Answer(body, at)
                yield self.final
            else:
                self.final = Return(body, at)
                yield self.final
            return
        if name == "JOIN" and not close:
            assert fid is not None
            if opened is not None:
                yield self._error(ErrorKind.MALFORMED_TAG, at, f"{raw} inside <{opened.name}>")
                return
            if fid not in self.forked:
                yield self._error(ErrorKind.JOIN_UNKNOWN, at, f"join of fork {fid}, which was never forked")
                return
            if fid in self.joined:
                yield self._error(ErrorKind.JOIN_REPEATED, at, f"fork {fid} is joined twice")
                return
            self.joined.add(fid)
            self._awaiting = fid
            yield Join(fid, at)
            return
        # </JOIN-i> outside injected text: the model wrote what only the runtime may write.
        yield self._error(ErrorKind.MALFORMED_TAG, at, f"{raw} may only follow an injected join result")


def parse(
    text: str, role: Role = Role.ORGANIZER, *, capacity: int = 2, allow_fork: bool = True
) -> tuple[list[Event], list[FormatError]]:
    """Parse a whole stored trace (join results included up to ``</JOIN-i>``)."""
    parser = ProtocolParser(role, capacity=capacity, allow_fork=allow_fork)
    events = parser.feed(text)
    events += parser.close()
    return coalesce(events), parser.errors


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge adjacent Think chunks (streaming splits text arbitrarily)."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Think) and out and isinstance(out[-1], Think):
            out[-1] = Think(out[-1].text + ev.text)
        elif not (isinstance(ev, Think) and not ev.text):
            out.append(ev)
    return out


def render(actions: Iterable[Action], results: dict[int, str] | None = None) -> str:
    """Render actions as protocol text; ``results`` gives the text each Join injects."""
    results = results or {}
    parts: list[str] = []
    for a in actions:
        if isinstance(a, Think):
            parts.append(a.text)
        elif isinstance(a, Fork):
            at = f"@{a.endpoint}" if a.endpoint else ""
            parts.append(f"<FORK-{a.fork_id}{at}>{a.query}</FORK-{a.fork_id}>")
        elif isinstance(a, Join):
            parts.append(f"<JOIN-{a.fork_id}>{join_result(a.fork_id, results.get(a.fork_id, ''))}")
        elif isinstance(a, Answer):
            parts.append(f"<ANSWER>{a.text}</ANSWER>")
        elif isinstance(a, Return):
            parts.append(f"<RETURN>{a.text}</RETURN>")
    return "".join(parts)


def join_result(fork_id: int, returned: str) -> str:
    """The text the runtime appends after ``<JOIN-i>``: the worker's takeaway, then ``</JOIN-i>``."""
    return f"{returned}</JOIN-{fork_id}>"


def extract_return(text: str) -> str | None:
    """The takeaway inside a worker's ``<RETURN>...</RETURN>``, or None."""
    m = re.search(r"<RETURN>(.*?)</RETURN>", text, flags=re.S)
    return m.group(1) if m else None
