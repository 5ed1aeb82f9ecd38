"""The incremental protocol parser: actions as they stream, every format error with kind and offset."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol import (
    Answer,
    ErrorKind,
    Fork,
    FormatError,
    Join,
    ProtocolParser,
    Return,
    Role,
    Think,
    coalesce,
    extract_return,
    join_result,
    parse,
    render,
)


def kinds(text: str, **kw: object) -> list[ErrorKind]:
    return [e.kind for e in parse(text, **kw)[1]]  # type: ignore[arg-type]


def test_paper_example_parses_to_actions() -> None:
    text = "Plan. <FORK-1>try 25+50</FORK-1>meanwhile <JOIN-1>75 works</JOIN-1>so <ANSWER>25+50</ANSWER>"
    events, errors = parse(text)
    assert errors == []
    assert events == [
        Think("Plan. "),
        Fork(1, "try 25+50"),
        Think("meanwhile "),
        Join(1),
        Think("so "),
        Answer("25+50"),
    ]


def test_actions_fire_the_moment_their_tag_completes() -> None:
    p = ProtocolParser(capacity=3)
    assert coalesce(p.feed("a <FORK-2>q</FORK-")) == [Think("a ")]
    assert p.feed("2>") == [Fork(2, "q")]
    assert p.feed("<JOI") == []
    assert p.feed("N-2") == []
    out = p.feed(">")
    assert out == [Join(2)]
    p.inject("result</JOIN-2>")
    assert p.feed("<ANSWER>4") == []
    assert p.feed("2</ANSWER>") == [Answer("42")]
    assert p.done


def test_offsets_point_at_where_each_construct_begins() -> None:
    text = "xx<FORK-1>q</FORK-1><JOIN-1>r</JOIN-1><ANSWER>a</ANSWER>"
    events, _ = parse(text)
    fork = next(e for e in events if isinstance(e, Fork))
    join = next(e for e in events if isinstance(e, Join))
    ans = next(e for e in events if isinstance(e, Answer))
    assert text[fork.offset :].startswith("<FORK-1>q")
    assert text[join.offset :].startswith("<JOIN-1>")
    assert text[ans.offset :].startswith("<ANSWER>a")
    ret = parse("ab <RETURN>r</RETURN>", role=Role.WORKER, allow_fork=False)[0][-1]
    assert isinstance(ret, Return) and ret.offset == 3


def test_endpoint_extension() -> None:
    events, errors = parse("<FORK-1@python>print(1)</FORK-1><JOIN-1>1</JOIN-1><ANSWER>1</ANSWER>")
    assert errors == []
    assert Fork(1, "print(1)", "python") in events


def test_worker_return() -> None:
    events, errors = parse("think <RETURN>found 75</RETURN>", role=Role.WORKER, allow_fork=False)
    assert errors == []
    assert events[-1] == Return("found 75")


def test_plain_angle_brackets_are_text() -> None:
    events, errors = parse("3 < 5 and 5 > 3 <b> <ANSWER>ok</ANSWER>")
    assert errors == []
    assert events[0] == Think("3 < 5 and 5 > 3 <b> ")


# --------------------------------------------------------------------- every format error of §2
def test_fork_id_used_twice() -> None:
    text = "<FORK-1>a</FORK-1><JOIN-1>x</JOIN-1><FORK-1>b</FORK-1>"
    errs = parse(text)[1]
    assert errs[0].kind is ErrorKind.DUPLICATE_FORK
    assert errs[0].offset == text.index("<FORK-1>b")


def test_fork_over_capacity() -> None:
    text = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2>"
    errs = parse(text, capacity=2)[1]
    assert errs[0].kind is ErrorKind.CAPACITY_EXCEEDED
    assert errs[0].offset == text.index("<FORK-2>")  # checked at the opening tag
    assert parse(text + "<JOIN-1>r</JOIN-1><JOIN-2>r</JOIN-2><ANSWER>x</ANSWER>", capacity=3)[1] == []


def test_capacity_frees_after_join() -> None:
    text = "<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><FORK-2>b</FORK-2><JOIN-2>r</JOIN-2><ANSWER>x</ANSWER>"
    assert parse(text, capacity=2)[1] == []


def test_join_of_unknown_and_repeated_ids() -> None:
    assert kinds("<JOIN-3>")[0] is ErrorKind.JOIN_UNKNOWN
    text = "<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><JOIN-1>"
    errs = parse(text)[1]
    assert errs[0].kind is ErrorKind.JOIN_REPEATED
    assert errs[0].offset == text.rindex("<JOIN-1>")


def test_stopping_without_an_answer() -> None:
    errs = parse("I am thinking")[1]
    assert [e.kind for e in errs] == [ErrorKind.MISSING_ANSWER]
    assert errs[0].offset == len("I am thinking")
    assert kinds("no return", role=Role.WORKER) == [ErrorKind.MISSING_ANSWER]


def test_malformed_tags() -> None:
    assert kinds("<FORK-x>")[0] is ErrorKind.MALFORMED_TAG
    assert kinds("<FORK>q</FORK>")[0] is ErrorKind.MALFORMED_TAG
    assert kinds("<FORK-1>q</FORK-2>")[0] is ErrorKind.MALFORMED_TAG
    assert kinds("<ANSWER-1>")[0] is ErrorKind.MALFORMED_TAG
    assert kinds("<FORK-1><FORK-2>q</FORK-2></FORK-1>", capacity=4)[0] is ErrorKind.MALFORMED_TAG
    assert kinds("</JOIN-1>")[0] is ErrorKind.MALFORMED_TAG
    assert kinds("<RETURN>x</RETURN>")[0] is ErrorKind.MALFORMED_TAG  # organizers answer
    assert kinds("<ANSWER>x</ANSWER>", role=Role.WORKER)[0] is ErrorKind.MALFORMED_TAG
    errs = parse("ab<FORK-1 and more")[1]
    assert errs[0].kind is ErrorKind.MALFORMED_TAG and errs[0].offset == 2


def test_unclosed_tags() -> None:
    text = "a <ANSWER>42"
    errs = parse(text)[1]
    assert errs[0].kind is ErrorKind.UNCLOSED_TAG and errs[0].offset == 2
    assert kinds("<FORK-1>q")[0] is ErrorKind.UNCLOSED_TAG
    assert kinds("<FORK-1>q</FORK-1><JOIN-1>never ends")[0] is ErrorKind.UNCLOSED_TAG


def test_budget_exceeded_and_forks_not_allowed() -> None:
    p = ProtocolParser()
    p.feed("long thought")
    assert p.close(budget_exhausted=True)[0] == FormatError(ErrorKind.BUDGET_EXCEEDED, 12, "the token budget ran out")
    assert kinds("<FORK-1>a</FORK-1>", allow_fork=False)[0] is ErrorKind.FORK_NOT_ALLOWED


# --------------------------------------------------------------------- fork ids
def errors_at(text: str, **kw: object) -> list[tuple[ErrorKind, int]]:
    return [(e.kind, e.offset) for e in parse(text, **kw)[1]]  # type: ignore[arg-type]


def without_errors(events: list) -> list:
    return coalesce(e for e in events if not isinstance(e, FormatError))


def test_fork_id_zero_and_leading_zeros_are_malformed() -> None:
    for tag in ("<FORK-0>", "<FORK-01>", "<FORK-007@python>"):
        text = f"a{tag}q<ANSWER>x</ANSWER>"
        events, errors = parse(text)
        assert [(e.kind, e.offset) for e in errors] == [(ErrorKind.MALFORMED_TAG, 1)], tag
        assert without_errors(events) == [Think("a" + tag + "q"), Answer("x")], tag  # the fragment stays as text
    text = "<FORK-1>a</FORK-1><JOIN-0>r<ANSWER>x</ANSWER>"
    events, errors = parse(text)
    assert [(e.kind, e.offset) for e in errors] == [(ErrorKind.MALFORMED_TAG, text.index("<JOIN-0>"))]
    assert not any(isinstance(e, Join) for e in events)
    assert Think("<JOIN-0>r") in without_errors(events)
    assert kinds("<FORK-1>a</FORK-1><JOIN-01>")[0] is ErrorKind.MALFORMED_TAG
    # inside an open tag the fragment stays in its body
    events, errors = parse("<FORK-1>a<FORK-0>b</FORK-1><JOIN-1>r</JOIN-1><ANSWER>x</ANSWER>")
    assert [(e.kind, e.offset) for e in errors] == [(ErrorKind.MALFORMED_TAG, 9)]
    assert Fork(1, "a<FORK-0>b") in events
    # large canonical ids are fine
    assert parse("<FORK-10>a</FORK-10><JOIN-10>r</JOIN-10><ANSWER>x</ANSWER>")[1] == []


def test_fork_id_zero_is_rejected_while_streaming() -> None:
    p = ProtocolParser()
    out = p.feed("<FORK-0")
    assert [e.kind for e in out if isinstance(e, FormatError)] == [ErrorKind.MALFORMED_TAG]
    assert not any(isinstance(e, Fork) for e in out + p.feed(">q</FORK-0>"))


# --------------------------------------------------------------------- a tag cut off by the end of the stream
def test_tag_cut_off_at_the_end_is_malformed() -> None:
    for text in ("Let me fork.<FORK-1", "x<JOI", "x</ANSW", "x<FORK-2@pyt", "x<", "x<RETURN", "<"):
        events, errors = parse(text)
        at = text.index("<")
        assert [(e.kind, e.offset) for e in errors] == [
            (ErrorKind.MALFORMED_TAG, at),
            (ErrorKind.MISSING_ANSWER, len(text)),
        ], text
        assert without_errors(events) == [Think(text)], text  # the fragment is kept as text


def test_cut_off_tag_error_order_with_budget_and_open_tags() -> None:
    p = ProtocolParser()
    p.feed("ab<FORK-1")
    out = p.close(budget_exhausted=True)
    assert [(e.kind, e.offset) for e in out if isinstance(e, FormatError)] == [
        (ErrorKind.BUDGET_EXCEEDED, 9),
        (ErrorKind.MALFORMED_TAG, 2),
        (ErrorKind.MISSING_ANSWER, 9),
    ]
    text = "<ANSWER>42</ANSW"
    assert errors_at(text) == [
        (ErrorKind.MALFORMED_TAG, 10),
        (ErrorKind.UNCLOSED_TAG, 0),
        (ErrorKind.MISSING_ANSWER, len(text)),
    ]


def test_mid_stream_only_tag_words_are_malformed() -> None:
    events, errors = parse("<ANALYSIS> <JOI x <fork-1>a</fork-1> <Answer> <ANSWER>ok</ANSWER>")
    assert errors == []
    assert events[0] == Think("<ANALYSIS> <JOI x <fork-1>a</fork-1> <Answer> ")
    assert errors_at("a<FORKS b<ANSWER>ok</ANSWER>") == [(ErrorKind.MALFORMED_TAG, 1)]


# --------------------------------------------------------------------- text past <JOIN-i> (inject)
def test_inject_parses_the_overflow_after_a_join() -> None:
    p = ProtocolParser()
    head = "<FORK-1>q</FORK-1><JOIN-1>"
    assert p.feed(head + "<ANSWER>5</ANSWER>") == [Fork(1, "q"), Join(1)]
    assert not p.done
    injected = "r</JOIN-1>"
    out = p.inject(injected)
    assert out == [Answer("5")]
    # stored sequence: generated text (with the overflow), then the injected text
    assert out[0].offset == len(head)  # type: ignore[union-attr]
    assert p.done and p.errors == []
    assert p.offset == len(head) + len("<ANSWER>5</ANSWER>") + len(injected)


def test_inject_overflow_offsets_follow_the_stored_sequence() -> None:
    p = ProtocolParser()
    gen1 = "<FORK-1>q</FORK-1><JOIN-1>\n"
    assert p.feed(gen1) == [Fork(1, "q"), Join(1)]
    injected = "result</JOIN-1>"
    assert p.inject(injected) == [Think("\n")]
    assert p.offset == len(gen1) + len(injected)
    stored = gen1 + injected
    gen2 = "so <ANSWER>5</ANSWER>"
    out = p.feed(gen2)
    stored += gen2
    assert out == [Think("so "), Answer("5")]
    assert stored[out[1].offset :].startswith("<ANSWER>5")  # type: ignore[union-attr]
    assert p.offset == len(stored)


def test_inject_overflow_with_a_second_join() -> None:
    p = ProtocolParser(capacity=3)
    gen = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1><JOIN-2>x"
    assert p.feed(gen) == [Fork(1, "a"), Fork(2, "b"), Join(1)]
    i1, i2 = "r1</JOIN-1>", "r2</JOIN-2>"
    out = p.inject(i1)
    assert out == [Join(2)]
    assert out[0].offset == gen.index("<JOIN-2>")  # type: ignore[union-attr]
    assert p.inject(i2) == [Think("x")]
    stored = gen + i1 + i2  # the engine appends both results after the token that ran past them
    assert p.offset == len(stored)
    out = p.feed("<ANSWER>y</ANSWER>")
    stored += "<ANSWER>y</ANSWER>"
    assert out == [Answer("y")] and out[0].offset == stored.index("<ANSWER>")  # type: ignore[union-attr]
    assert p.errors == []


def test_inject_overflow_errors_and_a_tag_cut_off_by_the_injected_text() -> None:
    p = ProtocolParser()
    p.feed("<FORK-1>q</FORK-1><JOIN-1><JOIN-1>")
    out = p.inject("r</JOIN-1>")
    assert [(e.kind, e.offset) for e in out if isinstance(e, FormatError)] == [(ErrorKind.JOIN_REPEATED, 26)]
    p = ProtocolParser()
    p.feed("<FORK-1>q</FORK-1><JOIN-1>a<ANS")
    out = p.inject("r</JOIN-1>")
    assert [(e.kind, e.offset) for e in out if isinstance(e, FormatError)] == [(ErrorKind.MALFORMED_TAG, 27)]
    assert coalesce(out) == [Think("a"), p.errors[0], Think("<ANS")]
    assert p.feed("WER>x</ANSWER>") and p.final is None  # "WER>" is plain text after the injected result


def test_feed_while_a_join_is_awaited_replays_the_injected_text() -> None:
    p = ProtocolParser()
    assert p.feed("<FORK-1>q</FORK-1><JOIN-1>") == [Fork(1, "q"), Join(1)]
    out = p.feed("r<ANSWER>no</ANSWER></JOIN-1>ok<ANSWER>5</ANSWER>")
    assert coalesce(out) == [Think("ok"), Answer("5")]
    text = "<FORK-1>q</FORK-1><JOIN-1>r<ANSWER>no</ANSWER></JOIN-1>ok<ANSWER>5</ANSWER>"
    assert out[-1].offset == text.index("<ANSWER>5")  # type: ignore[union-attr]
    # a held overflow followed by feed() is replayed too
    p = ProtocolParser()
    assert p.feed("<FORK-1>q</FORK-1><JOIN-1>r</JOI") == [Fork(1, "q"), Join(1)]
    assert p.feed("N-1><ANSWER>5</ANSWER>") == [Answer("5")]


# --------------------------------------------------------------------- error conventions
def test_rejected_forks_and_joins_are_not_actions() -> None:
    cases = [
        ("<FORK-1>a</FORK-1><FORK-2>b</FORK-2>", ErrorKind.CAPACITY_EXCEEDED, "<FORK-2>", {}),
        ("<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><FORK-1>b</FORK-1>", ErrorKind.DUPLICATE_FORK, "<FORK-1>b", {}),
        ("x<FORK-1>b</FORK-1>", ErrorKind.FORK_NOT_ALLOWED, "<FORK-1>", {"allow_fork": False}),
    ]
    for prefix, kind, at, kw in cases:
        text = prefix + "<ANSWER>z</ANSWER>"
        events, errors = parse(text, **kw)  # type: ignore[arg-type]
        # one error only: the rejected fork's body and its </FORK-i> are consumed with it
        assert [(e.kind, e.offset) for e in errors] == [(kind, text.index(at))], text
        assert "b" not in [e.query for e in events if isinstance(e, Fork)], text
        assert not any(isinstance(e, Think) and "b" in e.text for e in events), text
        assert events[-1] == Answer("z"), text
    events, errors = parse("<JOIN-3><FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><JOIN-1>")
    assert [e.kind for e in errors][:2] == [ErrorKind.JOIN_UNKNOWN, ErrorKind.JOIN_REPEATED]
    assert [e for e in events if isinstance(e, Join)] == [Join(1)]


def test_a_fork_rejected_for_capacity_never_counts_as_forked() -> None:
    text = "<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-2>"
    assert [k for k in kinds(text)][:2] == [ErrorKind.CAPACITY_EXCEEDED, ErrorKind.JOIN_UNKNOWN]
    p = ProtocolParser()
    p.feed("<FORK-1>a</FORK-1><FORK-2>b</FORK-2><JOIN-1>")
    p.inject("r</JOIN-1>")
    assert p.feed("<FORK-2>c</FORK-2>") == [Fork(2, "c")]  # the id was never used
    assert 2 in p.forked


def test_a_rejected_fork_left_open_is_unclosed() -> None:
    text = "<FORK-1>a</FORK-1><FORK-2>b"
    assert errors_at(text) == [
        (ErrorKind.CAPACITY_EXCEEDED, 18),
        (ErrorKind.UNCLOSED_TAG, 18),
        (ErrorKind.MISSING_ANSWER, len(text)),
    ]


def test_errors_at_the_start_of_their_construct() -> None:
    assert errors_at("ab<ANSWER>x")[0] == (ErrorKind.UNCLOSED_TAG, 2)
    assert errors_at("ab<FORK-1>x")[0] == (ErrorKind.UNCLOSED_TAG, 2)
    assert errors_at("ab<FORK-x>")[0] == (ErrorKind.MALFORMED_TAG, 2)
    assert errors_at("ab<FORK-1>q</FORK-2>")[0] == (ErrorKind.MALFORMED_TAG, 11)


def test_a_malformed_fragment_ends_at_the_next_gt_or_before_the_next_lt() -> None:
    text = "<FORK-<FORK-1>q</FORK-1><JOIN-1>r</JOIN-1><ANSWER>x</ANSWER>"
    events, errors = parse(text)
    assert [(e.kind, e.offset) for e in errors] == [(ErrorKind.MALFORMED_TAG, 0)]
    assert errors[0].message == "malformed tag at '<FORK-'"
    assert without_errors(events)[:2] == [Think("<FORK-"), Fork(1, "q")]
    assert without_errors(events)[1].offset == 6
    events, errors = parse("<FORK-x y> <ANSWER>x</ANSWER>")
    assert [(e.kind, e.offset) for e in errors] == [(ErrorKind.MALFORMED_TAG, 0)]
    assert without_errors(events) == [Think("<FORK-x y> "), Answer("x")]
    events, errors = parse("<ANSWER-1<ANSWER>x</ANSWER>")
    assert [(e.kind, e.offset) for e in errors] == [(ErrorKind.MALFORMED_TAG, 0)]
    assert without_errors(events) == [Think("<ANSWER-1"), Answer("x")]


# --------------------------------------------------------------------- properties
@st.composite
def valid_episodes(draw: st.DrawFn) -> tuple[list, dict[int, str], int]:
    capacity = draw(st.integers(1, 4))
    words = st.text(alphabet="abc 0123456789+-*/=.,\n()>", max_size=12)  # no "<": it could start a tag
    actions: list = []
    results: dict[int, str] = {}
    active: list[int] = []
    next_id = draw(st.integers(1, 5))
    for _ in range(draw(st.integers(0, 8))):
        choice = draw(st.sampled_from(["think", "fork", "join"]))
        if choice == "think":
            actions.append(Think(draw(words)))
        elif choice == "fork" and len(active) < capacity - 1:
            endpoint = draw(st.sampled_from([None, None, "python", "human"]))
            actions.append(Fork(next_id, draw(words), endpoint))
            active.append(next_id)
            next_id += draw(st.integers(1, 3))
        elif choice == "join" and active:
            fid = active.pop(draw(st.integers(0, len(active) - 1)))
            actions.append(Join(fid))
            results[fid] = draw(words)
    actions.append(Answer(draw(words)))
    return actions, results, capacity


@settings(max_examples=300, deadline=None)
@given(valid_episodes(), st.lists(st.integers(1, 20), max_size=30))
def test_render_then_parse_in_random_chunks_round_trips(episode, cuts) -> None:  # type: ignore[no-untyped-def]
    actions, results, capacity = episode
    text = render(actions, results)
    parser = ProtocolParser(capacity=capacity)
    events = []
    pos = 0
    for n in cuts:
        events += parser.feed(text[pos : pos + n], replay=True)
        pos += n
    events += parser.feed(text[pos:], replay=True)
    events += parser.close()
    assert parser.errors == []
    assert coalesce(events) == coalesce(actions)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("<>/-@FORKJINASWETU0123456789 x")), max_size=80),
    st.lists(st.integers(1, 9), max_size=20),
    st.integers(1, 4),
    st.sampled_from([Role.ORGANIZER, Role.WORKER]),
)
def test_garbage_never_crashes(text: str, cuts: list[int], capacity: int, role: Role) -> None:
    parser = ProtocolParser(role, capacity=capacity)
    pos = 0
    for n in cuts:
        parser.feed(text[pos : pos + n])
        pos += n
    parser.feed(text[pos:])
    out = parser.close()
    for e in parser.errors:
        assert 0 <= e.offset <= len(text)
    if parser.final is None:
        assert any(isinstance(e, FormatError) and e.kind is ErrorKind.MISSING_ANSWER for e in out)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("<>/-@FORKJINASWETU0123456789 x")), max_size=80),
    st.lists(st.integers(1, 9), max_size=20),
    st.integers(1, 4),
    st.sampled_from([Role.ORGANIZER, Role.WORKER]),
)
def test_any_chunking_gives_the_same_events_and_errors(text: str, cuts: list[int], capacity: int, role: Role) -> None:
    whole_events, whole_errors = parse(text, role, capacity=capacity)
    parser = ProtocolParser(role, capacity=capacity)
    events = []
    pos = 0
    for n in cuts:
        events += parser.feed(text[pos : pos + n], replay=True)
        pos += n
    events += parser.feed(text[pos:], replay=True)
    events += parser.close()
    assert parser.errors == whole_errors
    assert coalesce(events) == whole_events
    assert [getattr(e, "offset", None) for e in coalesce(events)] == [
        getattr(e, "offset", None) for e in whole_events
    ]


_TAG_SPAN = re.compile(r"<[^<>]*>")


@settings(max_examples=300, deadline=None)
@given(valid_episodes(), st.lists(st.integers(1, 20), max_size=30), st.lists(st.integers(0, 12), max_size=30))
def test_live_streaming_with_text_past_each_join(episode, cuts, overflows) -> None:  # type: ignore[no-untyped-def]
    """Like the engine: feed generated chunks; a chunk that runs past <JOIN-i> is followed by the injected
    result(s) in the stored sequence. Events equal the actions and offsets point into the stored text."""
    actions, results, capacity = episode
    generated = render(actions, {})
    generated = re.sub(r"</JOIN-\d+>", "", generated)  # the model writes no join results
    tags = [(m.start(), m.end()) for m in _TAG_SPAN.finditer(generated)]
    parser = ProtocolParser(capacity=capacity)
    events: list = []
    stored = ""
    pos = 0
    i = 0
    while pos < len(generated):
        end = min(len(generated), pos + (cuts[i] if i < len(cuts) else len(generated)))
        joins = [e for s, e in tags if pos < e <= end and generated.startswith("<JOIN-", s)]
        if joins:  # the backend stops at the first <JOIN-i>; its last token may run past it
            over = overflows[i] if i < len(overflows) else 0
            end = min(len(generated), joins[0] + over)
            end = next((s for s, e in tags if s < end < e), end)  # never inside a tag
        i += 1
        chunk = generated[pos:end]
        stored += chunk
        pos = end
        pending = parser.feed(chunk)
        while pending:
            ev = pending.pop(0)
            events.append(ev)
            if isinstance(ev, Join):
                injected = join_result(ev.fork_id, results[ev.fork_id])
                stored += injected
                pending += parser.inject(injected)
    events += parser.close()
    assert parser.errors == []
    assert coalesce(events) == coalesce(actions)
    assert parser.offset == len(stored)
    for ev in events:  # (an injected result may land inside a tag opened by the text past a join)
        if isinstance(ev, Fork):
            at = f"@{ev.endpoint}" if ev.endpoint else ""
            assert stored.startswith(f"<FORK-{ev.fork_id}{at}>", ev.offset)
        elif isinstance(ev, Join):
            assert stored.startswith(f"<JOIN-{ev.fork_id}>", ev.offset)
        elif isinstance(ev, Answer):
            assert stored.startswith("<ANSWER>", ev.offset)



# ---------------------------------------------------------------- messages (what a person reads in a trace)


def messages(text: str, **kw: object) -> list[tuple[ErrorKind, int, str]]:
    return [(e.kind, e.offset, e.message) for e in parse(text, **kw)[1]]  # type: ignore[arg-type]


def test_every_rejection_says_why() -> None:
    # "<FORK-1>a</FORK-1>" is 18 characters: the second fork opens at 18
    assert messages("<FORK-1>a</FORK-1><FORK-2>b</FORK-2><ANSWER>x</ANSWER>") == [
        (ErrorKind.CAPACITY_EXCEEDED, 18, "fork 2 while 1 workers are active (capacity 2)"),
    ]
    # ... and "<JOIN-1>r</JOIN-1>" 18 more: 36
    assert messages("<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><FORK-1>b</FORK-1><ANSWER>x</ANSWER>") == [
        (ErrorKind.DUPLICATE_FORK, 36, "fork id 1 is used twice"),
    ]
    assert messages("<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><JOIN-1><ANSWER>x</ANSWER>") == [
        (ErrorKind.JOIN_REPEATED, 36, "fork 1 is joined twice"),
    ]
    assert messages("<JOIN-3><ANSWER>x</ANSWER>") == [
        (ErrorKind.JOIN_UNKNOWN, 0, "join of fork 3, which was never forked"),
    ]
    assert messages("<FORK-1>a</FORK-1><ANSWER>x</ANSWER>", allow_fork=False) == [
        (ErrorKind.FORK_NOT_ALLOWED, 0, "forks are not allowed here"),
    ]
    assert messages("<FORK-1>a<FORK-2>b</FORK-1><ANSWER>x</ANSWER>", capacity=3) == [
        (ErrorKind.MALFORMED_TAG, 9, "<FORK-2> inside <FORK>"),
    ]
    assert messages("x</ANSWER><ANSWER>a</ANSWER>") == [
        (ErrorKind.MALFORMED_TAG, 1, "</ANSWER> closes nothing that is open"),
    ]
    assert messages("a</JOIN-1><ANSWER>y</ANSWER>") == [
        (ErrorKind.MALFORMED_TAG, 1, "</JOIN-1> may only follow an injected result"),
    ]
    assert messages("<JOIN-1@x><ANSWER>y</ANSWER>") == [(ErrorKind.MALFORMED_TAG, 0, "malformed tag '<JOIN-1@x>'")]
    assert messages("<FORK-1>a<JOIN-1></FORK-1><ANSWER>y</ANSWER>") == [
        (ErrorKind.MALFORMED_TAG, 9, "<JOIN-1> inside <FORK>"),
    ]
    # replaying: the result ends at the first </JOIN-1>; a second one is the model's (at 18 + 8 + 1 + 9 + 1 = 37)
    assert messages("<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1>b</JOIN-1><ANSWER>x</ANSWER>") == [
        (ErrorKind.MALFORMED_TAG, 37, "</JOIN-1> may only follow an injected result"),
    ]
    assert messages("<ANSWER>a</ANSWER>", role=Role.WORKER) == [
        (ErrorKind.MALFORMED_TAG, 0, "<ANSWER> is not valid for a worker"),
        (ErrorKind.MISSING_ANSWER, 18, "the stream ended without <RETURN>"),
    ]


def test_malformed_fragments_are_quoted_up_to_where_they_went_wrong() -> None:
    # "<FORK-0" can no longer become a tag: the quote stops there, with the hint about ids
    assert messages("<FORK-01>q<ANSWER>y</ANSWER>") == [
        (ErrorKind.MALFORMED_TAG, 0, "malformed tag at '<FORK-0'; ids are positive integers without leading zeros"),
    ]
    assert messages("<FORKS><ANSWER>y</ANSWER>") == [(ErrorKind.MALFORMED_TAG, 0, "malformed tag at '<FORKS'")]


def test_what_is_left_at_the_end_says_what_it_is() -> None:
    assert messages("<FORK-1>q") == [
        (ErrorKind.UNCLOSED_TAG, 0, "<FORK> is never closed"),
        (ErrorKind.MISSING_ANSWER, 9, "the stream ended without <ANSWER>"),
    ]
    # the join's result never ends: both errors at the end, 18 + 8 + 3 = 29
    assert messages("<FORK-1>q</FORK-1><JOIN-1>res") == [
        (ErrorKind.UNCLOSED_TAG, 29, "the result of <JOIN-1> never ends"),
        (ErrorKind.MISSING_ANSWER, 29, "the stream ended without <ANSWER>"),
    ]
    assert messages("text <FORK-1") == [
        (ErrorKind.MALFORMED_TAG, 5, "tag '<FORK-1' cut off by the end of the stream"),
        (ErrorKind.MISSING_ANSWER, 12, "the stream ended without <ANSWER>"),
    ]
    assert messages("no return", role=Role.WORKER) == [
        (ErrorKind.MISSING_ANSWER, 9, "the stream ended without <RETURN>"),
    ]


def test_close_happens_once() -> None:
    parser = ProtocolParser()
    parser.feed("thinking")
    assert [e.kind for e in parser.close()] == [ErrorKind.MISSING_ANSWER]  # type: ignore[union-attr]
    assert parser.close() == [] and parser.feed("<ANSWER>late</ANSWER>") == [] and parser.inject("x") == []
    assert len(parser.errors) == 1 and parser.done


def test_inject_stops_again_at_the_next_join_of_the_held_text() -> None:
    parser = ProtocolParser(capacity=3)
    parser.feed("<FORK-1>a</FORK-1><FORK-2>b</FORK-2>")
    # the model ran past <JOIN-1>: the held text has another join and text after it
    assert parser.feed("<JOIN-1><JOIN-2>x</JOIN-2>y") == [Join(1)]
    # the held text is generated text: parsing stops at <JOIN-2> and waits for its result (x</JOIN-2>y
    # is not taken as an injected result), so only Join 2 comes out now
    assert parser.inject("r1</JOIN-1>") == [Join(2)]
    events = parser.inject("r2</JOIN-2>")
    # the held text stays generated text: the model's </JOIN-2> is malformed, at 36 (two forks)
    # + 8 (<JOIN-1>) + 8 (<JOIN-2>) + 1 (x) = 53
    message = "</JOIN-2> may only follow an injected result"
    assert events[:2] == [Think("x"), FormatError(ErrorKind.MALFORMED_TAG, 53, message)]


def test_a_tag_cut_off_by_injected_text_says_so() -> None:
    parser = ProtocolParser()
    parser.feed("<FORK-1>a</FORK-1>")
    assert parser.feed("<JOIN-1><JOI") == [Join(1)]
    [error, think] = parser.inject("r</JOIN-1>")
    assert error == FormatError(ErrorKind.MALFORMED_TAG, 26, "tag '<JOI' cut off by the injected text that follows it")
    assert think == Think("<JOI")


def test_render_without_results_and_a_worker_return() -> None:
    assert render([Fork(1, "q"), Join(1)]) == "<FORK-1>q</FORK-1><JOIN-1></JOIN-1>"  # no results: empty
    assert render([Join(2), Join(3)], {3: "three"}) == "<JOIN-2></JOIN-2><JOIN-3>three</JOIN-3>"
    assert render([Think("t"), Return("done")]) == "t<RETURN>done</RETURN>"


def test_extract_return() -> None:
    assert extract_return("a<RETURN>x\ny</RETURN>b<RETURN>z</RETURN>") == "x\ny"  # the first, across lines
    assert extract_return("<RETURN></RETURN>") == ""
    assert extract_return("no return <return>x</return>") is None


def test_a_join_frees_exactly_one_slot() -> None:
    # capacity 2: one worker at a time; after the join of 1, fork 2 fits and fork 3 does not
    # (18 + 18 + 18 = 54 for the first three constructs)
    text = "<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><FORK-2>b</FORK-2><FORK-3>c</FORK-3><ANSWER>x</ANSWER>"
    assert messages(text) == [(ErrorKind.CAPACITY_EXCEEDED, 54, "fork 3 while 1 workers are active (capacity 2)")]


def test_capacity_below_1_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        ProtocolParser(capacity=0)
    assert str(err.value) == "capacity must be at least 1 (the organizer itself), got 0"


def test_feed_is_live_by_default_and_an_empty_feed_is_nothing() -> None:
    parser = ProtocolParser()
    events = parser.feed("<FORK-1>a</FORK-1><JOIN-1>r</JOIN-1><ANSWER>x</ANSWER>")
    assert events == [Fork(1, "a"), Join(1)] and not parser.done  # the rest waits for inject()
    assert parser.feed("") == []  # an empty chunk does not read the held text as a replay
    assert parser.inject("w</JOIN-1>")[-1] == Answer("x")  # the held text was generated text after all
