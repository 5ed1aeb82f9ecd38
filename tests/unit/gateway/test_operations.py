"""/healthz, /readyz, /metrics and the OpenAPI schema; the app's configuration checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.app import create_app, served_model_id
from shared.store import make_engine, session_factory
from tests.unit.gateway.conftest import Gateway, GatewayFactory, settings_for


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    assert (await gateway.client.get("/healthz")).json() == {"status": "ok"}
    r = await gateway.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "bus": "ok"}, "failed": []}


async def test_readyz_is_503_naming_the_database(make_gateway: GatewayFactory) -> None:
    unreachable = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/asyncthink", connect_timeout=2)
    gw = await make_gateway(session_factory=session_factory(unreachable))
    r = await gw.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable" and body["failed"] == ["database"]
    # the kind of error only: /readyz answers without a key, so no host, URL or SQL (logged instead)
    assert body["checks"]["database"] == "OperationalError" and body["checks"]["bus"] == "ok"
    # A submission cannot be stored either: 503, and nothing is queued.
    r = await gw.client.post("/v1/problems", json={"task": "math", "payload": {"problem": "1+1?"}})
    assert r.status_code == 503 and "nothing was queued" in r.json()["detail"]
    unreachable.dispose()


async def test_metrics_count_requests_and_submissions(gateway: Gateway) -> None:
    await gateway.submit()
    await gateway.submit(mode="sequential")
    await gateway.client.get("/v1/episodes/missing")
    text = (await gateway.client.get("/metrics")).text
    assert (
        'asyncthink_gateway_episodes_submitted_total{api="problems",mode="asyncthink",task="countdown"} 1.0'
        in text
    )
    assert (
        'asyncthink_gateway_episodes_submitted_total{api="problems",mode="sequential",task="countdown"} 1.0'
        in text
    )
    assert 'asyncthink_gateway_requests_total{method="POST",route="/v1/problems",status="202"} 2.0' in text
    assert 'route="/v1/episodes/{episode_id}",status="404"' in text
    assert 'asyncthink_gateway_request_duration_seconds_count{method="POST",route="/v1/problems"} 2.0' in text


async def test_openapi_schema_describes_the_api(gateway: Gateway) -> None:
    schema = (await gateway.client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/v1/problems",
        "/v1/episodes",
        "/v1/episodes/{episode_id}",
        "/v1/episodes/{episode_id}/events",
        "/v1/chat/completions",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    assert "202" in paths["/v1/problems"]["post"]["responses"]
    assert paths["/v1/problems"]["post"]["description"]
    capacity = schema["components"]["schemas"]["ProblemCreate"]["properties"]["capacity"]
    assert capacity["description"] and "AsyncThink" in schema["info"]["description"]


def test_bad_bus_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ASYNCTHINK_BUS"):
        create_app(settings_for(tmp_path, bus="kafka"))


def test_served_model_id() -> None:
    assert served_model_id("/models/asyncthink-countdown-small") == "asyncthink-countdown-small"
    assert served_model_id("openai:http://host:8000/v1#qwen3-4b") == "qwen3-4b"
    assert served_model_id("openai:http://host:8000/v1#qwen3-4b?tokenizer=/m/tok") == "qwen3-4b"
    assert served_model_id("sglang:http://sglang:30000?tokenizer=/m/tok") == "sglang:http://sglang:30000"


async def test_embedded_default_opens_its_own_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No injected backend: the lifespan opens the service backend, runs the organizer, then closes."""
    import httpx

    from services.runtime import BACKEND_FACTORY_ENV

    monkeypatch.setenv(BACKEND_FACTORY_ENV, "tests.unit.gateway.conftest:scripted_backend_factory")
    app = create_app(settings_for(tmp_path))
    async with app.router.lifespan_context(app):
        state = app.state.gateway
        assert state.embedded and state.model_id == "scripted-from-factory"
        gw = Gateway(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))
        episode = await gw.wait(await gw.submit())
        assert episode["status"] == "completed" and episode["model_id"] == "scripted-from-factory"
        models = (await gw.client.get("/v1/models")).json()["data"]
        assert {m["served_model"] for m in models} == {"scripted-from-factory"}
        await gw.client.aclose()
        organizer = state.organizer_task
    assert organizer is not None and organizer.done() and not organizer.cancelled()


@pytest.mark.slow
async def test_embedded_mode_with_a_real_local_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``asyncthink serve gateway`` on a laptop: a local transformers model, nothing injected.

    The tiny model has random weights, so the episode's content is noise; what is checked is that the
    app opens the model itself, runs the episode to a final, stored status and reports its numbers.
    """
    import httpx

    app = create_app(settings_for(tmp_path, model=str(tiny_model_dir)))
    async with app.router.lifespan_context(app):
        assert app.state.gateway.model_id == tiny_model_dir.name
        gw = Gateway(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))
        eid = await gw.submit(organizer_budget=24, worker_budget=8, temperature=1.0, seed=1)
        episode = await gw.wait(eid, timeout_s=60)
        await gw.client.aclose()
    assert episode["status"] in ("completed", "format_error")
    assert episode["model_id"] == tiny_model_dir.name and episode["latency"] is not None
    organizer = next(s for s in episode["segments"] if s["agent"] == "organizer")
    assert 0 < organizer["generated_tokens"] <= 24
