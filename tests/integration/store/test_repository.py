"""One store suite, run on SQLite and on PostgreSQL (the ``store`` fixture's two params)."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text
from sqlalchemy.orm import Session

from shared.messages import EpisodeStatus, SegmentRecord
from shared.metrics import Timeline
from shared.store import repository as repo
from shared.store.db import downgrade, migrate
from shared.store.models import Base, Episode, ModelVersion, ProblemRow, Segment
from shared.store.schemas import EpisodePublic, EpisodeSummary, ModelVersionPublic
from shared.tasks.base import Mode
from tests.integration.store import factories
from tests.integration.store.conftest import TABLES, StoreUnderTest


def count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_migrations_create_all_tables_matching_the_models(store: StoreUnderTest) -> None:
    names = set(inspect(store.engine).get_table_names())
    assert set(TABLES) | {"alembic_version"} <= names
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    uniques = {u["name"] for u in inspect(store.engine).get_unique_constraints("segments")}
    assert "uq_segments_episode_id_agent" in uniques
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("episodes")}
    assert {"ix_episodes_task_mode", "ix_episodes_status", "ix_episodes_created_at"} <= indexes
    assert "ix_episodes_model_version" in indexes

    downgrade(store.url, "base")
    assert not set(TABLES) & set(inspect(store.engine).get_table_names())
    migrate(store.url)
    assert set(TABLES) <= set(inspect(store.engine).get_table_names())


def test_save_episode_stores_token_ids_and_masks_exactly(store: StoreUnderTest) -> None:
    res = factories.result("ep-exact")
    with store.sessions() as s:
        repo.save_episode(s, result=res)
    with store.sessions() as s:  # a new session: read back from the database, not the identity map
        ep = repo.get_episode(s, "ep-exact")
        assert ep is not None
        assert ep.status == "completed" and ep.problem_id == "cd-1" and ep.task == "countdown"
        assert ep.mode == "asyncthink" and ep.capacity == 2 and ep.model_version == "v1"
        assert (ep.latency, ep.eta, ep.eta_over_c, ep.forks) == (12, 1.25, 0.625, 1)
        assert (ep.accuracy, ep.reward_concurrency, ep.reward_total, ep.format_error) == (
            0.25,
            0.5,
            0.3,
            False,
        )
        assert ep.score == {"accuracy": 0.25, "correct": 1, "needed": 4, "details": {"valid": ["25+50"]}}
        assert ep.timeline is not None and Timeline.from_json(ep.timeline) == res.timeline
        assert ep.started_at is not None and ep.finished_at is not None and ep.started_at <= ep.finished_at
        assert ep.created_at.tzinfo is not None
        rows = repo.episode_segments(s, "ep-exact")
        assert [r.agent for r in rows] == ["organizer", "1"]
        for row, original in zip(rows, res.segments, strict=True):
            assert row.prompt_ids == original.prompt_ids
            assert row.completion_ids == original.completion_ids
            assert row.completion_mask == original.completion_mask
            assert all(type(i) is int for i in row.completion_ids + row.completion_mask + row.prompt_ids)
            assert repo.segment_record(row) == original


def test_save_episode_twice_is_idempotent(store: StoreUnderTest) -> None:
    res = factories.result("ep-twice")
    with store.sessions() as s:
        first = repo.save_episode(s, result=res)
        created = first.created_at
        repo.save_episode(s, result=res)
        assert (count(s, Episode), count(s, Segment), count(s, ProblemRow)) == (1, 2, 1)
        # A re-delivered result with changed content replaces, never duplicates.
        res.segments[1].text = "<RETURN>changed</RETURN>"
        res.answer = "50+25"
        again = repo.save_episode(s, result=res)
        assert again.answer == "50+25" and again.created_at == created
        assert (count(s, Episode), count(s, Segment), count(s, ProblemRow)) == (1, 2, 1)
    with store.sessions() as s:
        texts = [r.text for r in repo.episode_segments(s, "ep-twice")]
        assert texts[1] == "<RETURN>changed</RETURN>"


def test_save_episode_keeps_one_set_of_segments_across_runs(store: StoreUnderTest) -> None:
    """A redelivered episode whose second run forked fewer workers than the first (which stored
    segments live before it died) ends with the second run's segments only, never a mix of both."""
    res = factories.result("ep-rerun")
    with store.sessions() as s:
        repo.create_episode(
            s, episode_id="ep-rerun", problem=res.problem, mode=Mode.ASYNCTHINK, capacity=2, model_id="m"
        )
        first_run = SegmentRecord(agent="7", role="worker", fork_id=7, parent="organizer", text="stale")
        repo.save_segment(s, episode_id="ep-rerun", segment=first_run)  # a live write of the first run
        repo.save_episode(s, result=res)
        assert count(s, Segment) == 2
    with store.sessions() as s:
        assert sorted(r.agent for r in repo.episode_segments(s, "ep-rerun")) == ["1", "organizer"]


