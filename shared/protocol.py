"""The AsyncThink thinking protocol: tags, actions, an incremental parser and format errors.

Paper format (arXiv 2510.26658), kept byte-compatible:

    <FORK-i>sub-query</FORK-i>   start worker i on the sub-query; the organizer keeps decoding
    <JOIN-i>                     the organizer waits for worker i; the runtime appends the worker's
                                 returned text and ``</JOIN-i>``, then the organizer resumes
    <ANSWER>...</ANSWER>         the final answer; ends the episode
    <RETURN>...</RETURN>         a worker's takeaway (what the Join injects)

Optional extension (documented in the README): an endpoint on a fork, ``<FORK-i@python>...</FORK-i>``,
sends the sub-query to a named worker kind instead of the model (``@human`` a person, ``@human:POOL``
a person of a named pool). Plain paper text never contains ``@``
inside a tag, so plain traces parse exactly as the paper defines them.

The parser is pure and incremental: feed it text in any chunks as it streams and it emits each action
the moment its closing text arrives (a Fork at ``</FORK-i>``, a Join at ``<JOIN-i>``, the Answer at
``</ANSWER>``). Text that the runtime injects after a Join goes through :meth:`ProtocolParser.inject`
(live) or is recognised up to ``</JOIN-i>`` (replaying a stored trace), and is never parsed as actions.
A text-only replay (:func:`parse`, or ``feed(..., replay=True)``) assumes that each injected result
directly follows its ``<JOIN-i>``.

"Active workers" for the capacity rule are the forked, not yet joined ones. That makes every format
error a function of the text alone, so a reward never depends on how fast a worker happened to run.

Parser conventions (the same list, for the README, is in ``docs/protocol-conventions.md``; each
depends on the text only, never on how it was chunked or how fast a worker ran):

* Ids are positive integers in canonical decimal (``1``, ``2``, ``10``; at most 9 digits). ``<FORK-0>``,
  ``<FORK-01>`` and ``<JOIN-0>`` are malformed tags.
* Tag names are case-sensitive. In the middle of the stream, a ``<`` starts a malformed tag only when it
  begins with a complete tag word (``<FORK``, ``</FORK``, ``<JOIN``, ``</JOIN``, ``<ANSWER``,
  ``</ANSWER``, ``<RETURN``, ``</RETURN``) and is not a well-formed tag. Any other ``<`` (``3 < 5``,
  ``<b>``, ``<ANALYSIS>``, ``<JOI x``, ``<fork-1>``) is plain text.
* Where a malformed fragment ends. It runs from its ``<`` up to and including the next ``>``, or up to
  but not including the next ``<``, whichever comes first, and is at most 96 characters long. Parsing
  resumes right after it, so ``<FORK-<FORK-1>q</FORK-1>`` is one malformed tag (``<FORK-``) followed by
  a valid fork 1.
* No generated character is dropped. A malformed fragment, and a well-formed tag rejected where it
  stands (a tag inside an open FORK/ANSWER/RETURN, a join of an unknown or already joined id, a closing
  tag that closes nothing, a ``</JOIN-i>`` written by the model), stays as text: Think text, or part of
  the open tag's body when inside one. The one exception is a rejected opening tag (see below).
* A tag cut off is malformed. A fragment the parser still holds back because it could still become a tag
  (``…<FORK-1``, ``…<JOI``, ``…</ANSW``, ``…<FORK-2@pyt``, a lone trailing ``<``) is a ``malformed_tag``
  at its first character when the stream ends, or when injected text follows it (text past ``<JOIN-i>``,
  see below). Its characters stay as text.
* Offsets. Every action and every error is reported at the character offset where its construct begins:
  a Fork at its opening ``<FORK-i>``, an Answer at ``<ANSWER>``, a Return at ``<RETURN>``, a Join at
  ``<JOIN-i>``; ``unclosed_tag`` at the opening tag; ``malformed_tag`` at the fragment's first
  character; ``duplicate_fork``, ``capacity_exceeded`` and ``fork_not_allowed`` at the opening
  ``<FORK-i>``; ``join_unknown`` and ``join_repeated`` at the ``<JOIN-i>``. ``budget_exceeded`` and
  ``missing_answer`` are at the end of the stream. Offsets count every character of the stored sequence,
  generated and injected.
* Capacity is checked at the opening ``<FORK-i>``. The set of active workers (forked, not yet joined)
  cannot change inside a fork body, because a ``<JOIN-i>`` there is malformed; checking at the opening
  tag is therefore the same rule as checking at ``</FORK-i>``, only earlier.
* Rejected forks and joins are not actions. A fork or join rejected with an error (duplicate fork id,
  capacity exceeded, a fork where forks are not allowed, a join of an unknown or already joined id)
  yields only its error, never the action. A rejected fork id never counts as forked: it takes no
  capacity, a join of it is ``join_unknown``, and it may be forked later.
* A rejected opening tag still opens its construct. After a rejected ``<FORK-i>`` (and after a
  ``<RETURN>`` written by an organizer or an ``<ANSWER>`` written by a worker), the body is consumed
  with it and the matching closing tag closes it without a second error; nothing is emitted. If it is
  never closed, it is an ``unclosed_tag`` at the end like any open tag.
* Order of the errors at the end of the stream: ``budget_exceeded`` (when the token budget ran out),
  then ``malformed_tag`` (a tag cut off), then ``unclosed_tag`` (an open FORK/ANSWER/RETURN, or a join
  result that never ends), then ``missing_answer``. Parsing goes on after an error; the runtime decides
  whether to stop (the engine stops at the first one).
* Text past ``<JOIN-i>``. A model's last token may run past the ``<JOIN-i>`` it stopped at. When a Join
  is emitted, parsing stops and the rest of the fed text is held. ``inject(text)`` records the runtime's
  text (the worker's takeaway and ``</JOIN-i>``, never parsed), then parses the held text as generated
  text and returns the events it completes (another Join, a Fork, the Answer, errors). In the stored
  sequence the held text sits right after ``<JOIN-i>`` and before the injected text, so its events have
  offsets just after the join tag, and everything after it is shifted by the injected text's length.
* Replaying a stored trace. Feeding text while a join result is awaited (instead of injecting it) is a
  replay: the text up to ``</JOIN-i>`` is taken as the injected result, then parsing resumes. A
  text-only replay of a whole trace assumes that each injected result directly follows its ``<JOIN-i>``;
  a trace stored with generated text between ``<JOIN-i>`` and the result is read with that text as part
  of the result.
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

_ENDPOINT = r"[A-Za-z][A-Za-z0-9_.:-]{0,63}"  # a name, and for people a pool: human:experts
_ID = r"[1-9][0-9]{0,8}"  # canonical decimal: no 0, no leading zeros
_TAG = re.compile(
    r"<(?P<close>/?)(?P<name>FORK|JOIN|ANSWER|RETURN)"
    rf"(?:-(?P<id>{_ID})(?:@(?P<endpoint>{_ENDPOINT}))?)?>"
)
_HEADS = ("<FORK-", "</FORK-", "<JOIN-", "</JOIN-", "<ANSWER>", "</ANSWER>", "<RETURN>", "</RETURN>")
_WORDS = ("<FORK", "</FORK", "<JOIN", "</JOIN", "<ANSWER", "</ANSWER", "<RETURN", "</RETURN")
_TAG_TAIL = re.compile(rf"(?:{_ID}(?:@(?:{_ENDPOINT})?)?)?")  # what may follow a head while a tag arrives
MAX_TAG_LEN = 96
# A malformed fragment: its "<" up to and including the next ">", or up to the next "<", at most MAX_TAG_LEN.
_FRAGMENT = re.compile(rf"<[^<>]{{0,{MAX_TAG_LEN - 2}}}>?")
_BAD_ID = re.compile(r"</?(?:FORK|JOIN)-0")


class ErrorKind(StrEnum):
    """Every format error of the protocol (docs/design.md, "The protocol")."""

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
    offset: int = field(default=0, compare=False)  # character offset of the opening <FORK-i>


@dataclass(frozen=True)
class Join:
    fork_id: int
    offset: int = field(default=0, compare=False)  # character offset of <JOIN-i>


@dataclass(frozen=True)
class Answer:
    text: str
    offset: int = field(default=0, compare=False)  # character offset of the opening <ANSWER>


@dataclass(frozen=True)
class Return:
    text: str
    offset: int = field(default=0, compare=False)  # character offset of the opening <RETURN>


@dataclass(frozen=True)
class FormatError:
    kind: ErrorKind
    offset: int  # where the offending construct begins (the end of the stream for budget/missing answer)
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
    rejected: bool = False  # opened by a rejected tag: consumed up to its closing tag, never emitted


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
        self._active = 0  # len(forked - joined), kept as forks and joins happen (the capacity check is O(1))
        self.final: Answer | Return | None = None
        self._buf = ""  # generated text not parsed yet
        self._pos = 0  # absolute offset of _buf[0]
        # Injected text that sits inside or after _buf in the stored sequence: [index in _buf, length].
        self._inserts: list[list[int]] = []
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
        return self._pos + len(self._buf) + sum(n for _, n in self._inserts)

    def feed(self, text: str, *, replay: bool = False) -> list[Event]:
        """Parse generated text; return the actions and errors it completes.

        Parsing stops at each Join and holds the rest of the text until :meth:`inject` brings the join's
        result. A ``feed`` while a join result is awaited replays a stored trace instead: the text up to
        ``</JOIN-i>`` is the injected result. ``replay=True`` reads the whole text that way, without
        stopping at Joins (a stored trace in which each result directly follows its ``<JOIN-i>``).
        """
        if self.done or not text:
            return []
        self._buf += text
        return list(self._drain(replay))

    def inject(self, text: str) -> list[Event]:
        """Record text that the runtime appended (a Join's result and ``</JOIN-i>``), never parsed; then
        parse the generated text held after ``<JOIN-i>`` and return the events it completes.

        The held text precedes ``text`` in the stored sequence (the runtime appends the injected ids
        after the token that ran past the join), and a tag it leaves cut off is malformed.
        """
        if self._closed:
            return []
        self._awaiting = None
        self._inserts.append([len(self._buf), len(text)])
        self._consume(0)  # nothing held: the injected text is consumed at once
        if self.done:
            return []
        out = list(self._drain(False))
        if self._buf and self._awaiting is None and not self.done:
            out += self._cut_off("the injected text that follows it")
        return out

    def close(self, *, budget_exhausted: bool = False) -> list[Event]:
        """End of stream: report a tag cut off, what was left open, and a missing answer."""
        if self._closed:
            return []
        out: list[Event] = []
        if self.final is None:
            end = self.offset
            if budget_exhausted:
                out.append(self._error(ErrorKind.BUDGET_EXCEEDED, end, "the token budget ran out"))
            if self._buf and self._awaiting is None:
                out += self._cut_off("the end of the stream")
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
        self._pos = self.offset
        self._buf = ""
        self._inserts = []
        return out

    # --------------------------------------------------------------- internal
    def _error(self, kind: ErrorKind, offset: int, message: str) -> FormatError:
        err = FormatError(kind, offset, message)
        self.errors.append(err)
        return err

    def _drain(self, replay: bool) -> Iterator[Event]:
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
                yield from self._malformed()
                continue
            assert match is not None
            yield from self._tag(match)
            if self._awaiting is not None and not replay:
                return  # hold the rest until inject() brings the join's result

    def _consume(self, n: int) -> str:
        s, self._buf = self._buf[:n], self._buf[n:]
        self._pos += n
        if self._inserts:
            pending = []
            for at, length in self._inserts:
                if at <= n:
                    self._pos += length  # the injected text that follows the consumed characters
                else:
                    pending.append([at - n, length])
            self._inserts = pending
        return s

    def _text(self, s: str) -> Iterator[Event]:
        self._consume(len(s))
        if self._open is not None:
            self._open.body.append(s)
        else:
            yield Think(s)

    def _malformed(self) -> Iterator[Event]:
        """A malformed fragment at the start of the buffer: its error, then its characters as text."""
        m = _FRAGMENT.match(self._buf)
        assert m is not None
        fragment = m.group(0)  # (the rest of a fragment cut off by the chunk's end is text anyway)
        # Quote the shortest prefix that can no longer become a tag: the same however the text is chunked.
        shown = fragment
        for k in range(1, len(fragment)):
            if self._classify(fragment[:k])[0] != "wait":
                shown = fragment[:k]
                break
        hint = "; ids are positive integers without leading zeros" if _BAD_ID.match(shown) else ""
        yield self._error(ErrorKind.MALFORMED_TAG, self._pos, f"malformed tag at {shown!r}{hint}")
        yield from self._text(fragment)

    def _cut_off(self, by: str) -> list[Event]:
        """The held fragment could still have become a tag, but the generated text ends here."""
        frag = self._buf
        out: list[Event] = [self._error(ErrorKind.MALFORMED_TAG, self._pos, f"tag {frag!r} cut off by {by}")]
        out += self._text(frag)
        return out

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
        if buf.startswith(_WORDS):
            return "malformed", None
        return "text", None

    def _reject(self, kind: ErrorKind, raw: str, message: str) -> Iterator[Event]:
        """A well-formed tag rejected where it stands: its error, then its characters as text."""
        yield self._error(kind, self._pos, message)
        yield from self._text(raw)

    def _tag(self, m: re.Match[str]) -> Iterator[Event]:
        at = self._pos
        raw = m.group(0)
        close = m.group("close") == "/"
        name = m.group("name")
        fid = int(m.group("id")) if m.group("id") is not None else None
        endpoint = m.group("endpoint")
        needs_id = name in ("FORK", "JOIN")
        if needs_id != (fid is not None) or (endpoint is not None and (name != "FORK" or close)):
            yield from self._reject(ErrorKind.MALFORMED_TAG, raw, f"malformed tag {raw!r}")
            return
        opened = self._open
        if not close and name in ("FORK", "ANSWER", "RETURN"):
            if opened is not None:
                yield from self._reject(ErrorKind.MALFORMED_TAG, raw, f"{raw} inside <{opened.name}>")
                return
            final = "ANSWER" if self.role is Role.ORGANIZER else "RETURN"
            rejection: tuple[ErrorKind, str] | None = None
            if name == "FORK" and not self.allow_fork:
                rejection = ErrorKind.FORK_NOT_ALLOWED, "forks are not allowed here"
            elif name in ("ANSWER", "RETURN") and name != final:
                rejection = ErrorKind.MALFORMED_TAG, f"{raw} is not valid for a {self.role.value}"
            elif name == "FORK" and fid in self.forked:
                rejection = ErrorKind.DUPLICATE_FORK, f"fork id {fid} is used twice"
            elif name == "FORK" and self._active >= self.capacity - 1:
                rejection = (
                    ErrorKind.CAPACITY_EXCEEDED,
                    f"fork {fid} while {self._active} workers are active (capacity {self.capacity})",
                )
            if rejection is not None:
                yield self._error(rejection[0], at, rejection[1])
            self._consume(len(raw))
            self._open = _Open(name, fid, endpoint, at, [], rejected=rejection is not None)
            return
        if close and name in ("FORK", "ANSWER", "RETURN"):
            if opened is None or opened.name != name or opened.fork_id != fid:
                yield from self._reject(ErrorKind.MALFORMED_TAG, raw, f"{raw} closes nothing that is open")
                return
            self._consume(len(raw))
            self._open = None
            if opened.rejected:
                return
            body = "".join(opened.body)
            if name == "FORK":
                assert fid is not None
                self.forked.add(fid)
                self._active += 1
                yield Fork(fid, body, opened.endpoint, opened.offset)
            elif name == "ANSWER":
                self.final = Answer(body, opened.offset)
                yield self.final
            else:
                self.final = Return(body, opened.offset)
                yield self.final
            return
        if name == "JOIN" and not close:
            assert fid is not None
            if opened is not None:
                yield from self._reject(ErrorKind.MALFORMED_TAG, raw, f"{raw} inside <{opened.name}>")
                return
            if fid not in self.forked:
                message = f"join of fork {fid}, which was never forked"
                yield from self._reject(ErrorKind.JOIN_UNKNOWN, raw, message)
                return
            if fid in self.joined:
                yield from self._reject(ErrorKind.JOIN_REPEATED, raw, f"fork {fid} is joined twice")
                return
            self._consume(len(raw))
            self.joined.add(fid)
            self._active -= 1
            self._awaiting = fid
            yield Join(fid, at)
            return
        # </JOIN-i> outside injected text: the model wrote what only the runtime may write.
        yield from self._reject(ErrorKind.MALFORMED_TAG, raw, f"{raw} may only follow an injected result")


def parse(
    text: str, role: Role = Role.ORGANIZER, *, capacity: int = 2, allow_fork: bool = True
) -> tuple[list[Event], list[FormatError]]:
    """Parse a whole stored trace, each join's result directly after its ``<JOIN-i>`` up to ``</JOIN-i>``."""
    parser = ProtocolParser(role, capacity=capacity, allow_fork=allow_fork)
    events = parser.feed(text, replay=True)
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
