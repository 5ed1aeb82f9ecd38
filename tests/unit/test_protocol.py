"""The incremental protocol parser: actions as they stream, every format error with kind and offset."""

from __future__ import annotations

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


def test_offsets_point_at_the_tags() -> None:
    text = "xx<FORK-1>q</FORK-1><JOIN-1>r</JOIN-1><ANSWER>a</ANSWER>"
    events, _ = parse(text)
    fork = next(e for e in events if isinstance(e, Fork))
    join = next(e for e in events if isinstance(e, Join))
    ans = next(e for e in events if isinstance(e, Answer))
    assert text[fork.offset :].startswith("</FORK-1>")
    assert text[join.offset :].startswith("<JOIN-1>")
    assert text[ans.offset :].startswith("</ANSWER>")


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
    assert errs[0].offset == text.index("</FORK-2>")
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
        events += parser.feed(text[pos : pos + n])
        pos += n
    events += parser.feed(text[pos:])
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