def test_mark_failed_ends_only_unfinished_episodes(store: StoreUnderTest) -> None:
    res = factories.result("ep-done")
    with store.sessions() as s:
        repo.create_episode(s, episode_id="ep-run", problem=res.problem, mode=Mode.ASYNCTHINK, capacity=2, model_id="m")
        repo.mark_running(s, episode_id="ep-run")
        repo.save_episode(s, result=res)
        assert repo.mark_failed(s, episode_id="ep-run", error="dead-lettered") is True
        assert repo.mark_failed(s, episode_id="ep-done", error="dead-lettered") is False
        assert repo.mark_failed(s, episode_id="missing", error="x") is False
    with store.sessions() as s:
        run, done = repo.get_episode(s, "ep-run"), repo.get_episode(s, "ep-done")
        assert run is not None and (run.status, run.error) == ("failed", "dead-lettered")
        assert run.finished_at is not None
        assert done is not None and (done.status, done.error) == ("completed", None)


def test_pending_then_running_then_completed(store: StoreUnderTest) -> None:
    res = factories.result("ep-life")
    config = {"organizer_budget": 256, "worker_budget": 128, "temperature": 0.7}
    with store.sessions() as s:
        ep = repo.create_episode(
            s,
            episode_id="ep-life",
            problem=res.problem,
            mode="asyncthink",
            capacity=2,
            model_id="m",
            config=config,
        )
        assert ep.status == "pending" and ep.config == config and ep.started_at is None
        same = repo.create_episode(
            s, episode_id="ep-life", problem=res.problem, mode=Mode.SEQUENTIAL, capacity=1, model_id="m"
        )
        assert same.mode == "asyncthink" and count(s, Episode) == 1  # create is idempotent

        running = repo.mark_running(s, episode_id="ep-life", model_version="v1")
        assert running.status == "running" and running.started_at is not None
        started = running.started_at

        seg = res.segments[0]
        repo.save_segment(s, episode_id="ep-life", segment=seg)  # streamed before the result
        done = repo.save_episode(s, result=res)
        assert done.status == "completed" and done.config == config and done.started_at == started
        assert count(s, Segment) == 2

        late = repo.mark_running(s, episode_id="ep-life")  # a re-delivered "started" event
        assert late.status == "completed"
        with pytest.raises(repo.EpisodeNotFound):
            repo.mark_running(s, episode_id="nope")


def test_save_segment_is_an_upsert(store: StoreUnderTest) -> None:
    res = factories.result("ep-seg")
    with store.sessions() as s:
        repo.create_episode(
            s, episode_id="ep-seg", problem=res.problem, mode="asyncthink", capacity=2, model_id="m"
        )
        seg = res.segments[1]
        repo.save_segment(s, episode_id="ep-seg", segment=seg)
        updated = seg.model_copy(
            update={"completion_ids": [7, 8], "completion_mask": [1, 0], "error": "timeout"}
        )
        row = repo.save_segment(s, episode_id="ep-seg", segment=updated)
        assert row.completion_ids == [7, 8] and row.error == "timeout"
        assert count(s, Segment) == 1
        with pytest.raises(repo.EpisodeNotFound):
            repo.save_segment(
                s, episode_id="missing", segment=SegmentRecord(agent="organizer", role="organizer")
            )


