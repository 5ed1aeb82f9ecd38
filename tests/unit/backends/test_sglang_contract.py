"""SGLangBackend against a contract fixture: a fake SGLang 0.5.23 HTTP server that is as strict as the real one.

The fake (``FakeSGLang`` in ``tests/fakes/sglang.py``, an ASGI app behind ``httpx.ASGITransport``; it lives
under ``tests/``, never on a default path) follows SGLang 0.5.23's HTTP API; see that module
for what it checks. Hosts ``r1`` and ``r2`` are two replicas served by one app. A wrapping transport
(``RefusingTransport``) simulates refused connections. The same fake serves the backend conformance suite
(``tests/conformance/test_backend_conformance.py``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.agents import PRIORITY_AWAITED
from shared.backends.base import FinishReason, GenerateRequest, ModelBackend, SamplingParams
from shared.backends.sglang import (
    SGLangBackend,
    SGLangRequestError,
    SGLangServerError,
    WeightUpdateError,
    rendezvous_order,
)
from shared.protocol import ORGANIZER_STOP_REGEX, WORKER_STOP_REGEX
from tests.fakes.sglang import FakeSGLang, RefusingTransport
from tests.fakes.tokenizer import build_tokenizer_dir

R1, R2 = "http://r1:30000", "http://r2:30000"

# -- a small local tokenizer (tests/fakes/tokenizer.py) ----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tiny-model")


# -- the contract fixture --------------------------------------------------------------------------------


@dataclass
class Cluster:
    fake: FakeSGLang
    transport: RefusingTransport
    backend: SGLangBackend

    def calls(self, host: str, path: str | None = None) -> list[tuple[str, str, Any]]:
        return [c for c in self.fake.replica(host).calls if path is None or c[1] == path]


@pytest.fixture
async def cluster(tokenizer_dir: Path) -> AsyncIterator[Cluster]:
    from transformers import AutoTokenizer

    fake = FakeSGLang(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), ["r1", "r2"])
    transport = RefusingTransport(httpx.ASGITransport(app=fake.app))
    backend = SGLangBackend([R1, R2], tokenizer_dir, timeout_s=5.0, backoff_s=0.001, transport=transport)
    yield Cluster(fake, transport, backend)
    await backend.aclose()


def req(backend: SGLangBackend, prompt: str = "Find 3+4 please", **kw: Any) -> GenerateRequest:
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("stop_regex", ORGANIZER_STOP_REGEX)
    kw.setdefault("session", "episode-1")
    return GenerateRequest(input_ids=backend.encode(prompt), **kw)


# -- the fixture is as strict as the reference ------------------------------------------------------------


async def test_fixture_rejects_what_sglang_rejects(cluster: Cluster) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cluster.fake.app), base_url=R1) as c:
        r = await c.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 5}})
        assert r.status_code == 400 and r.json()["error"].startswith("unknown field `max_tokens`")
        r = await c.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 5.0}})
        assert r.status_code == 400 and "expected i64" in r.json()["error"]
        r = await c.post("/generate", json={"input_ids": []})
        assert r.status_code == 400 and r.json()["error"]["message"] == "input_ids cannot be empty."
        assert (await c.post("/pause_generation")).status_code == 400
        assert (await c.post("/pause_generation", json={"mode": "sideways"})).status_code == 400
        assert (await c.post("/continue_generation")).status_code == 400
        assert (await c.post("/update_weights_from_disk", json={})).status_code == 400
        assert (await c.get("/get_weight_version")).status_code == 404
        # the in_place cache-flush rule
        cluster.fake.replica("r1").parked = 2
        assert (await c.post("/pause_generation", json={"mode": "in_place"})).status_code == 200
        r = await c.post("/update_weights_from_disk", json={"model_path": "/m2"})
        assert r.status_code == 400 and "cache was not flushed" in r.json()["message"]
        assert (await c.post("/continue_generation", json={})).status_code == 200


# -- /generate ----------------------------------------------------------------------------------------------


async def test_is_a_model_backend(cluster: Cluster) -> None:
    assert isinstance(cluster.backend, ModelBackend)
    assert cluster.backend.model_id == "tiny-model"


async def test_request_body_is_tokens_and_accepted_sampling_keys_only(cluster: Cluster) -> None:
    b = cluster.backend
    request = req(b, sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=7), max_new_tokens=50)
    await b.generate(request)
    host = b.replica_for("episode-1").split("//")[1].split(":")[0]
    [(_, _, body)] = cluster.calls(host, "/generate")
    assert body == {
        "input_ids": request.input_ids,
        "sampling_params": {
            "max_new_tokens": 50,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "no_stop_trim": True,
            "stop_regex": ORGANIZER_STOP_REGEX,
            "sampling_seed": 7,
        },
    }
    assert "text" not in body
    # defaults: no seed -> no sampling_seed, no stop -> no stop_regex
    await b.generate(req(b, stop_regex=None))
    body = cluster.calls(host, "/generate")[-1][2]
    assert set(body["sampling_params"]) == {"max_new_tokens", "temperature", "top_p", "top_k", "no_stop_trim"}


async def test_priority_goes_as_the_top_level_field(cluster: Cluster) -> None:
    """Issue 19: the critical path first. A request's priority reaches SGLang's ``priority`` (an int at the
    top level of /generate); a request without one sends none (the server's default)."""
    b = cluster.backend
    host = b.replica_for("episode-1").split("//")[1].split(":")[0]
    await b.generate(req(b, priority=PRIORITY_AWAITED))
    await b.generate(req(b))
    bodies = [body for _, _, body in cluster.calls(host, "/generate")]
    assert bodies[0]["priority"] == PRIORITY_AWAITED and "priority" not in bodies[1]
    assert cluster.fake.replica(host).priorities == [PRIORITY_AWAITED, None]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cluster.fake.app), base_url=R1) as c:
        r = await c.post("/generate", json={"input_ids": [1, 2], "priority": "high"})
        assert r.status_code == 400 and "expected i64" in r.json()["error"]


