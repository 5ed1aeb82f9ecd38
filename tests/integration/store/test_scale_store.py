"""Issue 19 in the store, on SQLite and PostgreSQL: segments appended and batched, never rewritten.

* ``start_episode`` marks an episode running in one transaction (creating it if it was never stored),
  says what it was before, and leaves a finished one alone;
* ``save_segments`` stores the segments of several episodes in one statement (an upsert);
* ``store_episode(live_agents=...)`` writes only the clock spans of segments stored while the episode
  ran, and the rest whole;
* ``append_segment`` extends a stored segment's ids on PostgreSQL (and declines on SQLite, where the
  checkpoint writer writes it whole); the checkpoint writer appends after its first write.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from shared.agents import Snapshot
from shared.messages import EpisodeStatus
from shared.store import repository as repo
from shared.tasks.base import Mode
from tests.integration.store import factories
from tests.integration.store.conftest import StoreUnderTest


def _start(store: StoreUnderTest, eid: str) -> EpisodeStatus | None:
    with store.sessions() as s:
        return repo.start_episode(
            s, episode_id=eid, problem=factories.problem(), mode=Mode.ASYNCTHINK, capacity=2, model_id="m",
            config={"capacity": 2}, model_version="v1",
        )  # fmt: skip


def test_start_episode_creates_or_marks_running_and_leaves_finished_ones(store: StoreUnderTest) -> None:
    assert _start(store, "ep-new") is None
    assert _start(store, "ep-new") is EpisodeStatus.RUNNING  # a second organizer: it was running
    with store.sessions() as s:
        repo.create_episode(s, episode_id="ep-pending", problem=factories.problem(), mode="asyncthink",
                            capacity=2, model_id="m")  # fmt: skip
    assert _start(store, "ep-pending") is EpisodeStatus.PENDING
    with store.sessions() as s:
        repo.save_episode(s, result=factories.result("ep-done"))
    assert _start(store, "ep-done") is EpisodeStatus.COMPLETED
    with store.sessions() as s:
        assert repo.get_episode(s, "ep-new").status == "running"  # type: ignore[union-attr]
        assert repo.get_episode(s, "ep-pending").status == "running"  # type: ignore[union-attr]
        assert repo.get_episode(s, "ep-done").status == "completed"  # type: ignore[union-attr]


def test_live_segments_are_not_written_again(store: StoreUnderTest) -> None:
    result = factories.result("ep-live")
    organizer, worker = result.segments
    _start(store, "ep-live")
    _start(store, "ep-other")
    live = worker.model_copy(update={"clock_start": 0, "clock_end": 0, "text": "stored while it ran"})
    with store.sessions() as s:
        repo.save_segments(s, rows=[("ep-live", live), ("ep-other", worker)])  # two episodes, one statement
    with store.sessions() as s:
        repo.store_episode(s, result=result, live_agents={"1"})
    with store.sessions() as s:
        rows = {r.agent: r for r in repo.episode_segments(s, "ep-live")}
        assert rows["1"].text == "stored while it ran"  # not rewritten...
        assert (rows["1"].clock_start, rows["1"].clock_end) == (worker.clock_start, worker.clock_end)  # ...but spanned
        assert rows["organizer"].completion_ids == organizer.completion_ids  # written whole
        assert [r.agent for r in repo.episode_segments(s, "ep-other")] == ["1"]


def _snapshot(ids: list[int], mask: list[int], n: int) -> Snapshot:
    spec = SimpleNamespace(agent="organizer", role=SimpleNamespace(value="organizer"), prompt="P")
    state = SimpleNamespace(prompt_ids=[1, 2], ids=ids, mask=mask, generated=sum(mask[:n]), wall_start=1.0,
                            version="v1")  # fmt: skip
    snap = Snapshot(spec, state, lambda xs: "".join(chr(65 + x % 26) for x in xs))  # type: ignore[arg-type]
    snap.length = n
    return snap


def test_checkpoints_append_after_their_first_write(store: StoreUnderTest) -> None:
    from services.runtime import StoreCheckpoint

    _start(store, "ep-cp")
    ids, mask = list(range(100)), [1] * 60 + [0] * 10 + [1] * 30
    cp = StoreCheckpoint(store.sessions, "ep-cp")
    for n in (40, 70, 100):  # the agent's lists only grow; each snapshot is a prefix
        cp._store(_snapshot(ids, mask, n))
    with store.sessions() as s:
        [row] = repo.episode_segments(s, "ep-cp")
        assert row.completion_ids == ids and row.completion_mask == mask
        assert row.text == "".join(chr(65 + x % 26) for x in ids) and row.generated_tokens == 90
    assert cp.appended == (2 if store.backend == "postgresql" else 0)
    with store.sessions() as s:  # a row that is not what the writer left is never appended to
        assert not repo.append_segment(s, episode_id="ep-cp", agent="organizer", stored=5, ids=[1], mask=[1],
                                       text="x", generated_tokens=1)  # fmt: skip


def test_the_checkpoint_writer_is_lazy(store: StoreUnderTest) -> None:
    from services.runtime import StoreCheckpoint

    async def run() -> int:
        _start(store, "ep-lazy")
        cp = StoreCheckpoint(store.sessions, "ep-lazy", delay_s=0.05, min_new_tokens=1)
        ids, mask = list(range(50)), [1] * 50
        for n in (10, 20, 30, 40, 50):  # superseded before the delay: only the last is materialized
            await cp.checkpoint("ep-lazy", _snapshot(ids, mask, n))
        assert cp._writer is not None
        await asyncio.wait_for(asyncio.shield(cp._writer), 30)  # it took the last one, wrote it, and stopped
        await cp.finish()
        return cp.saved

    assert asyncio.run(run()) == 1
    with store.sessions() as s:
        [row] = repo.episode_segments(s, "ep-lazy")
        assert len(row.completion_ids) == 50