def test_list_filters_and_paginates_with_totals(store: StoreUnderTest) -> None:
    specs = [
        ("e0", "countdown", Mode.ASYNCTHINK, "completed", "v1"),
        ("e1", "countdown", Mode.ASYNCTHINK, "format_error", "v1"),
        ("e2", "countdown", Mode.SEQUENTIAL, "completed", "v2"),
        ("e3", "sudoku", Mode.ASYNCTHINK, "completed", "v2"),
        ("e4", "sudoku", Mode.PARALLEL, "failed", "v2"),
        ("e5", "countdown", Mode.ASYNCTHINK, "completed", "v2"),
        ("e6", "countdown", Mode.ASYNCTHINK, "completed", "v2"),
    ]
    with store.sessions() as s:
        for i, (eid, task, mode, status, version) in enumerate(specs):
            res = factories.result(
                eid, problem_id=f"p{i % 3}", task=task, mode=mode, status=status, model_version=version
            )
            for seg in res.segments:  # distinct, increasing creation times
                seg.wall_start, seg.wall_end = 1_700_000_000.0 + i, 1_700_000_000.5 + i
            repo.save_episode(s, result=res)

        rows, total = repo.list_episodes(s)
        assert total == 7 and [r.id for r in rows] == ["e6", "e5", "e4", "e3", "e2", "e1", "e0"]
        rows, total = repo.list_episodes(s, task="countdown", mode="asyncthink")
        assert total == 4 and {r.id for r in rows} == {"e0", "e1", "e5", "e6"}
        assert repo.list_episodes(s, status="format_error")[1] == 1
        assert repo.list_episodes(s, model_version="v2", task="sudoku")[1] == 2
        assert repo.list_episodes(s, task="math") == ([], 0)

        pages = [repo.list_episodes(s, task="countdown", limit=2, offset=o) for o in (0, 2, 4)]
        assert [t for _, t in pages] == [5, 5, 5]
        ids = [r.id for rows, _ in pages for r in rows]
        assert ids == ["e6", "e5", "e2", "e1", "e0"]
        assert count(s, ProblemRow) == 5  # (task, problem_id) pairs: countdown p0..p2, sudoku p0, p1
        with pytest.raises(ValueError):
            repo.list_episodes(s, limit=-1)


def test_segments_cascade_on_delete(store: StoreUnderTest) -> None:
    with store.sessions() as s:
        repo.save_episode(s, result=factories.result("ep-del-orm"))
        repo.save_episode(s, result=factories.result("ep-del-sql"))
        assert count(s, Segment) == 4
        assert repo.delete_episode(s, episode_id="ep-del-orm") is True
        assert repo.delete_episode(s, episode_id="ep-del-orm") is False
        assert count(s, Segment) == 2
        # Deleting in SQL, past the ORM: the database's ON DELETE CASCADE (SQLite: foreign keys on).
        s.execute(delete(Episode).where(Episode.id == "ep-del-sql"))
        s.commit()
        assert count(s, Segment) == 0
        assert count(s, ProblemRow) == 1  # problems outlive their episodes


def test_problem_upsert_and_null_reference(store: StoreUnderTest) -> None:
    with store.sessions() as s:
        p = factories.problem("px")
        row = repo.upsert_problem(s, problem=p)
        assert row.reference is None and row.payload == p.payload
        null_refs = s.scalar(text("SELECT COUNT(*) FROM problems WHERE reference IS NULL"))
        assert null_refs == 1  # SQL NULL, not the JSON literal null
        again = repo.upsert_problem(s, problem=p)
        assert again.id == row.id and again.payload == p.payload
        assert repo.get_problem(s, task="countdown", problem_id="px") is again
        assert count(s, ProblemRow) == 1


def test_problems_are_immutable(store: StoreUnderTest) -> None:
    """An id is bound to its content: a different payload under a used id is refused, never written."""
    with store.sessions() as s:
        p = factories.problem("pz")
        row = repo.upsert_problem(s, problem=p)
        reordered = type(p)(task=p.task, id=p.id, payload=dict(reversed(list(p.payload.items()))))
        assert repo.upsert_problem(s, problem=reordered).id == row.id  # same content, keys in another order
        changed = type(p)(task=p.task, id=p.id, payload={"numbers": [1, 1, 1, 1], "target": 999}, reference="3")
        with pytest.raises(repo.ProblemConflict, match="pz"):
            repo.upsert_problem(s, problem=changed)
        res = dataclasses.replace(factories.result("ep-conflict"), problem=changed)
        with pytest.raises(repo.ProblemConflict):
            repo.save_episode(s, result=res)
        with pytest.raises(repo.ProblemConflict):
            repo.create_episode(
                s, episode_id="ep-c2", problem=changed, mode="asyncthink", capacity=2, model_id="m"
            )
    with store.sessions() as s:
        stored = repo.get_problem(s, task="countdown", problem_id="pz")
        assert stored is not None and stored.payload == p.payload and stored.reference is None
        assert repo.get_episode(s, "ep-conflict") is None and repo.get_episode(s, "ep-c2") is None