async def test_stop_keeps_the_stop_text_and_its_tokens(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.script = "Let me split the problem.<FORK-1>Find 3+4</FORK-1> Meanwhile I think."
    result = await b.generate(req(b))
    assert result.finish is FinishReason.STOP
    assert result.matched == "</FORK-1>"
    assert result.text.endswith("</FORK-1>")
    assert result.text == b.decode(result.output_ids)
    assert result.text.startswith("Let me split the problem.<FORK-1>Find 3+4")


async def test_worker_stop_and_eos_and_length_and_abort(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.script = "Worker thinks about 3+4 and returns.<RETURN>7</RETURN> trailing"
    r = await b.generate(req(b, stop_regex=WORKER_STOP_REGEX))
    assert (r.finish, r.matched) == (FinishReason.STOP, "</RETURN>")
    for rep in cluster.fake.replicas.values():
        rep.script = "no tags at all"
    r = await b.generate(req(b))
    assert r.finish is FinishReason.EOS and r.matched is None
    assert r.text == "no tags at all"  # the EOS token decodes to nothing
    assert r.output_ids[-1] == cluster.fake.eos_id  # output_ids keep the stop token
    r = await b.generate(req(b, max_new_tokens=3))
    assert r.finish is FinishReason.LENGTH and len(r.output_ids) == 3
    cluster.fake.replica("r1").abort_next = cluster.fake.replica("r2").abort_next = True
    r = await b.generate(req(b))
    assert r.finish is FinishReason.ABORT


async def test_cached_tokens_and_weight_version_come_back(cluster: Cluster) -> None:
    b = cluster.backend
    first = await b.generate(req(b))
    assert first.cached_tokens == 0
    assert first.weight_version == "default" == b.weight_version
    second = await b.generate(
        GenerateRequest(b.encode("Find 3+4 please") + first.output_ids, 16, session="episode-1")
    )
    assert second.cached_tokens > 0  # same session, same replica: the prefix was cached


# -- sticky routing --------------------------------------------------------------------------------------


async def test_sticky_routing_over_two_replicas(cluster: Cluster) -> None:
    b = cluster.backend
    sessions = [f"episode-{i}" for i in range(24)]
    for _ in range(3):
        for s in sessions:
            await b.generate(req(b, prompt=f"Find 3+4 for {s}.", session=s, max_new_tokens=2))
    served: dict[str, list[str]] = {}  # host -> the session of every /generate it answered
    for host in ("r1", "r2"):
        for _, _, body in cluster.calls(host, "/generate"):
            served.setdefault(host, []).append(b.decode(body["input_ids"]).removeprefix("Find 3+4 for ")[:-1])
    assert set(served["r1"]) and set(served["r2"])  # both replicas serve
    assert not set(served["r1"]) & set(served["r2"])  # no session is split over replicas
    for host, got in served.items():
        assert all(got.count(s) == 3 for s in set(got))
        assert all(b.replica_for(s) == f"http://{host}:30000" for s in got)
    # the choice is the rendezvous order, independent of the URL list's order and of the process
    assert all(b.replica_for(s) == rendezvous_order([R2, R1], s)[0] for s in sessions)
    other = SGLangBackend([R2, R1], "unused", tokenizer=b.tokenizer, transport=cluster.transport)
    assert all(other.replica_for(s) == b.replica_for(s) for s in sessions)
    await other.aclose()


async def test_no_session_round_robins(cluster: Cluster) -> None:
    b = cluster.backend
    for _ in range(4):
        await b.generate(req(b, session=None, max_new_tokens=1))
    assert len(cluster.calls("r1", "/generate")) == len(cluster.calls("r2", "/generate")) == 2


async def test_refused_replica_fails_over_to_the_next_in_rendezvous_order(cluster: Cluster) -> None:
    b = cluster.backend
    primary, secondary = (u.split("//")[1].split(":")[0] for u in rendezvous_order([R1, R2], "episode-1"))
    cluster.transport.down[primary] = None
    result = await b.generate(req(b))
    assert result.finish is FinishReason.STOP
    assert cluster.transport.attempts[primary] == b.retries + 1
    assert len(cluster.calls(secondary, "/generate")) == 1


async def test_connection_errors_are_retried_with_backoff(cluster: Cluster) -> None:
    b = cluster.backend
    primary = b.replica_for("episode-1").split("//")[1].split(":")[0]
    cluster.transport.down[primary] = 2
    await b.generate(req(b))
    assert cluster.transport.attempts[primary] == 3
    assert len(cluster.calls(primary, "/generate")) == 1


# -- errors -------------------------------------------------------------------------------------------------


async def test_400_becomes_a_request_error_with_the_server_message(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.max_context = 4
    with pytest.raises(SGLangRequestError, match="longer than the model's context length"):
        await b.generate(req(b, prompt="a rather long prompt that has many tokens"))
    with pytest.raises(ValueError, match="empty"):
        await b.generate(GenerateRequest([], 5))
    with pytest.raises(ValueError, match="256"):
        await b.generate(req(b, stop_regex="|".join(f"</TAG-{i}>" for i in range(40))))


async def test_5xx_is_raised_without_retry(cluster: Cluster) -> None:
    b = cluster.backend
    primary = b.replica_for("episode-1").split("//")[1].split(":")[0]
    cluster.fake.replica(primary).fail_next_status = 503
    with pytest.raises(SGLangServerError, match="503"):
        await b.generate(req(b))
    assert cluster.transport.attempts[primary] == 1


async def test_timeout_names_the_server_and_the_knob(cluster: Cluster, tokenizer_dir: Path) -> None:
    slow = SGLangBackend([R1], tokenizer_dir, timeout_s=0.2, transport=cluster.transport)
    cluster.fake.replica("r1").delay_s = 2.0
    try:
        with pytest.raises(TimeoutError, match=r"r1:30000.*ASYNCTHINK_REQUEST_TIMEOUT_S"):
            await slow.generate(req(slow))
    finally:
        await slow.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_says_how_to_start_sglang(tokenizer_dir: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    b = SGLangBackend([url], tokenizer_dir, timeout_s=2.0, connect_timeout_s=1.0, retries=1, backoff_s=0.01)
    try:
        with pytest.raises(ConnectionError, match=r"sglang\.launch_server") as info:
            await b.generate(req(b))
        assert url in str(info.value)
        with pytest.raises(ConnectionError, match=r"sglang\.launch_server"):
            await b.check_server()
    finally:
        await b.aclose()


async def test_auth_headers_per_route_level(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    fake = FakeSGLang(
        AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True),
        ["r1"],
        api_key="k",
        admin_key="adm",
    )
    transport = httpx.ASGITransport(app=fake.app)
    wrong = SGLangBackend([R1], tokenizer_dir, transport=transport, api_key="nope")
    right = SGLangBackend([R1], tokenizer_dir, transport=transport, api_key="k", admin_api_key="adm")
    try:
        with pytest.raises(SGLangRequestError, match="unauthorized"):
            await wrong.generate(req(wrong))
        assert (await right.generate(req(right))).output_ids
        await right.hot_swap("/m/v2", weight_version="v2")
        assert right.weight_version == "v2"
    finally:
        await wrong.aclose()
        await right.aclose()


# -- health and model info ----------------------------------------------------------------------------------


async def test_check_server_reads_health_and_model_info(cluster: Cluster) -> None:
    b = cluster.backend
    cluster.fake.replica("r1").weight_version = "step-40"
    await b.check_server()
    assert b.weight_version == "step-40"
    for host in ("r1", "r2"):
        assert cluster.calls(host, "/health")
    assert cluster.calls("r1", "/model_info") and not cluster.calls("r1", "/get_model_info")
    cluster.fake.replica("r2").paused = "retract"
    with pytest.raises(ConnectionError, match="503"):
        await b.check_server()


# -- weight hot-swap ----------------------------------------------------------------------------------------


async def test_hot_swap_call_order_and_bodies(cluster: Cluster) -> None:
    b = cluster.backend
    await b.generate(req(b))
    await b.hot_swap("/ckpt/step-100", weight_version="step-100")
    for host in ("r1", "r2"):
        control = [(p, body) for _, p, body in cluster.calls(host) if p != "/generate"]
        assert control == [
            ("/pause_generation", {"mode": "retract"}),
            ("/update_weights_from_disk", {"model_path": "/ckpt/step-100", "weight_version": "step-100",
                                           "flush_cache": True}),
            ("/continue_generation", {"torch_empty_cache": True}),
        ]  # fmt: skip
        rep = cluster.fake.replica(host)
        assert rep.paused is None and rep.cache == []
    # replicas are swapped one after the other (the other keeps serving)
    r1_calls = [p for _, p, _ in cluster.calls("r1")]
    assert r1_calls[-1] == "/continue_generation"
    assert b.weight_version == "step-100"
    assert (await b.model_info(R2))["weight_version"] == "step-100"
    result = await b.generate(req(b))
    assert result.weight_version == "step-100" and result.cached_tokens == 0  # flushed with the update


async def test_hot_swap_in_place_does_not_flush_with_the_update(cluster: Cluster) -> None:
    b = cluster.backend
    for rep in cluster.fake.replicas.values():
        rep.parked = 1  # a request frozen in the running batch
    await b.hot_swap("/ckpt/v3", weight_version="v3", pause_mode="in_place", flush_timeout_s=0)
    for host in ("r1", "r2"):
        update = next(body for _, p, body in cluster.calls(host) if p == "/update_weights_from_disk")
        assert update["flush_cache"] is False
        paths = [p for _, p, _ in cluster.calls(host)]
        assert paths == [
            "/pause_generation",
            "/update_weights_from_disk",
            "/continue_generation",
            "/flush_cache",
        ]
    assert b.weight_version == "v3"


async def test_failed_hot_swap_resumes_generation_and_keeps_the_version(cluster: Cluster) -> None:
    b = cluster.backend
    await b.generate(req(b))
    with pytest.raises(WeightUpdateError, match="repository not found"):
        await b.hot_swap("/ckpt/missing", weight_version="bad")
    rep = cluster.fake.replica("r1")
    assert [p for _, p, _ in rep.calls if p != "/generate"][-1] == "/continue_generation"
    assert rep.paused is None and rep.weight_version == "default"
    assert not cluster.calls("r2", "/pause_generation")  # stopped at the first failing replica
    assert b.weight_version == "default"


async def test_generate_waits_while_paused(cluster: Cluster) -> None:
    b = cluster.backend
    url = b.replica_for("episode-1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cluster.fake.app), base_url=url) as c:
        assert (await c.post("/pause_generation", json={"mode": "retract"})).status_code == 200
        task = asyncio.create_task(b.generate(req(b)))
        rep = cluster.fake.replica(httpx.URL(url).host)
        for _ in range(1000):  # until the request reached the replica and waits there (10 s at most)
            if rep.held == 1:
                break
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the request never reached the paused replica")
        assert not task.done()
        assert (await c.post("/continue_generation", json={})).status_code == 200
    assert (await asyncio.wait_for(task, 2)).finish is FinishReason.STOP


async def test_bad_pause_mode_is_refused_locally(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="pause_mode"):
        await cluster.backend.hot_swap("/m", weight_version="v", pause_mode="sideways")  # type: ignore[arg-type]


# -- the registry's sglang: form ------------------------------------------------------------------------


def test_registry_opens_sglang_and_explains_bad_specs(tokenizer_dir: Path, tmp_path: Path) -> None:
    from shared.backends.registry import open_backend
    from shared.config import Settings

    settings = Settings(request_timeout_s=7.5)
    b = open_backend(f"sglang:{R1},{R2}?tokenizer={tokenizer_dir}", settings)
    assert isinstance(b, SGLangBackend)
    assert b.base_urls == [R1, R2] and b.timeout_s == 7.5 and b.model_id == "tiny-model"
    with pytest.raises(ValueError, match=r"\?tokenizer="):
        open_backend(f"sglang:{R1}", settings)
    with pytest.raises(FileNotFoundError, match="models/"):
        open_backend(f"sglang:{R1}?tokenizer={tmp_path / 'nope'}", settings)
    with pytest.raises(ValueError, match="accepted forms"):
        open_backend("vllm:http://x:1", settings)
    with pytest.raises(ValueError, match="accepted forms"):
        open_backend("sglang:r1:30000?tokenizer=/x", settings)
    with pytest.raises(FileNotFoundError, match=r"does-not-exist.*shipped model lives under models/"):
        open_backend(str(tmp_path / "does-not-exist"), settings)
