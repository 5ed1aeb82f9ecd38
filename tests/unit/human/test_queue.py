"""The human queue's transitions in the store: one winner per race, the two clocks kept apart, all audited."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from shared.store import people
from shared.store.models import utcnow
from shared.store.people import Actor, QueueConflict

ANN = Actor("aaaaaaaaaaaa", "Ann")
BOB = Actor("bbbbbbbbbbbb", "Bob")


def make(sessions: Callable[[], Any], deadline_s: float = 600.0, agent: str = "2") -> str:
    with sessions() as s:
        row, created = people.create_task(
            s, episode_id="ep1", agent=agent, fork_id=int(agent), parent="organizer", pool="default",
            task="chat", query="What is 6*7?", deadline=utcnow() + timedelta(seconds=deadline_s), fallback="model",
        )
    assert created
    return str(row.id)


def actions(sessions: Callable[[], Any], task_id: str) -> list[tuple[str, str | None]]:
    with sessions() as s:
        return [(a.action, a.actor) for a in people.audit(s, task_id=task_id)]


def test_create_is_idempotent_per_episode_and_agent(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    with sessions() as s:
        again, created = people.create_task(
            s, episode_id="ep1", agent="2", fork_id=2, parent="organizer", pool="default", task="chat",
            query="What is 6*7?", deadline=utcnow(), fallback="model",
        )
    assert not created and again.id == task_id
    assert actions(sessions, task_id) == [("created", None)]


def test_two_people_one_task_one_claim(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=30)
        with pytest.raises(QueueConflict) as err:
            people.claim(s, task_id=task_id, actor=BOB, lease_s=30)
    assert err.value.reason == "taken"


def test_a_lapsed_lease_requeues_and_another_person_claims(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    t0 = utcnow()
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=5, now=t0)
        people.renew(s, task_id=task_id, actor=ANN, lease_s=5, draft="partial", now=t0 + timedelta(seconds=3))
        later = t0 + timedelta(seconds=9)  # renewed to t0+8: lapsed
        with pytest.raises(QueueConflict) as err:
            people.renew(s, task_id=task_id, actor=ANN, lease_s=5, now=later)
        assert err.value.reason == "lease_lost"
        requeued = people.expire_leases(s, now=later)
        assert [r.id for r in requeued] == [task_id]
        row = people.claim(s, task_id=task_id, actor=BOB, lease_s=5, now=later)
        assert row.claimed_by == BOB.key_id and row.draft == "partial"  # the partial answer carries over
        with pytest.raises(QueueConflict) as late:  # Ann's page comes back: too late
            people.submit(s, task_id=task_id, actor=ANN, answer="42", undo_s=5, now=later)
        assert late.value.reason == "taken"
    assert actions(sessions, task_id) == [
        ("created", None), ("claim", ANN.key_id), ("lease_expired", ANN.key_id), ("claim", BOB.key_id)
    ]


def test_a_claim_takes_over_a_lapsed_lease_without_a_sweep(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    t0 = utcnow()
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=2, now=t0)
        people.claim(s, task_id=task_id, actor=BOB, lease_s=2, now=t0 + timedelta(seconds=3))
    assert [a for a, _ in actions(sessions, task_id)] == ["created", "claim", "lease_expired", "claim"]


def test_submit_after_the_lease_lapsed_is_refused(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    t0 = utcnow()
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=2, now=t0)
        with pytest.raises(QueueConflict) as err:
            people.submit(s, task_id=task_id, actor=ANN, answer="42", undo_s=0, now=t0 + timedelta(seconds=3))
    assert err.value.reason == "lease_lost"
    with sessions() as s:
        assert people.get_task(s, task_id).answer is None  # type: ignore[union-attr]


def test_double_submit_gives_one_answer_and_one_consumption(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    t0 = utcnow()
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=30, now=t0)
        people.submit(s, task_id=task_id, actor=ANN, answer="42", undo_s=5, now=t0)
        with pytest.raises(QueueConflict) as err:
            people.submit(s, task_id=task_id, actor=ANN, answer="43", undo_s=5, now=t0)
        assert err.value.reason == "already_submitted"
        assert people.consume(s, task_id=task_id, now=t0 + timedelta(seconds=1)) is None  # undo window
        first = people.consume(s, task_id=task_id, now=t0 + timedelta(seconds=6))
        second = people.consume(s, task_id=task_id, now=t0 + timedelta(seconds=7))
    assert first is not None and first.returned == "42" and second is None
    assert [a for a, _ in actions(sessions, task_id)] == ["created", "claim", "submit", "consumed"]


def test_undo_within_the_window_and_not_after(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    t0 = utcnow()
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=30, now=t0)
        people.submit(s, task_id=task_id, actor=ANN, answer="41", undo_s=5, now=t0)
        row = people.undo(s, task_id=task_id, actor=ANN, lease_s=30, now=t0 + timedelta(seconds=2))
        assert row.status == "claimed" and row.draft == "41" and row.answer is None
        people.submit(s, task_id=task_id, actor=ANN, answer="42", undo_s=5, now=t0 + timedelta(seconds=3))
        with pytest.raises(QueueConflict) as err:
            people.undo(s, task_id=task_id, actor=ANN, lease_s=30, now=t0 + timedelta(seconds=9))
    assert err.value.reason == "undo_window_over"


def test_the_deadline_sends_the_task_to_its_fallback_once(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions, deadline_s=10)
    t0 = utcnow()
    with sessions() as s:
        people.claim(s, task_id=task_id, actor=ANN, lease_s=60, now=t0)
        people.renew(s, task_id=task_id, actor=ANN, lease_s=60, draft="6*7 is 4", now=t0 + timedelta(seconds=2))
        assert people.take_deadline(s, task_id=task_id, now=t0 + timedelta(seconds=5)) is None
        late = t0 + timedelta(seconds=11)
        row = people.take_deadline(s, task_id=task_id, now=late)
        assert row is not None and row.status == "fallback" and row.draft == "6*7 is 4"
        assert people.take_deadline(s, task_id=task_id, now=late) is None
        with pytest.raises(QueueConflict) as err:  # the lease is still live, the deadline is not
            people.submit(s, task_id=task_id, actor=ANN, answer="42", undo_s=0, now=late)
        assert err.value.reason == "finished"
        people.record_fallback(s, task_id=task_id, resolution="model", returned="42", partial_chars=8)
    assert [a for a, _ in actions(sessions, task_id)] == ["created", "claim", "deadline", "fallback"]


def test_cancel_and_has_task_in(sessions: Callable[[], Any]) -> None:
    task_id = make(sessions)
    with sessions() as s:
        assert people.has_task_in(s, episode_id="ep1", pools=["default"])
        assert not people.has_task_in(s, episode_id="ep1", pools=["experts"])
        assert not people.has_task_in(s, episode_id="other", pools=None)
        assert people.cancel(s, task_id=task_id, reason="answered without a join") is not None
        assert people.cancel(s, task_id=task_id, reason="again") is None
        with pytest.raises(QueueConflict) as err:
            people.claim(s, task_id=task_id, actor=ANN, lease_s=30)
    assert err.value.reason == "finished"