def test_format_error_episode(store: StoreUnderTest) -> None:
    with store.sessions() as s:
        ep = repo.save_episode(s, result=factories.result("ep-fe", status=EpisodeStatus.FORMAT_ERROR))
        assert ep.status == "format_error" and ep.format_error is True and ep.reward_total == -1.0
        assert ep.score is None and ep.format_errors[0]["kind"] == "unclosed_tag"


def test_model_versions(store: StoreUnderTest) -> None:
    with store.sessions() as s:
        assert repo.latest_model_version(s, model_id="m") is None
        repo.record_model_version(s, model_id="m", version="v0", path="/ckpt/v0", kind="init")
        time.sleep(0.01)
        repo.record_model_version(
            s, model_id="m", version="v1", path="/ckpt/v1", kind="sft", step=100, parent_version="v0"
        )
        time.sleep(0.01)
        mv = repo.record_model_version(
            s,
            model_id="m",
            version="v2",
            path="/ckpt/v2",
            kind="grpo",
            step=50,
            parent_version="v1",
            metrics={"acc": 0.5},
        )
        assert mv.metrics == {"acc": 0.5}
        latest = repo.latest_model_version(s, model_id="m")
        assert latest is not None and latest.version == "v2"
        sft = repo.latest_model_version(s, model_id="m", kind="sft")
        assert sft is not None and sft.version == "v1" and sft.parent_version == "v0"
        again = repo.record_model_version(
            s, model_id="m", version="v2", path="/moved/v2", kind="grpo", step=50
        )
        assert again.id == mv.id and again.path == "/moved/v2" and count(s, ModelVersion) == 3
        assert ModelVersionPublic.model_validate(again).created_at.tzinfo is not None
        with pytest.raises(ValueError, match="kind must be one of"):
            repo.record_model_version(s, model_id="m", version="v9", path="/x", kind="rlhf")


def test_api_schemas_from_rows(store: StoreUnderTest) -> None:
    with store.sessions() as s:
        repo.save_episode(s, result=factories.result("ep-api"), config={"organizer_budget": 64})
    with store.sessions() as s:
        ep = repo.get_episode(s, "ep-api")
        assert ep is not None
        summary = EpisodeSummary.model_validate(ep)
        assert summary.id == "ep-api" and summary.problem_id == "cd-1" and summary.latency == 12
        assert summary.created_at.tzinfo == UTC
        full = EpisodePublic.from_row(ep)
        assert full.config == {"organizer_budget": 64} and full.problem.payload["target"] == 75
        assert [seg.agent for seg in full.segments] == ["organizer", "1"]
        assert full.segments[0].completion_mask == [1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
        assert EpisodePublic.from_row(ep, include_segments=False).segments == []
        assert EpisodePublic.model_validate_json(full.model_dump_json()) == full


def test_concurrent_redelivery_of_one_result_stores_it_once(store: StoreUnderTest) -> None:
    res = factories.result("ep-race")

    def deliver() -> None:
        with store.sessions() as s:
            repo.save_episode(s, result=res)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for f in [pool.submit(deliver) for _ in range(8)]:
            f.result()  # an upsert never raises a unique-constraint error
    with store.sessions() as s:
        assert (count(s, Episode), count(s, Segment), count(s, ProblemRow)) == (1, 2, 1)


def test_text_with_a_nul_character_is_stored(store: StoreUnderTest) -> None:
    """A model may decode a NUL character; PostgreSQL refuses it in text and JSON, so it is stored as
    U+FFFD while the token ids stay exact."""
    res = factories.result("ep-nul")
    res.answer = "a\x00b"
    res.segments[0].text = "x\x00y"
    res.format_errors = [{"kind": "malformed_tag", "offset": 1, "message": "bad \x00 tag", "agent": "organizer"}]
    with store.sessions() as s:
        repo.save_episode(s, result=res)
    with store.sessions() as s:
        episode = repo.get_episode(s, "ep-nul")
        assert episode is not None and episode.answer == "a\ufffdb"
        assert episode.format_errors[0]["message"] == "bad \ufffd tag"
        seg = next(x for x in repo.episode_segments(s, "ep-nul") if x.agent == res.segments[0].agent)
        assert seg.text == "x\ufffdy" and seg.completion_ids == res.segments[0].completion_ids
