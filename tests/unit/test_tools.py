"""The tool workers: ``python`` arithmetic and the countdown ``verify`` endpoint (shared.tools)."""

from __future__ import annotations

import asyncio

import pytest

from services.workers import tools as service_tools
from services.workers.endpoint import DEFAULT_QUEUES
from shared.messages import WorkerTask
from shared.tools import (
    TOOL_NAMES,
    evaluate_arithmetic,
    local_endpoints,
    parse_verify_query,
    run_tool,
    verified,
    verify_query,
)


def _task(endpoint: str, query: str) -> WorkerTask:
    return WorkerTask(episode_id="e", agent="1", fork_id=1, parent="organizer", task="countdown", query=query,
                      endpoint=endpoint, budget=64)


def test_python_tool() -> None:
    assert evaluate_arithmetic("3*(4+5); 7/2") == ("3*(4+5) = 27; 7/2 = 7/2", None)
    text, error = evaluate_arithmetic("2**3")
    assert error == "tool_error" and "cannot evaluate" in text


@pytest.mark.parametrize(
    ("candidate", "reply"),
    [
        ("50+25", "ok 50+25"),
        ("7*3", "no 7*3: evaluates to 21, not 75"),  # wrong value
        ("25*3*1", "no 25*3*1: uses 1, which is not given"),  # a number not given
        ("25+25+25", "no 25+25+25: uses 25 3 times but it is given once"),  # a number reused
        ("75", "no 75: uses 75, which is not given"),
        ("(50+25)*(7-3-3)", "no (50+25)*(7-3-3): uses 3 2 times but it is given once"),
    ],
)
def test_verify_says_why_a_candidate_fails(candidate: str, reply: str) -> None:
    assert verify_query(f"3 7 25 50 -> 75: {candidate}") == (reply, None)


def test_verify_rules_bare_numbers_padding_and_duplicates() -> None:
    text, error = verify_query("59 78 6 13 -> 59: 59; 59+78-6*13; 78-6-13; 78-(6+13); 13-6+78-13-13")
    assert error is None
    assert text.split("; ") == [
        "no 59: uses fewer than two of the given numbers (a bare number is not a solution)",
        "no 59+78-6*13: is padding around the bare number 59 (a bare number is not a solution)",
        "ok 78-6-13",
        "no 78-(6+13): same as 78-6-13",
        "no 13-6+78-13-13: uses 13 3 times but it is given once",
    ]
    text, _ = verify_query("84 18 2 16 -> 85: 84+18/(2+16); 84+2/(18-16); 18/(16+2)+84")
    assert verified(text) == ["84+18/(2+16)", "84+2/(18-16)"]
    assert text.endswith("no 18/(16+2)+84: same as 84+18/(2+16)")


def test_verify_keeps_an_exact_list_when_the_kept_ones_come_first() -> None:
    first, _ = verify_query("3 7 25 50 -> 75: 50+25; 7*3")
    assert verified(first) == ["50+25"]
    second, _ = verify_query("3 7 25 50 -> 75: 50+25; 25+50; 3*25")
    assert verified(second) == ["50+25", "3*25"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("50+25", "send numbers -> target"),
        ("3 7 25 50 -> 75:", "no candidate"),
        ("3 -> 75: 3*25", "2 to 8 numbers"),
        ("3 7 25 50 -> 75: " + "; ".join(["50+25"] * 17), "at most 16"),
    ],
)
def test_verify_rejects_malformed_queries(query: str, message: str) -> None:
    text, error = verify_query(query)
    assert error == "tool_error" and message in text and text.startswith("[verify: ")


def test_parse_verify_query_accepts_commas_and_newlines() -> None:
    assert parse_verify_query("3, 7,25 50->75:\n50+25\n3*25") == ([3, 7, 25, 50], 75, ["50+25", "3*25"])


def test_every_tool_is_registered_for_the_embedded_organizer_and_the_tool_queue() -> None:
    assert set(TOOL_NAMES) == {"python", "verify"}
    assert service_tools.TOOL_NAMES == TOOL_NAMES and service_tools.run_tool is run_tool
    assert {name: DEFAULT_QUEUES[name] for name in TOOL_NAMES} == {"python": "tool", "verify": "tool"}
    endpoints = local_endpoints()
    assert set(endpoints) == set(TOOL_NAMES)
    outcome = asyncio.run(endpoints["verify"].run(_task("verify", "1 2 3 4 -> 10: 2*3+4")))
    assert outcome.returned == "ok 2*3+4" and outcome.timeline == [] and outcome.error is None
    assert outcome.segments[0].endpoint == "verify" and outcome.segments[0].text == "<RETURN>ok 2*3+4</RETURN>"
    unknown = run_tool(_task("human", "x"))
    assert unknown.error == "unknown_endpoint" and "python, verify" in unknown.returned
