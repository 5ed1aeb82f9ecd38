"""API keys: every route but /healthz and /readyz behind a key, scopes, ownership, rate limits, modes."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError
from sqlalchemy import select, text

from services.gateway.app import create_app
from services.gateway.ratelimit import MemoryRateLimiter
from shared.auth import Scope, hash_key
from shared.backends.scripted import ScriptedBackend
from shared.config import InsecureSettings, Settings
from shared.store import repository
from shared.store.models import ApiKey
from tests.unit.gateway.conftest import COUNTDOWN, Gateway, GatewayFactory, script, settings_for

ADMIN = "admin-" + "a" * 40
PUBLIC = {"/healthz", "/readyz"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def keyed(make_gateway: GatewayFactory, tmp_path: Path, **overrides: Any) -> Gateway:
    values: dict[str, Any] = {"auth": "keys", "admin_key": ADMIN}
    values.update(overrides)
    return await make_gateway(settings=settings_for(tmp_path, **values))


def new_key(gw: Gateway, *scopes: Scope, rate_limit: int | None = None, name: str = "k") -> str:
    with gw.app.state.gateway.session_factory() as s:
        _, plaintext = repository.create_api_key(s, name=name, scopes=list(scopes), rate_limit_per_minute=rate_limit)
    return plaintext


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_route_but_health_needs_a_key(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path)
    seen = set()
    schema = gw.app.openapi()  # every API route (the app's own routes are lazily included routers)
    routes = [(m.upper(), path) for path, ops in schema["paths"].items() for m in ops]
    routes += [("GET", path) for path in ("/openapi.json", "/docs", "/redoc")]
    for method, path in routes:
        seen.add(path)
        r = await gw.client.request(method, concrete(path), json={} if method == "POST" else None)
        if path in PUBLIC:
            assert r.status_code in (200, 503), (path, r.status_code)
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer", path
    assert {"/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/chat/completions"} <= seen
    assert {"/v1/episodes/{episode_id}/events", "/v1/problems", "/v1/episodes"} <= seen


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"X-API-Key": "garbage"},
        {"Authorization": f"Bearer {ADMIN}x"},
        {"Authorization": "Bearer atk_000000000000_" + "A" * 43},
        {"Authorization": "Bearer " + "atk_" + "x" * 5000},
    ],
)
async def test_bad_keys_are_401(make_gateway: GatewayFactory, tmp_path: Path, headers: dict[str, str]) -> None:
    gw = await keyed(make_gateway, tmp_path)
    for path in ("/v1/episodes", "/metrics", "/openapi.json"):
        r = await gw.client.get(path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert len(r.text) < 300


async def test_keys_by_bearer_or_x_api_key_and_the_bootstrap_admin(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path)
    key = new_key(gw, Scope.SUBMIT, Scope.READ)
    assert key.startswith("atk_")
    for headers in (auth(key), {"X-API-Key": key}, auth(ADMIN), {"X-API-Key": ADMIN}):
        r = await gw.client.get("/v1/episodes", headers=headers)
        assert r.status_code == 200, r.text
    assert (await gw.client.get("/metrics", headers=auth(ADMIN))).status_code == 200
    assert (await gw.client.get("/openapi.json", headers=auth(key))).status_code == 200
    assert (await gw.client.get("/docs", headers=auth(key))).status_code == 200
    # the stored row holds a hash of the key, never the key
    with gw.app.state.gateway.session_factory() as s:
        (row,) = s.scalars(select(ApiKey)).all()
        assert row.key_hash == hash_key(key) and key not in str(s.execute(text("SELECT * FROM api_keys")).all())


async def test_a_revoked_key_is_401(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path, auth_cache_s=0)
    key = new_key(gw, Scope.READ)
    assert (await gw.client.get("/v1/episodes", headers=auth(key))).status_code == 200
    key_id = key.split("_")[1]
    with gw.app.state.gateway.session_factory() as s:
        assert repository.revoke_api_key(s, key_id=key_id) is True
    r = await gw.client.get("/v1/episodes", headers=auth(key))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_a_key_lacking_the_scope_is_403(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path)
    reader, submitter, human = new_key(gw, Scope.READ), new_key(gw, Scope.SUBMIT), new_key(gw, Scope.HUMAN)
    body = {"task": "countdown", "payload": COUNTDOWN}
    r = await gw.client.post("/v1/problems", json=body, headers=auth(reader))
    assert r.status_code == 403 and "submit" in r.json()["detail"]
    assert (await gw.client.get("/v1/episodes", headers=auth(submitter))).status_code == 403
    assert (await gw.client.get("/metrics", headers=auth(reader))).status_code == 403
    chat = {"model": "asyncthink", "messages": [{"role": "user", "content": "hi"}]}
    r = await gw.client.post("/v1/chat/completions", json=chat, headers=auth(reader))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    for path in ("/v1/episodes", "/v1/models"):
        assert (await gw.client.get(path, headers=auth(human))).status_code == 403
    assert (await gw.client.post("/v1/problems", json=body, headers=auth(submitter))).status_code == 202
    assert (await gw.client.get("/v1/models", headers=auth(submitter))).status_code == 200


async def test_episodes_are_visible_only_to_their_key(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path)
    alice, bob = new_key(gw, Scope.SUBMIT, Scope.READ), new_key(gw, Scope.SUBMIT, Scope.READ)
    body = {"task": "countdown", "payload": COUNTDOWN}
    mine = (await gw.client.post("/v1/problems", json=body, headers=auth(alice))).json()["episode_id"]
    theirs = (await gw.client.post("/v1/problems", json=body, headers=auth(bob))).json()["episode_id"]
    gw.client.headers.update(auth(ADMIN))
    await gw.wait(mine)
    await gw.wait(theirs)
    gw.client.headers.pop("Authorization")

    r = await gw.client.get(f"/v1/episodes/{mine}", headers=auth(alice))
    assert r.status_code == 200
    missing = await gw.client.get("/v1/episodes/nope", headers=auth(bob))
    for path in (f"/v1/episodes/{mine}", f"/v1/episodes/{mine}/events"):
        r = await gw.client.get(path, headers=auth(bob))
        assert r.status_code == 404, r.text  # 404, not 403: another key's episode does not exist for you
        assert r.json()["detail"].replace(mine, "nope") == missing.json()["detail"]
    listing = (await gw.client.get("/v1/episodes", headers=auth(bob))).json()
    assert [i["id"] for i in listing["items"]] == [theirs] and listing["total"] == 1
    everything = (await gw.client.get("/v1/episodes", headers=auth(ADMIN))).json()
    assert {i["id"] for i in everything["items"]} == {mine, theirs}
    assert (await gw.client.get(f"/v1/episodes/{theirs}", headers=auth(ADMIN))).status_code == 200
    with gw.app.state.gateway.session_factory() as s:
        assert repository.get_episode(s, mine).api_key_id == alice.split("_")[1]  # type: ignore[union-attr]


async def test_rate_limits_are_per_key_with_retry_after(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path)
    slow, other = new_key(gw, Scope.READ, rate_limit=3), new_key(gw, Scope.READ)
    codes = [(await gw.client.get("/v1/episodes", headers=auth(slow))).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = await gw.client.get("/v1/episodes", headers=auth(slow))
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 20
    assert "rate limit" in r.json()["detail"] and "3" in r.json()["detail"]
    assert (await gw.client.get("/v1/episodes", headers=auth(other))).status_code == 200
    chat = {"model": "asyncthink", "messages": [{"role": "user", "content": "hi"}]}
    r = await gw.client.post("/v1/chat/completions", json=chat, headers=auth(slow))
    assert r.status_code in (403, 429)


async def test_the_default_rate_limit_comes_from_the_settings(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await keyed(make_gateway, tmp_path, rate_limit_per_minute=2)
    key = new_key(gw, Scope.READ)
    codes = [(await gw.client.get("/v1/episodes", headers=auth(key))).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


async def test_memory_token_bucket_refills() -> None:
    now = [0.0]
    limiter = MemoryRateLimiter(clock=lambda: now[0])
    assert [await limiter.acquire("k", per_minute=60) for _ in range(60)] == [0.0] * 60
    wait = await limiter.acquire("k", per_minute=60)
    assert wait == pytest.approx(1.0)
    now[0] += 1.0
    assert await limiter.acquire("k", per_minute=60) == 0.0
    assert await limiter.acquire("other", per_minute=60) == 0.0
    assert await limiter.acquire("k", per_minute=0) == 0.0  # 0: no limit


def test_the_openai_client_sends_its_key(make_live_server: Any, tmp_path: Path) -> None:
    base = make_live_server(ScriptedBackend(script), settings=settings_for(tmp_path, auth="keys", admin_key=ADMIN))
    ok = openai.OpenAI(base_url=f"{base}/v1", api_key=ADMIN, max_retries=0, timeout=30)
    assert "asyncthink" in {m.id for m in ok.models.list()}
    reply = ok.chat.completions.create(
        model="asyncthink-countdown", messages=[{"role": "user", "content": "numbers: 3 7 25 50 target: 75"}]
    )
    assert reply.choices[0].message.content
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="garbage", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ----------------------------------------------------------------------------- modes
def test_auth_modes() -> None:
    dev = Settings(auth="auto")
    assert dev.requires_keys("127.0.0.1") is False and dev.requires_keys("::1") is False
    assert dev.requires_keys("localhost") is False
    assert dev.requires_keys("0.0.0.0") is True and dev.requires_keys("192.0.2.7") is True
    assert Settings(auth="keys").requires_keys("127.0.0.1") is True
    prod = Settings(environment="production")
    assert prod.requires_keys("127.0.0.1") is True and prod.requires_keys(None) is True
    with pytest.raises(InsecureSettings, match=r"127\.0\.0\.1.*ASYNCTHINK_AUTH=keys"):
        Settings(auth="off").requires_keys("0.0.0.0")
    assert Settings(auth="off").requires_keys("127.0.0.1") is False
    with pytest.raises(ValidationError, match="production"):
        Settings(environment="production", auth="off")
    with pytest.raises(ValidationError, match="32 characters"):
        Settings(admin_key="short")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(admin_key="change-me-to-a-long-random-string-please")
    assert "a" * 40 not in repr(Settings(admin_key="a" * 40))


def test_binding_another_interface_without_keys_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(InsecureSettings) as err:
        create_app(settings_for(tmp_path, auth="off"), bind_host="0.0.0.0")
    message = str(err.value)
    assert "--host 127.0.0.1" in message and "ASYNCTHINK_AUTH=keys" in message and "keys create" in message
    app = create_app(settings_for(tmp_path), bind_host="0.0.0.0")  # auto: keys required
    assert app.state.require_keys is True
    assert create_app(settings_for(tmp_path), bind_host="127.0.0.1").state.require_keys is False


async def test_open_mode_answers_only_on_loopback(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await make_gateway(settings=settings_for(tmp_path, auth="off"))
    assert (await gw.client.get("/v1/episodes")).status_code == 200
    scope_server = gw.client.base_url
    assert scope_server.host == "gateway"

    async def via(server: tuple[str, int]) -> int:
        status = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": "/v1/episodes", "raw_path": b"/v1/episodes", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"x")], "client": ("198.51.100.1", 5000), "server": server,
        }  # fmt: skip
        await gw.app(scope, receive, send)
        return status[0]

    assert await via(("127.0.0.1", 8000)) == 200
    assert await via(("198.51.100.2", 8000)) == 403
    await asyncio.sleep(0)
