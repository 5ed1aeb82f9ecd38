"""The human queue under concurrency, on SQLite and PostgreSQL: racing people and racing joins each get
exactly one winner, and the audit says so."""

from __future__ import annotations

import threading
from datetime import timedelta

from shared.store import people
from shared.store.models import utcnow
from shared.store.people import Actor, QueueConflict
from tests.integration.store.conftest import StoreUnderTest


def race(n: int, fn: object) -> list[object]:
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)  # type: ignore[operator]
        except QueueConflict as err:
            results[i] = err.reason

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_many_people_claim_one_task_and_many_joins_consume_one_answer(store: StoreUnderTest) -> None:
    with store.sessions() as s:
        row, _ = people.create_task(
            s, episode_id="race", agent="1", fork_id=1, parent="organizer", pool="default", task="chat",
            query="q", deadline=utcnow() + timedelta(minutes=5), fallback="model",
        )
    task_id = row.id

    def claim(i: int) -> object:
        with store.sessions() as s:
            return people.claim(s, task_id=task_id, actor=Actor(f"person{i:06d}", f"P{i}"), lease_s=60).claimed_by

    claims = race(8, claim)
    winners = [c for c in claims if c != "taken"]
    assert len(winners) == 1 and claims.count("taken") == 7
    winner = Actor(str(winners[0]), "")

    def submit(i: int) -> object:
        with store.sessions() as s:
            return people.submit(s, task_id=task_id, actor=winner, answer=f"answer {i}", undo_s=0).answer

    submits = race(4, submit)
    assert sum(1 for r in submits if isinstance(r, str) and r.startswith("answer")) == 1
    assert submits.count("already_submitted") == 3

    def consume(_: int) -> object:
        with store.sessions() as s:
            done = people.consume(s, task_id=task_id)
            return done.returned if done is not None else None

    taken = [r for r in race(6, consume) if r is not None]
    assert len(taken) == 1
    with store.sessions() as s:
        actions = [a.action for a in people.audit(s, task_id=task_id)]
    assert actions == ["created", "claim", "submit", "consumed"]
