"""One conformance suite for every ModelBackend (``shared/backends/base.py`` is the contract).

Each test runs once per backend (see ``backend_case`` in ``conftest.py``). Requests are greedy, so the
model backends (the transformers backend and the slot engine over the tiny random model) are
deterministic: their tests assert structural properties and compare runs with each other, never exact
text (a stop pattern is built from a piece of their own unstopped output). The fakes and the scripted
backend play protocol text, so the protocol stop patterns are checked exactly there. Where a backend legitimately differs the fixture declares it (``BackendUnderTest``), and
a test that needs a capability a backend lacks is skipped with the reason. Every call has a deadline, so
a backend that hangs fails instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest

from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    ModelBackend,
    SamplingParams,
    WeightSource,
    WeightUpdate,
    WeightUpdateUnsupported,
)
from shared.protocol import ORGANIZER_STOP_REGEX, WORKER_STOP_REGEX
from tests.conformance.conftest import BackendUnderTest

GREEDY = SamplingParams(temperature=0)
DEADLINE_S = 30.0
PROMPT = "Find 3+4 please"  # the tiny model runs 40+ tokens on it without EOS; the fakes play their script
PROMPTS = [  # distinct prompts for concurrent requests
    PROMPT,
    "Numbers: 3, 8, 25, 50. Target: 81.",
    "Let x = 12",
    "x",
    "The answer",
    "<FORK-2>Find 24 from 3, 8</FORK-2>",
    "Solve it step by step:",
    "Worker: add 3 and 4.",
]
EOS_PROMPTS = ["abc def", "Worker: 2*3", "<FORK-1>Find 24"]  # the tiny model ends each with EOS (greedy)
ROUND_TRIP = [
    "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think.",
    "<JOIN-12>7</JOIN-12> so <ANSWER>3 * (4 + 5) = 27</ANSWER>",
    "Worker thinks about 3+4 and returns.<RETURN>7</RETURN>\n",
    "Numbers: 3, 8, 25, 50. Target: 81.\n  Try 50 + 25 + 8 - 3 - ... ; x^2 != y/2 [ok] {a: 'b'} \"q\" @#$%&|~`\t",
    " leading and trailing spaces ",
]


def _session() -> str:
    return f"episode-{uuid.uuid4().hex[:8]}"


async def generate(
    case: BackendUnderTest,
    prompt: str | list[int] = PROMPT,
    max_new_tokens: int = 16,
    *,
    stop: str | None = None,
    session: str | None = None,
    tag: str = "organizer",
) -> GenerateResult:
    """One greedy request under the deadline. Each call is its own episode unless ``session`` is given
    (the scripted backend continues a (session, tag)'s script; the others route or reuse caches by it)."""
    b = case.backend
    request = GenerateRequest(
        input_ids=b.encode(prompt) if isinstance(prompt, str) else prompt,
        max_new_tokens=max_new_tokens,
        stop_regex=stop,
        sampling=GREEDY,
        session=session or _session(),
        tag=tag,
    )
    result = await asyncio.wait_for(b.generate(request), DEADLINE_S)
    check_invariants(case, result, request)
    return result


def check_invariants(case: BackendUnderTest, r: GenerateResult, request: GenerateRequest) -> None:
    """What holds for every result of every backend."""
    b = case.backend
    assert isinstance(r.finish, FinishReason) and r.finish is not FinishReason.ABORT
    assert all(isinstance(i, int) for i in r.output_ids)
    if case.token_exact:
        assert len(r.output_ids) <= request.max_new_tokens
    if r.finish is FinishReason.LENGTH and case.token_exact:
        assert len(r.output_ids) == request.max_new_tokens
    assert r.text == b.decode(r.output_ids)  # text is the decode of exactly output_ids
    if r.finish is FinishReason.STOP:
        assert request.stop_regex is not None and r.matched is not None
        assert re.fullmatch(request.stop_regex, r.matched)
        assert r.matched in r.text
    else:
        assert r.matched is None
    assert r.weight_version is None or r.weight_version == b.weight_version
    assert isinstance(r.cached_tokens, int) and 0 <= r.cached_tokens <= len(request.input_ids)


def same(a: GenerateResult, b: GenerateResult) -> bool:
    return (a.output_ids, a.text, a.finish, a.matched) == (b.output_ids, b.text, b.finish, b.matched)


def needs(case: BackendUnderTest, capability: str) -> Any:
    value = getattr(case, capability)
    if not value:
        pytest.skip(f"the backend does not declare {capability}")
    return value


# -- the interface ------------------------------------------------------------------------------------------


async def test_is_a_model_backend(backend_case: BackendUnderTest) -> None:
    b = backend_case.backend
    assert isinstance(b, ModelBackend)
    assert isinstance(b.model_id, str) and b.model_id
    assert isinstance(b.weight_version, str) and b.weight_version


async def test_weight_version_of_results_matches_the_backend(backend_case: BackendUnderTest) -> None:
    r = await generate(backend_case, max_new_tokens=4)
    version = backend_case.backend.weight_version
    assert isinstance(version, str) and version
    assert r.weight_version is None or r.weight_version == version


@pytest.mark.parametrize("source", list(WeightSource))
async def test_weights_update_from_declared_sources_only(
    backend_case: BackendUnderTest, source: WeightSource, request: pytest.FixtureRequest
) -> None:
    """A declared source takes the weights and relabels what follows; any other is refused by name."""
    b = backend_case.backend
    if source is WeightSource.MODULE:
        update = WeightUpdate(version="v-module", module=request.getfixturevalue("tiny_qwen2")[0])
    else:
        update = WeightUpdate(version="v-path", path=str(request.getfixturevalue("tiny_model_dir")))
    if source not in b.weight_sources:
        before = b.weight_version
        with pytest.raises(WeightUpdateUnsupported, match=source.value):
            await b.update_weights(update)
        assert b.weight_version == before
        return
    await b.update_weights(update)
    assert b.weight_version == update.version
    r = await generate(backend_case, max_new_tokens=3)
    assert r.weight_version in (None, update.version)


def test_encode_decode_round_trip_of_protocol_text(backend_case: BackendUnderTest) -> None:
    b = backend_case.backend
    for text in ROUND_TRIP:
        ids = b.encode(text)
        assert ids and all(isinstance(i, int) for i in ids)
        assert b.decode(ids) == text
    assert b.encode("") == [] and b.decode([]) == ""


# -- stops --------------------------------------------------------------------------------------------------

PROTOCOL_STOPS = [
    pytest.param(
        ORGANIZER_STOP_REGEX,
        "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think.<JOIN-1>7</JOIN-1>",
        "</FORK-1>",
        id="organizer-fork",
    ),
    pytest.param(
        ORGANIZER_STOP_REGEX, "I wait for the worker now.<JOIN-2>7</JOIN-2> and go on.", "<JOIN-2>", id="organizer-join"
    ),
    pytest.param(
        ORGANIZER_STOP_REGEX, "So the answer is 7.<ANSWER>7</ANSWER> and then more text.", "</ANSWER>", id="answer"
    ),
    pytest.param(
        WORKER_STOP_REGEX,
        "Worker: <FORK-1>not mine</FORK-1> 3+4 is 7.<RETURN>7</RETURN> trailing text",
        "</RETURN>",
        id="worker-return",
    ),
]


@pytest.mark.parametrize(("stop", "script", "expected"), PROTOCOL_STOPS)
async def test_stops_at_the_first_protocol_stop(
    backend_case: BackendUnderTest, stop: str, script: str, expected: str
) -> None:
    needs(backend_case, "set_script")(script)
    b = backend_case.backend
    r = await generate(backend_case, max_new_tokens=64, stop=stop)
    assert r.finish is FinishReason.STOP
    assert r.matched == expected
    m = re.search(stop, r.text)
    assert m is not None and m.group(0) == expected
    end = script.index(expected) + len(expected)
    assert script.startswith(r.text)  # nothing invented, nothing skipped
    assert len(r.text) >= end  # the stop text is kept (the last token may run past it)
    assert not re.search(stop, b.decode(r.output_ids[:-1]))  # it stopped on the token that completed the match


@pytest.mark.parametrize("protocol", [ORGANIZER_STOP_REGEX, WORKER_STOP_REGEX], ids=["organizer", "worker"])
@pytest.mark.parametrize("prompt", [PROMPT, "The answer"])
async def test_stops_at_the_first_match_in_its_own_output(
    backend_case: BackendUnderTest, prompt: str, protocol: str
) -> None:
    """The stop pattern is a protocol pattern or'ed with three characters the unstopped output has past its
    first quarter (so the model backends stop too; the tiny model's greedy output after "The answer" also
    holds a ``</RETURN>``). The stopped request must end exactly where that pattern first matches."""
    needs(backend_case, "deterministic")
    b = backend_case.backend
    free = await generate(backend_case, prompt, max_new_tokens=24)
    ids = free.output_ids
    piece, n0 = None, 0
    for n in range(max(1, len(ids) // 4), len(ids) - 1):
        tail = b.decode(ids[:n])[-3:]
        if len(tail) == 3 and tail.isascii() and tail.isalnum():
            piece, n0 = tail, n
            break
    assert piece is not None, f"no alphanumeric piece in the output {free.text!r}"
    pattern = f"{protocol}|{re.escape(piece)}"
    r = await generate(backend_case, prompt, max_new_tokens=24, stop=pattern)
    assert r.finish is FinishReason.STOP
    if backend_case.token_exact:
        # the shortest prefix of the unstopped output whose decode matches: where the first match completes
        first = next(n for n in range(1, n0 + 1) if re.search(pattern, b.decode(ids[:n])))
        assert r.output_ids == ids[:first]
        m = re.search(pattern, b.decode(ids[:first]))
    else:
        m = re.search(pattern, free.text)
        assert m is not None and r.text == free.text[: m.end()]
    assert m is not None and r.matched == m.group(0)
    assert not re.search(pattern, b.decode(r.output_ids[:-1]))
    if backend_case.token_exact:  # a match on the budget's last token is a stop, not the budget
        tight = await generate(backend_case, prompt, max_new_tokens=len(r.output_ids), stop=pattern)
        assert same(tight, r)


# -- budgets and token accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5])
async def test_max_new_tokens_ends_the_request_with_length(backend_case: BackendUnderTest, k: int) -> None:
    r = await generate(backend_case, max_new_tokens=k)
    assert r.finish is FinishReason.LENGTH
    if backend_case.token_exact:
        assert len(r.output_ids) == k
    longer = await generate(backend_case, max_new_tokens=2 * k + 4)
    if backend_case.token_exact and backend_case.deterministic:
        assert r.output_ids == longer.output_ids[:k]
    if backend_case.deterministic:
        assert longer.text.startswith(r.text)


async def test_output_ids_are_every_id_generated(backend_case: BackendUnderTest) -> None:
    count = needs(backend_case, "tokens_generated")
    before = count()
    a = await generate(backend_case, max_new_tokens=12)
    middle = count()
    b = await generate(backend_case, PROMPTS[1], max_new_tokens=7)
    assert middle - before == len(a.output_ids) == 12
    assert count() - middle == len(b.output_ids) == 7


async def test_a_continuation_continues_instead_of_restarting(backend_case: BackendUnderTest) -> None:
    needs(backend_case, "exact_continuation")
    b = backend_case.backend
    prompt = b.encode(PROMPT)
    whole = await generate(backend_case, prompt, max_new_tokens=12)
    session = _session()
    first = await generate(backend_case, prompt, max_new_tokens=6, session=session)
    rest = await generate(backend_case, prompt + first.output_ids, max_new_tokens=6, session=session)
    assert first.output_ids + rest.output_ids == whole.output_ids
    assert rest.finish is FinishReason.LENGTH


# -- EOS ----------------------------------------------------------------------------------------------------


async def test_eos_ends_the_request(backend_case: BackendUnderTest) -> None:
    """A scripted backend ends its script with EOS; the tiny model ends one of ``EOS_PROMPTS`` with it.
    Where an EOS id comes back it is the last output id, and it adds no text."""
    script = "no tags at all, just text."
    if backend_case.set_script:
        backend_case.set_script(script)
    b = backend_case.backend
    results = [await generate(backend_case, p, max_new_tokens=64, stop=ORGANIZER_STOP_REGEX) for p in EOS_PROMPTS]
    ended = [r for r in results if r.finish is FinishReason.EOS]
    assert ended, f"no prompt ended with EOS: {[r.finish for r in results]}"
    r = ended[0]
    assert r.matched is None
    if backend_case.set_script:
        assert r.text == script
    if backend_case.eos_ids:
        assert r.output_ids[-1] in backend_case.eos_ids
        assert not set(r.output_ids[:-1]) & backend_case.eos_ids
        assert b.decode(r.output_ids[:-1]) == r.text  # the EOS id decodes to nothing
    if backend_case.token_exact:  # EOS on the budget's last token is EOS, not the budget
        prompt = EOS_PROMPTS[results.index(r)]
        tight = await generate(backend_case, prompt, max_new_tokens=len(r.output_ids), stop=ORGANIZER_STOP_REGEX)
        assert same(tight, r)


# -- concurrency --------------------------------------------------------------------------------------------


async def test_concurrent_requests_each_get_their_own_result(backend_case: BackendUnderTest) -> None:
    budgets = [5 + i for i in range(len(PROMPTS))]
    together = await asyncio.gather(
        *(
            generate(backend_case, p, max_new_tokens=n, stop=ORGANIZER_STOP_REGEX)
            for p, n in zip(PROMPTS, budgets, strict=True)
        )
    )
    assert len(together) == 8
    for p, n, r in zip(PROMPTS, budgets, together, strict=True):
        if not backend_case.deterministic:
            continue
        alone = await generate(backend_case, p, max_new_tokens=n, stop=ORGANIZER_STOP_REGEX)
        assert same(r, alone), (p, r, alone)


# -- errors -------------------------------------------------------------------------------------------------


async def test_empty_input_ids_are_refused(backend_case: BackendUnderTest) -> None:
    request = GenerateRequest(input_ids=[], max_new_tokens=4, sampling=GREEDY, session=_session())
    with pytest.raises(ValueError, match="empty"):
        await asyncio.wait_for(backend_case.backend.generate(request), DEADLINE_S)
    await generate(backend_case, max_new_tokens=2)  # and the backend goes on serving


@pytest.mark.parametrize("bad", ["(", "</FORK-[0-9>", "a{2,1}"])
async def test_an_invalid_stop_regex_is_refused(backend_case: BackendUnderTest, bad: str) -> None:
    b = backend_case.backend
    request = GenerateRequest(b.encode(PROMPT), 4, stop_regex=bad, sampling=GREEDY, session=_session())
    with pytest.raises((re.error, ValueError)):
        await asyncio.wait_for(b.generate(request), DEADLINE_S)
    await generate(backend_case, max_new_tokens=2)


async def test_a_closed_backend_refuses_new_work(backend_case: BackendUnderTest) -> None:
    b = backend_case.backend
    await generate(backend_case, max_new_tokens=2)
    await b.aclose()
    request = GenerateRequest(b.encode(PROMPT), 4, sampling=GREEDY, session=_session())
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(b.generate(request), DEADLINE_S)
    await b.aclose()  # closing twice is harmless


@pytest.mark.parametrize("status", [400, 500, 503])
async def test_server_errors_become_the_documented_exceptions(backend_case: BackendUnderTest, status: int) -> None:
    fail_next = needs(backend_case, "fail_next")
    b = backend_case.backend
    expected = backend_case.request_error if status < 500 else backend_case.server_error
    assert expected is not None
    request = GenerateRequest(b.encode(PROMPT), 4, sampling=GREEDY, session=_session())
    fail_next(status, request)
    with pytest.raises(expected, match=str(status)):
        await asyncio.wait_for(b.generate(request), DEADLINE_S)
    r = await asyncio.wait_for(b.generate(request), DEADLINE_S)  # the next request is served
    assert r.finish is FinishReason.LENGTH
