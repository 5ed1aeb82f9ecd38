"""The trainer service end to end on the CPU, embedded: a real organizer service on the in-process bus, a
migrated SQLite store, the tiny model in the in-process transformers backend, and the trainer swapping
that very backend (``LocalPublisher``).

* SFT: episodes stored -> one cycle -> a new version in ``model_versions`` (parent, data window, gate,
  content hash) -> hot-swapped -> the next episodes carry the new version, traceable to the checkpoint;
* a gate failure leaves the serving version in place;
* a failed check after the swap rolls back automatically, and an operator rollback restores the previous
  weights bit for bit;
* a process that cannot load the version keeps serving the old one, and the others are sent back;
* GRPO: the service submits G episodes per problem through the problems stream and trains on their group
  advantages (a backend that answers right or wrong by its sampling seed gives the groups a signal).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.backends.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    WeightSource,
    WeightUpdate,
    check_source,
    render_chat,
)
from shared.control import TrainerCommand
from shared.episode import EpisodeSettings
from shared.store import versions as registry
from shared.tasks import get_task
from shared.tasks.base import Mode
from shared.tasks.prompts import PromptStyle
from shared.weights import content_hash, initial_label

pytestmark = pytest.mark.timeout(600)

TINY_EPISODES = EpisodeSettings(organizer_budget=24, worker_budget=12, temperature=1.0)


@dataclass
class Loop:
    base: Path
    backend: Any
    service: Any  # OrganizerService
    trainer: Any  # TrainerService
    session_factory: Any
    bus: Any

    async def episodes(self, n: int, *, settings: EpisodeSettings = TINY_EPISODES) -> list[Any]:
        """``n`` countdown training problems run through the serving path; their stored episodes."""
        problems = get_task("countdown").problems("test", 400)[-n:]  # not in the gate's held-out head
        ids = await self.trainer.submit([(p, settings.model_copy(update={"seed": k})) for k, p in enumerate(problems)],
                                        purpose="user")  # fmt: skip
        got = await self.trainer.wait_finished(ids, 120)
        assert len(got) == n
        return [got[i] for i in ids]


def state_of(backend: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(tmp: Path, base: Path, **kw: Any) -> Any:
    from trainer.service.config import TrainerServiceConfig

    values: dict[str, Any] = dict(
        method="sft", task="countdown", base_model=base, out=tmp / "trainer", min_episodes=3, max_episodes=6,
        min_accuracy=0.0, allow_format_errors=True, eval_problems=2, post_swap_problems=1, lr=1e-2,
        episode=TINY_EPISODES, metrics_port=0, gate_tolerance=0.02, post_swap_tolerance=1.0,
        episode_timeout_s=120, pool_size=2, problems_per_cycle=2, group_size=2,
    )  # fmt: skip
    values.update(kw)
    return TrainerServiceConfig(**values)


@pytest.fixture
async def make_loop(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[Any]:
    from services.organizer.service import OrganizerService
    from services.workers.tools import local_endpoints
    from shared.backends.transformers_backend import TransformersBackend
    from shared.bus.inprocess import InProcessBus
    from shared.store import db
    from trainer.service import LocalPublisher, TrainerMetrics, TrainerService

    made: list[tuple[asyncio.Event, asyncio.Task[None], Any, Any]] = []

    async def make(backend: Any = None, publisher_backends: Any = None, **kw: Any) -> Loop:
        """``backend``: the serving backend (default: the transformers backend on the base model);
        ``publisher_backends(backend)``: what the trainer swaps (default: that backend alone)."""
        base = tmp_path / "base-model"
        if not base.exists():
            shutil.copytree(tiny_model_dir, base)
        url = f"sqlite:///{tmp_path / 'store.db'}"
        db.migrate(url)
        engine = db.make_engine(url)
        factory = db.session_factory(engine)
        bus = InProcessBus()
        if backend is None:
            backend = TransformersBackend(base)
        service = OrganizerService(bus, factory, backend, endpoints=local_endpoints(), consumer_name="o1",
                                   read_block_ms=50, shutdown_grace_s=2)  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(service.run_forever(stop))
        publisher = LocalPublisher(publisher_backends(backend) if publisher_backends is not None else [backend])
        trainer = TrainerService(_config(tmp_path, base, **kw), bus=bus, session_factory=factory,
                                 publisher=publisher, metrics=TrainerMetrics())  # fmt: skip
        made.append((stop, task, backend, engine))
        await trainer.start()
        return Loop(base, backend, service, trainer, factory, bus)

    yield make
    for stop, task, backend, engine in made:
        stop.set()
        await asyncio.wait_for(task, 30)
        await backend.aclose()
        engine.dispose()


async def test_stored_episodes_one_cycle_new_version_hot_swap_next_episodes_carry_it(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    init = initial_label(loop.base)
    assert loop.backend.weight_version == init
    before = state_of(loop.backend)
    stored = await loop.episodes(4)
    assert {e.model_version for e in stored} == {init}

    report = await loop.trainer.run_cycle()
    assert report["outcome"] == "published", report
    version = report["version"]
    assert version.startswith("sft-c0001-") and loop.backend.weight_version == version
    assert not same_weights(before, state_of(loop.backend))
    assert report["post_swap"]["passed"] and report["post_swap"]["wrong_versions"] == {}

    # the registry: a row with its parent, data window, gate, content hash; it serves now
    with loop.session_factory() as s:
        row = registry.get_version(s, model_id="base-model", version=version)
        assert row is not None and row.parent_version == init and row.kind == "sft"
        m = row.metrics
        assert m["status"] == "serving" and m["content_hash"] == content_hash(row.path)
        assert version.endswith(m["content_hash"][:8])
        assert m["data_window"]["used"] == 4 and set(m["data_window"]["episode_ids"]) == {e.id for e in stored}
        assert m["gate"]["passed"] and m["gate"]["metric"] == "accuracy"
        assert m["train"]["sequences"] >= 4 and m["train"]["trained_tokens"] > 0
        assert m["train"]["nll_after"] < m["train"]["nll_before"]  # it learnt its own traces
        assert registry.serving_version(s, model_id="base-model").version == version
        assert registry.get_version(s, model_id="base-model", version=init).metrics["status"] == "published"

    # the next episodes carry the new version, down to every segment, and lead back to the checkpoint
    after = await loop.episodes(2)
    for ep in after:
        assert ep.model_version == version
        assert {seg.model_version for seg in ep.segments} == {version}
    with loop.session_factory() as s:
        row = registry.find_version(s, version=after[0].segments[0].model_version)
        assert row is not None and content_hash(row.path) == row.metrics["content_hash"]

    # the trainer's own metrics
    text = loop.trainer.metrics.render().decode()
    assert 'asyncthink_trainer_cycles_total{outcome="published"} 1.0' in text
    assert "asyncthink_trainer_episodes_consumed_total 4.0" in text
    assert f'asyncthink_trainer_serving{{version="{version}"}} 1.0' in text


async def test_a_gate_failure_leaves_the_serving_version_in_place(make_loop: Any) -> None:
    loop: Loop = await make_loop(gate_tolerance=-1.0)  # demand an improvement of a whole point
    init = loop.backend.weight_version
    before = state_of(loop.backend)
    await loop.episodes(3)
    report = await loop.trainer.run_cycle()
    assert report["outcome"] == "rejected" and not report["gate"]["passed"]
    assert loop.backend.weight_version == init and same_weights(before, state_of(loop.backend))
    with loop.session_factory() as s:
        assert registry.serving_version(s, model_id="base-model").version == init
        row = registry.get_version(s, model_id="base-model", version=report["version"])
        assert row.metrics["status"] == "rejected"
        assert [e["event"] for e in row.metrics["events"]][-1] == "gate_failed"
    # nothing left to train on until new episodes come
    assert (await loop.trainer.run_cycle())["outcome"] == "no_data"


async def test_a_failed_check_after_the_swap_rolls_back_bit_for_bit(make_loop: Any) -> None:
    loop: Loop = await make_loop(post_swap_tolerance=-1.0)  # the check after the swap cannot pass
    init = loop.backend.weight_version
    before = state_of(loop.backend)
    await loop.episodes(3)
    report = await loop.trainer.run_cycle()
    assert report["outcome"] == "rolled_back", report
    assert "below the candidate's offline" in report["post_swap"]["why"]
    assert loop.backend.weight_version == init
    assert same_weights(before, state_of(loop.backend))  # the initial weights, bit for bit
    with loop.session_factory() as s:
        assert registry.serving_version(s, model_id="base-model").version == init
        row = registry.get_version(s, model_id="base-model", version=report["version"])
        assert row.metrics["status"] == "rolled_back"
        events = [e["event"] for e in registry.get_version(s, model_id="base-model", version=init).metrics["events"]]
        assert events[-1] == "rolled_back"


async def test_operator_promote_and_rollback_restore_weights_bit_for_bit(make_loop: Any) -> None:
    loop: Loop = await make_loop()
    init = loop.backend.weight_version
    initial = state_of(loop.backend)
    await loop.episodes(3)
    first = await loop.trainer.run_cycle()
    assert first["outcome"] == "published"
    trained = state_of(loop.backend)
    reply = await loop.trainer.handle(TrainerCommand(op="rollback", version=init))
    assert reply.ok and reply.data["serving"] == init, reply.message
    assert loop.backend.weight_version == init and same_weights(initial, state_of(loop.backend))
    reply = await loop.trainer.handle(TrainerCommand(op="promote", version=first["version"]))
    assert reply.ok and loop.backend.weight_version == first["version"]
    assert same_weights(trained, state_of(loop.backend))
    # a checkpoint changed on disk is refused, and nothing changes
    path = Path(first["path"]) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    await loop.trainer.handle(TrainerCommand(op="rollback", version=init))
    reply = await loop.trainer.handle(TrainerCommand(op="promote", version=first["version"]))
    assert not reply.ok and "changed on disk" in reply.message
    assert loop.backend.weight_version == init
    # pause and resume
    assert (await loop.trainer.handle(TrainerCommand(op="pause"))).data["paused"] is True
    assert (await loop.trainer.handle(TrainerCommand(op="resume"))).data["paused"] is False


class Broken:
    """A serving process whose loads fail: it keeps its version."""

    model_id = "broken"
    weight_sources = frozenset({WeightSource.PATH})
    weight_version = "unchanged"

    async def update_weights(self, update: WeightUpdate) -> None:
        raise OSError("disk full")


async def test_a_process_that_cannot_load_keeps_its_version_and_the_others_go_back(make_loop: Any) -> None:
    loop: Loop = await make_loop(publisher_backends=lambda backend: [backend, Broken()])
    init = loop.backend.weight_version
    before = state_of(loop.backend)
    await loop.episodes(3)
    report = await loop.trainer.run_cycle()
    assert report["outcome"] == "swap_failed", report
    assert "disk full" in report["publish"] and "serves unchanged" in report["publish"]
    assert loop.backend.weight_version == init and same_weights(before, state_of(loop.backend))
    with loop.session_factory() as s:
        assert registry.serving_version(s, model_id="base-model").version == init
        assert registry.get_version(s, model_id="base-model", version=report["version"]).metrics["status"] == "swap_failed"


# ------------------------------------------------------------------------------------------------- grpo
class RightOrWrong:
    """A served model stand-in on the tiny tokenizer: answers a countdown problem right (one solution)
    when its sampling seed is even, wrong when odd, so every GRPO group has a signal. Takes weights by
    path (it only changes its label)."""

    weight_sources = frozenset({WeightSource.PATH})
    prompt_style = PromptStyle.TRAINED

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model_id = "base-model"
        self.weight_version = initial_label(model_dir)
        self.loads: list[str] = []

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    async def update_weights(self, update: WeightUpdate) -> None:
        check_source(self, update)  # type: ignore[arg-type]
        self.loads.append(update.version)
        self.weight_version = update.version

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        import re

        from shared.tasks.countdown_solver import solve

        prompt = self.decode(request.input_ids)
        m = re.search(r"Numbers: ([\d ]+)\. Target: (\d+)", prompt)
        assert m is not None, prompt
        numbers, target = [int(x) for x in m.group(1).split()], int(m.group(2))
        right = next(iter(solve(numbers, target).values()))
        answer = right if (request.sampling.seed or 0) % 2 == 0 else "1+1"
        text = f"I try.<ANSWER>{answer}</ANSWER>"
        ids = self.encode(text)
        return GenerateResult(ids, self.decode(ids), FinishReason.STOP, matched="</ANSWER>",
                              weight_version=self.weight_version)  # fmt: skip

    async def aclose(self) -> None:
        return None


async def test_grpo_submits_groups_through_the_problems_stream_and_trains_on_their_advantages(
    make_loop: Any, tiny_model_dir: Path
) -> None:
    backend = RightOrWrong(tiny_model_dir)
    settings = TINY_EPISODES.model_copy(update={"mode": Mode.SEQUENTIAL, "organizer_budget": 128})
    loop: Loop = await make_loop(backend=backend, method="grpo", episode=settings, gate_tolerance=1.0)
    report = await loop.trainer.run_cycle()
    assert report["outcome"] == "published", report
    window = report["data_window"]
    assert window["submitted"] == 4 and window["used"] == 4  # P=2 problems x G=2
    for group in window["groups"]:
        assert len(group) == 2 and len(set(group)) == 2  # one right, one wrong: a signal in every group
    assert backend.loads == [report["version"]] and report["version"].startswith("grpo-c0001-")
    with loop.session_factory() as s:
        row = registry.get_version(s, model_id="base-model", version=report["version"])
        assert row.kind == "grpo" and row.metrics["train"]["trained_tokens"] > 0
        # the submitted episodes went through the organizer and were stored like any other
        from shared.store import repository

        ep = repository.get_episode(s, window["episode_ids"][0])
        assert ep is not None and ep.config["temperature"] == 1.0 and ep.mode == "sequential"


def test_the_trainer_serves_its_own_prometheus_metrics() -> None:
    import socket
    import urllib.request

    from trainer.service import TrainerMetrics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    metrics = TrainerMetrics()
    metrics.cycles.labels("published").inc()
    metrics.swap_pause.labels("sglang").observe(0.2)
    metrics.set_serving("v1")
    metrics.set_serving("v2")
    server = metrics.serve(port, host="127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'asyncthink_trainer_cycles_total{outcome="published"} 1.0' in text
    assert 'asyncthink_trainer_swap_pause_seconds_count{kind="sglang"} 1.0' in text
    assert 'asyncthink_trainer_serving{version="v2"} 1.0' in text and 'version="v1"' not in text


async def test_run_forever_survives_a_broken_cycle_answers_commands_and_stops_after_its_cycles(
    make_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.control import ask_trainer
    from trainer.service import service as service_module

    loop: Loop = await make_loop(cycles=1, poll_s=0.2)
    await loop.episodes(3)
    real = service_module.train_candidate
    calls = {"n": 0}

    def flaky(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full while saving")
        return real(*args, **kw)

    monkeypatch.setattr(service_module, "train_candidate", flaky)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.trainer.run_forever(stop))
    status = await ask_trainer(loop.bus, TrainerCommand(op="status"), timeout_s=20)
    assert status.ok and status.data["method"] == "sft"
    await asyncio.wait_for(running, 120)  # the failed cycle did not count; the second one did
    assert calls["n"] == 2 and loop.trainer.last["outcome"] == "published"
    assert loop.trainer.last["episodes"] == 3  # the broken cycle's data was not lost
    assert 'asyncthink_trainer_cycles_total{outcome="error"} 1.0' in loop.trainer.metrics.render().decode()
