"""The weight plane over the in-process bus: organizers follow the weights stream, the fleet publisher
swaps SGLang first (against the contract fixture) and collects every process's reply.

* a listener loads each published version and answers; one that cannot load keeps serving its old version
  and says so; a listener that starts after a swap loads the newest published version first;
* ``FleetPublisher``: pause -> update_weights_from_disk -> continue on every SGLang replica, then the
  LoadWeights entry for the organizers (which, on SGLang, read the servers' version back), and the report
  lists who took it; a failed SGLang update stops the publication, and continue was still sent;
* an organizer that sent a heartbeat but does not answer is reported missing.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.control.listener import WeightControlListener
from services.control.publisher import FleetPublisher
from shared.backends.base import WeightSource, WeightUpdate
from shared.bus.inprocess import InProcessBus
from shared.control import LoadWeights, PublishReport, latest_load, publish_model, weights_stream
from shared.tasks.prompts import PromptStyle
from shared.weights import content_hash
from tests.fakes.sglang import FakeSGLang
from tests.fakes.tokenizer import build_tokenizer_dir


class Local:
    """A backend with its own weights that only records what it loads (fails on paths with 'broken')."""

    model_id = "m"
    weight_sources = frozenset({WeightSource.PATH})

    def __init__(self, version: str = "v1") -> None:
        self.weight_version = version
        self.loaded: list[str] = []

    async def update_weights(self, update: WeightUpdate) -> None:
        if "broken" in str(update.path):
            raise OSError(f"cannot read {update.path}")
        self.loaded.append(update.version)
        self.weight_version = update.version


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def _until_present(publisher: FleetPublisher, processes: set[str], timeout: float = 5.0) -> None:
    """Wait until the listeners named have sent a heartbeat the publisher sees."""
    for _ in range(int(timeout / 0.01)):
        if await publisher.present_organizers() == processes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{processes} never present: {await publisher.present_organizers()}")


async def test_a_listener_loads_published_versions_and_reports_failures() -> None:
    bus = InProcessBus()
    backend = Local()
    listener = WeightControlListener(bus, backend, process="org-1", block_ms=50)
    listener.start()
    try:
        await publish_model(bus, weights_stream(), LoadWeights(version="v2", path="/ckpt/v2"))
        await _until(lambda: backend.weight_version == "v2")
        await _until(lambda: len(listener.replies) == 1)
        assert listener.replies[-1].ok and listener.replies[-1].previous == "v1"
        await publish_model(bus, weights_stream(), LoadWeights(version="v3", path="/ckpt/broken"))
        await _until(lambda: len(listener.replies) == 2)
        failed = listener.replies[-1]
        assert not failed.ok and "cannot read" in (failed.error or "") and failed.version == "v2"
        assert backend.weight_version == "v2"  # keeps serving the old version
    finally:
        await listener.close()


async def test_a_listener_that_starts_after_a_swap_loads_the_newest_version_first() -> None:
    bus = InProcessBus()
    await publish_model(bus, weights_stream(), LoadWeights(version="v2", path="/ckpt/v2"))
    await publish_model(bus, weights_stream(), LoadWeights(version="v3", path="/ckpt/v3"))
    backend = Local()
    listener = WeightControlListener(bus, backend, process="late")
    reply = await listener.converge()
    assert reply is not None and reply.ok and backend.loaded == ["v3"]  # the newest, not the history
    assert (await latest_load(bus))[1].version == "v3"  # type: ignore[union-attr]


async def test_a_listener_refuses_a_checkpoint_whose_hash_differs(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    digest = content_hash(ckpt)
    bus = InProcessBus()
    backend = Local()
    listener = WeightControlListener(bus, backend, process="org")
    (ckpt / "model.safetensors").write_bytes(b"not the weights")
    await publish_model(bus, weights_stream(), LoadWeights(version="v2", path=str(ckpt), content_hash=digest))
    reply = await listener.converge()
    assert reply is not None and not reply.ok and "does not hold version v2" in (reply.error or "")
    assert backend.weight_version == "v1"


# -------------------------------------------------------------------------------------------- SGLang fleet
@pytest.fixture
async def sglang_fleet(tmp_path: Path) -> Any:
    from transformers import AutoTokenizer

    from shared.backends.sglang import SGLangBackend

    tok_dir = build_tokenizer_dir(tmp_path / "served")
    fake = FakeSGLang(AutoTokenizer.from_pretrained(str(tok_dir)), ["r1", "r2"])
    transport = httpx.ASGITransport(app=fake.app)
    urls = ["http://r1:30000", "http://r2:30000"]

    def client() -> SGLangBackend:
        return SGLangBackend(urls, tok_dir, transport=transport, prompt_style=PromptStyle.TRAINED)

    trainer_client, organizer_client = client(), client()
    yield fake, trainer_client, organizer_client
    await trainer_client.aclose()
    await organizer_client.aclose()


async def test_fleet_publisher_swaps_sglang_then_the_organizers_read_the_version(sglang_fleet: Any) -> None:
    fake, trainer_client, organizer_client = sglang_fleet
    bus = InProcessBus()
    listener = WeightControlListener(bus, organizer_client, process="org-1", block_ms=50)
    listener.start()
    try:
        publisher = FleetPublisher(bus=bus, sglang=trainer_client, timeout_s=5, pause_mode="retract")
        await _until_present(publisher, {"org-1"})  # the listener sends its first heartbeat
        report: PublishReport = await publisher.publish(LoadWeights(version="v2", path="/ckpt/v2"))
        assert report.ok, report.summary()
        by_kind = {(r.kind, r.process): r for r in report.replies}
        assert by_kind[("sglang", "http://r1:30000")].ok and by_kind[("sglang", "http://r2:30000")].ok
        assert by_kind[("organizer", "org-1")].version == "v2"
        assert organizer_client.weight_version == "v2"
        for host in ("r1", "r2"):
            paths = [p for _, p, _ in fake.replica(host).calls if p != "/model_info"]
            assert paths == ["/pause_generation", "/update_weights_from_disk", "/continue_generation"]
            assert fake.replica(host).weight_version == "v2"

        # a failed update on the first replica: continue still sent, nothing published to the organizers
        failed = await publisher.publish(LoadWeights(version="v3", path="/ckpt/missing"))
        assert not failed.ok and [r.ok for r in failed.replies] == [False, False]
        assert "repository not found" in (failed.replies[0].error or "")
        assert failed.replies[1].error == "not attempted"
        r1 = fake.replica("r1")
        assert [p for _, p, _ in r1.calls][-1] == "/continue_generation" and r1.paused is None
        assert (await latest_load(bus))[1].version == "v2"  # type: ignore[union-attr]
        assert organizer_client.weight_version == "v2"
    finally:
        await listener.close()


async def test_an_organizer_that_does_not_answer_is_missing() -> None:
    bus = InProcessBus()
    backend = Local()
    listener = WeightControlListener(bus, backend, process="org-gone", block_ms=50)
    listener.start()
    local = Local()
    publisher = FleetPublisher(bus=bus, local=[local], timeout_s=0.5)
    await _until_present(publisher, {"org-gone"})
    await listener.close()  # it sent a heartbeat, then died
    report = await publisher.publish(LoadWeights(version="v2", path="/ckpt/v2"))
    assert not report.ok and report.missing == ["org-gone"]
    assert [r.kind for r in report.replies] == ["local"] and local.weight_version == "v2"
