"""Bad input, embedded mode: every request below is a 4xx with a short message, never a 500, never a leak.

Each case reproduces a defect seen on the gateway (issue 13, "Bad input"): the answer must be a 4xx whose
body is short and carries no URL, SQL or stack trace, and a refused request writes no row.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from shared.store.models import Episode, ProblemRow
from tests.unit.gateway.conftest import COUNTDOWN, Gateway, GatewayFactory, settings_for

JSON = {"content-type": "application/json"}
LEAKS = ("sqlite:", "postgresql", "redis://", "INSERT", "SELECT", "Traceback", 'File "', "[SQL")


def rows(gw: Gateway) -> tuple[int, int]:
    """(problems, episodes) stored."""
    with gw.app.state.gateway.session_factory() as s:
        return (
            int(s.scalar(select(func.count()).select_from(ProblemRow)) or 0),
            int(s.scalar(select(func.count()).select_from(Episode)) or 0),
        )


def assert_clean(text: str, *, limit: int = 4000) -> None:
    assert len(text) <= limit, f"{len(text)} characters: {text[:200]}..."
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} in {text[:500]}"


async def post_raw(gw: Gateway, path: str, body: str | bytes) -> Any:
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return await gw.client.post(path, content=data, headers=JSON)


GOOD = '{"task": "countdown", "payload": {"numbers": [3, 7, 25, 50], "target": 75}'


@pytest.mark.parametrize(
    "body",
    [
        GOOD + ', "temperature": NaN}',
        GOOD + ', "worker_timeout_s": Infinity}',
        GOOD + ', "temperature": 1e400}',  # parses to inf
        '{"task": "math", "payload": {"problem": "1+1?", "answer": -1E+999}}',
        '{"task": "countdown", "payload": {"numbers": [3, 7, 25, 50], "target": -Infinity}}',
        '{"task": "math", "payload": {"problem": "1+1?", "answer": NaN}}',
    ],
)
async def test_nan_and_infinity_are_422_not_500(gateway: Gateway, body: str) -> None:
    r = await post_raw(gateway, "/v1/problems", body)
    assert r.status_code == 422, r.text
    assert "finite" in r.text
    assert_clean(r.text)
    assert rows(gateway) == (0, 0)


async def test_nan_on_the_chat_route_is_400_in_openai_shape(gateway: Gateway) -> None:
    body = '{"model": "asyncthink", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    r = await post_raw(gateway, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert rows(gateway) == (0, 0)


@pytest.mark.parametrize(
    "fragment",
    [
        ', "problem_id": "\\ud800"',  # a lone surrogate
        ', "problem_id": "a\\u0000b"',  # a NUL character
        ', "problem_id": "\\udfff"',
    ],
)
async def test_surrogates_and_nul_in_problem_id_are_422(gateway: Gateway, fragment: str) -> None:
    r = await post_raw(gateway, "/v1/problems", GOOD + fragment + "}")
    assert r.status_code == 422, r.text
    assert_clean(r.text)
    assert rows(gateway) == (0, 0)


@pytest.mark.parametrize(
    "payload",
    [
        '{"problem": "what is \\ud800?"}',
        '{"problem": "what is \\u0000?"}',
        '{"problem": "ok", "answer": "\\udc80"}',
    ],
)
async def test_surrogates_and_nul_in_the_payload_are_422(gateway: Gateway, payload: str) -> None:
    r = await post_raw(gateway, "/v1/problems", '{"task": "math", "payload": ' + payload + "}")
    assert r.status_code == 422, r.text
    assert_clean(r.text)
    assert rows(gateway) == (0, 0)


async def test_a_valid_surrogate_pair_is_fine(gateway: Gateway) -> None:
    r = await post_raw(gateway, "/v1/problems", '{"task": "math", "payload": {"problem": "\\ud83d\\ude00 + 1?"}}')
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    "params",
    [
        {"offset": str(2**63)},
        {"offset": str(2**31)},
        {"limit": str(2**63)},
        {"model_version": "v\x00"},
        {"model_version": "x" * 300},
    ],
)
async def test_list_query_out_of_range_or_with_nul_is_422(gateway: Gateway, params: dict[str, str]) -> None:
    r = await gateway.client.get("/v1/episodes", params=params)
    assert r.status_code == 422, r.text
    assert_clean(r.text)


async def test_nul_in_path_is_4xx(gateway: Gateway) -> None:
    r = await gateway.client.get("/v1/episodes/a%00b")
    assert 400 <= r.status_code < 500, r.text
    assert_clean(r.text)
    r = await gateway.client.get("/v1/episodes/" + "x" * 5000)
    assert 400 <= r.status_code < 500
    assert_clean(r.text)


@pytest.mark.parametrize(
    "entry", ["99999999999999999999999-0", "1-99999999999999999999999", "18446744073709551616", "1" * 200]
)
async def test_out_of_range_last_event_id_is_422(gateway: Gateway, entry: str) -> None:
    eid = await gateway.submit()
    await gateway.wait(eid)
    r = await gateway.client.get(f"/v1/episodes/{eid}/events", headers={"Last-Event-ID": entry})
    assert r.status_code == 422, r.text
    assert_clean(r.text)
    r = await gateway.client.get(f"/v1/episodes/{eid}/events", params={"after": entry})
    assert r.status_code == 422, r.text
    # the largest valid id is still accepted
    r = await gateway.client.get(
        f"/v1/episodes/{eid}/events", params={"after": f"{2**64 - 1}-{2**64 - 1}"}
    )
    assert r.status_code == 204, r.text


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"numbers": [3, 7, 25, 50], "target": -75}, "target"),
        ({"numbers": [3, 7, 25, 50], "target": int("9" * 400)}, "target"),
        ({"numbers": [int("9" * 4000), 7, 25, 50], "target": 75}, "numbers"),
        ({"numbers": [0, 7, 25, 50], "target": 75}, "numbers"),
        ({"numbers": [10_001, 7], "target": 75}, "numbers"),
        ({"numbers": list(range(1, 10)), "target": 75}, "numbers"),
        ({"numbers": [3, 7, 25, 50], "target": 75, "n_solutions": 10**6}, "n_solutions"),
    ],
)
async def test_countdown_payload_bounds(gateway: Gateway, payload: dict[str, Any], says: str) -> None:
    r = await gateway.client.post("/v1/problems", json={"task": "countdown", "payload": payload})
    assert r.status_code == 422, r.text
    assert says in r.text
    assert_clean(r.text)
    assert rows(gateway) == (0, 0)


@pytest.mark.parametrize(
    "body",
    [
        {"task": "sudoku", "payload": {"puzzle": "1" + " " * 100_000 + "2.3....2..4.2..."}},
        {"task": "math", "payload": {"problem": "x" * 100_000}},
        {"task": "math", "payload": {"problem": "1+1?", "answer": "9" * 10_000}},
    ],
)
async def test_sudoku_and_math_payloads_are_bounded(gateway: Gateway, body: dict[str, Any]) -> None:
    r = await gateway.client.post("/v1/problems", json=body)
    assert r.status_code == 422, r.text
    assert_clean(r.text)
    assert rows(gateway) == (0, 0)


async def test_validation_errors_do_not_echo_the_whole_input(gateway: Gateway) -> None:
    big = "y" * 200_000
    for body in (
        {"task": "countdown", "payload": COUNTDOWN, "capcity": big},
        {"task": "countdown", "payload": {"numbers": big, "target": 1}},
        {"task": big, "payload": COUNTDOWN},
        {"task": "countdown", "payload": COUNTDOWN, "problem_id": big},
    ):
        r = await gateway.client.post("/v1/problems", json=body)
        assert r.status_code == 422, r.text[:300]
        assert_clean(r.text)
    r = await gateway.client.post(
        "/v1/chat/completions", json={"model": "asyncthink", "messages": [{"role": big}], "n": big}
    )
    assert r.status_code == 400
    assert_clean(r.text)


async def test_body_over_the_limit_is_413_before_parsing(make_gateway: GatewayFactory, tmp_path: Any) -> None:
    gw = await make_gateway(settings=settings_for(tmp_path, max_body_bytes=64 * 1024))
    body = json.dumps({"task": "math", "payload": {"problem": "z" * 100_000}})
    r = await post_raw(gw, "/v1/problems", body)
    assert r.status_code == 413, r.text
    assert "64" in r.json()["detail"] and "KiB" in r.json()["detail"]
    assert_clean(r.text)

    async def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1024

    r = await gw.client.post("/v1/problems", content=chunks(), headers=JSON)
    assert r.status_code == 413, r.text
    r = await post_raw(gw, "/v1/chat/completions", body)
    assert r.status_code == 413 and "error" in r.json()
    assert rows(gw) == (0, 0)


class BrokenSession(Session):
    def commit(self) -> None:
        raise OperationalError(
            "INSERT INTO problems (task, problem_id) VALUES (?, ?)",
            {"task": "countdown"},
            Exception("disk I/O error at sqlite:////secret/path.db"),
        )


async def test_database_errors_are_503_without_url_or_sql(make_gateway: GatewayFactory, tmp_path: Any) -> None:
    from shared.store import make_engine, migrate
    from shared.store.db import session_factory

    url = f"sqlite:///{tmp_path / 'broken.db'}"
    migrate(url)
    factory = session_factory(make_engine(url))
    factory.configure(class_=BrokenSession)
    gw = await make_gateway(session_factory=factory)
    r = await gw.client.post("/v1/problems", json={"task": "countdown", "payload": COUNTDOWN})
    assert r.status_code == 503, r.text
    assert "nothing was queued" in r.json()["detail"]
    assert_clean(r.text, limit=300)
    r = await gw.client.post(
        "/v1/chat/completions",
        json={"model": "asyncthink-countdown", "messages": [{"role": "user", "content": "numbers: 1 2 target: 3"}]},
    )
    assert r.status_code == 503, r.text
    assert_clean(r.text, limit=300)


async def test_readyz_names_no_url(make_gateway: GatewayFactory) -> None:
    from shared.store import make_engine, session_factory

    unreachable = make_engine("postgresql+psycopg://nobody:pw@127.0.0.1:1/asyncthink", connect_timeout=2)
    gw = await make_gateway(session_factory=session_factory(unreachable))
    r = await gw.client.get("/readyz")
    assert r.status_code == 503
    assert_clean(r.text, limit=500)
    assert "127.0.0.1" not in r.text
    unreachable.dispose()


def failing_script(agent: str, prompt: str) -> str:
    raise RuntimeError(
        "ConnectError: POST http://sglang-internal:30000/generate refused (postgresql://u:pw@db/x)"
    )


async def test_stored_errors_reach_clients_without_urls(make_gateway: GatewayFactory) -> None:
    from shared.backends.scripted import ScriptedBackend

    gw = await make_gateway(ScriptedBackend(failing_script))
    eid = await gw.submit()
    episode = await gw.wait(eid)
    assert episode["status"] == "failed" and "ConnectError" in episode["error"]
    assert "://" not in json.dumps(episode)
    r = await gw.client.get(f"/v1/episodes/{eid}/events")
    assert "ConnectError" in r.text and "://" not in r.text
    r = await gw.client.post(
        "/v1/chat/completions",
        json={"model": "asyncthink-countdown", "messages": [{"role": "user", "content": "numbers: 1 2 target: 3"}]},
    )
    assert r.status_code == 502 and "ConnectError" in r.text and "://" not in r.text


@pytest.mark.parametrize("depth", [100, 5_000, 100_000])
@pytest.mark.parametrize("inside", ["1", '"NaN"', '"\\u0000"'])
async def test_deeply_nested_json_is_422(gateway: Gateway, depth: int, inside: str) -> None:
    nested = "[" * depth + inside + "]" * depth
    for path, body in (
        ("/v1/problems", '{"task": "math", "payload": {"problem": "x", "answer": ' + nested + "}}"),
        ("/v1/chat/completions", '{"model": "asyncthink", "messages": [{"role": "user", "content": ' + nested + "}]}"),
    ):
        r = await post_raw(gateway, path, body)
        assert r.status_code in (400, 422), r.text[:300]
        assert "nested" in r.text
        assert_clean(r.text)
    assert rows(gateway) == (0, 0)


async def test_ordinary_nesting_and_brackets_in_strings_are_fine(gateway: Gateway) -> None:
    text = "[" * 5000 + " what is 1+1?"
    r = await gateway.client.post("/v1/problems", json={"task": "math", "payload": {"problem": text[:7000]}})
    assert r.status_code == 202, r.text
