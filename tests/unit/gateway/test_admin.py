"""The gateway's admin routes (``/v1/admin``): versions read from the store, commands answered by the
trainer service over the bus (a 504 when no trainer answers), promote and rollback swapping the fleet."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from shared.backends.base import WeightSource, WeightUpdate
from shared.bus.inprocess import InProcessBus
from shared.store import db
from shared.store import versions as registry
from shared.weights import content_hash, initial_label
from tests.unit.gateway.conftest import GatewayFactory, settings_for


class Fleet:
    """The serving fleet, as far as the trainer sees it: one backend that records its loads."""

    model_id = "base"
    weight_sources = frozenset({WeightSource.PATH})

    def __init__(self, version: str) -> None:
        self.weight_version = version

    async def update_weights(self, update: WeightUpdate) -> None:
        self.weight_version = update.version


async def test_admin_routes_read_versions_and_drive_the_trainer(
    make_gateway: GatewayFactory, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from trainer.service import LocalPublisher, TrainerService, TrainerServiceConfig

    bus = InProcessBus()
    gateway = await make_gateway(bus=bus)  # migrates the SQLite file
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    engine = db.make_engine(settings_for(tmp_path).database_url)
    factory = db.session_factory(engine)
    init = initial_label(base)
    fleet = Fleet(init)
    config = TrainerServiceConfig(base_model=base, out=tmp_path / "out", eval_problems=1, metrics_port=0)
    trainer = TrainerService(config, bus=bus, session_factory=factory, publisher=LocalPublisher([fleet]))
    await trainer.start()
    with factory() as s:
        registry.register(s, model_id="base", version="sft-c0001-abc", path=str(trained), kind="sft", parent=init,
                          step=1, metrics={"cycle": 1, "content_hash": content_hash(trained),
                                           "gate": {"metric": "accuracy", "delta": 0.1, "passed": True}})  # fmt: skip
    c = gateway.client

    r = await c.get("/v1/admin/versions")
    assert r.status_code == 200
    rows = r.json()
    assert [row["version"] for row in rows] == [init, "sft-c0001-abc"]
    assert rows[0]["status"] == "serving" and rows[1]["gate"]["delta"] == 0.1
    one = (await c.get("/v1/admin/versions/sft-c0001-abc")).json()
    assert one["parent_version"] == init and one["content_hash"] == content_hash(trained)
    assert [v["version"] for v in (await c.get("/v1/admin/cycles/1")).json()] == ["sft-c0001-abc"]
    assert (await c.get("/v1/admin/cycles/9")).status_code == 404
    assert (await c.get("/v1/admin/versions/nope")).status_code == 404

    # no trainer reads the commands yet: 504, and the answer says why
    r = await c.get("/v1/admin/trainer", params={"timeout_s": 0.3})
    assert r.status_code == 504 and "no trainer service answered" in r.json()["detail"]

    stop = asyncio.Event()
    serving = asyncio.create_task(trainer.serve_commands(stop))
    try:
        r = await c.get("/v1/admin/trainer", params={"timeout_s": 5})
        assert r.status_code == 200 and r.json()["data"]["serving"] == init
        assert (await c.post("/v1/admin/trainer/pause")).json()["data"]["paused"] is True
        assert (await c.post("/v1/admin/trainer/resume")).json()["data"]["paused"] is False
        r = await c.post("/v1/admin/versions/sft-c0001-abc/promote", json={"reason": "looks good"})
        assert r.status_code == 200, r.text
        assert fleet.weight_version == "sft-c0001-abc" and r.json()["data"]["serving"] == "sft-c0001-abc"
        r = await c.post(f"/v1/admin/versions/{init}/rollback")
        assert r.status_code == 200 and fleet.weight_version == init
        r = await c.post("/v1/admin/versions/nope/promote")
        assert r.status_code == 409 and "no version" in r.json()["message"]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)
        engine.dispose()
    with factory() as s:
        events = [e["event"] for e in registry.get_version(s, model_id="base", version="sft-c0001-abc").metrics["events"]]
    assert events == ["registered", "promoted", "rolled_back_away"]


async def test_admin_routes_are_in_the_openapi_schema_under_their_own_tag(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway()
    schema: dict[str, Any] = (await gateway.client.get("/openapi.json")).json()
    admin = {p for p in schema["paths"] if p.startswith("/v1/admin/")}
    assert {"/v1/admin/versions", "/v1/admin/trainer/pause", "/v1/admin/versions/{version}/rollback"} <= admin
    assert schema["paths"]["/v1/admin/versions"]["get"]["tags"] == ["admin"]
