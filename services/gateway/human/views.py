"""What the pages show, built from the store and the episodes' live feeds: who may see which episode, the
inbox grouped by episode, one task with its context.

An episode is visible to a person who is an admin, who started it (its ``api_key_id`` is their key: the
organizer and planning pages), or who was given it: it has a human task in one of their pools. Anyone
else gets the same 404 as for an episode that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException

from services.gateway.human.session import Person
from services.gateway.human.state import EpisodeFeed, ForkInfo, HumanPages
from shared.store.models import Episode, HumanTask, utcnow
from shared.tasks.base import Mode

ACTIVE = ("open", "claimed", "submitted")


async def in_thread(session_factory: Callable[[], Any], fn: Callable[[Any], Any]) -> Any:
    def run() -> Any:
        with session_factory() as session:
            return fn(session)

    return await asyncio.to_thread(run)


def may_see(session: Any, person: Person, episode: Episode | None) -> bool:
    from shared.store import people

    if episode is None:
        return False
    if person.admin or (episode.api_key_id is not None and episode.api_key_id == person.key_id):
        return True
    return people.has_task_in(session, episode_id=episode.id, pools=person.pools)


def visible_episode(session: Any, person: Person, episode_id: str) -> Episode:
    """The episode, or a 404 whether it is missing or someone else's."""
    from shared.store import repository

    episode = repository.get_episode(session, episode_id)
    if not may_see(session, person, episode):
        raise HTTPException(404, detail=f"no episode {episode_id[:64]!r} that you may see")
    assert episode is not None
    return episode


def goal_of(episode: Episode) -> str:
    """The problem as a person reads it: the task's statement (its sequential prompt)."""
    from shared.tasks import get_task
    from shared.tasks.base import Problem

    try:
        task = get_task(episode.task)
        problem = Problem(task=episode.task, id=episode.problem.problem_id, payload=episode.problem.payload)
        return task.organizer_prompt(problem, Mode.SEQUENTIAL).strip()
    except Exception:
        return str(episode.problem.payload)[:2000]


@dataclass
class TaskView:
    id: str
    episode_id: str
    agent: str
    fork_id: int
    pool: str
    query: str
    status: str
    claimed_by_name: str | None
    mine: bool
    draft: str
    answer: str | None
    lease_left: float | None
    deadline_left: float
    undo_left: float | None
    resolution: str | None
    returned: str | None

    @property
    def state(self) -> str:
        """open, yours, taken (someone else's live claim), submitted, or final (done/fallback/cancelled)."""
        if self.status == "claimed":
            if self.lease_left is not None and self.lease_left < 0:
                return "open"
            return "yours" if self.mine else "taken"
        return self.status


def task_view(row: HumanTask, person: Person) -> TaskView:
    now = utcnow()
    mine = row.claimed_by == person.key_id if row.status == "claimed" else row.answered_by == person.key_id
    return TaskView(
        id=row.id, episode_id=row.episode_id, agent=row.agent, fork_id=row.fork_id, pool=row.pool, query=row.query,
        status=row.status, claimed_by_name=row.claimed_by_name or row.answered_by_name, mine=bool(mine),
        draft=row.draft or "", answer=row.answer if mine else None,
        lease_left=(row.lease_until - now).total_seconds() if row.lease_until else None,
        deadline_left=(row.deadline - now).total_seconds(),
        undo_left=(row.undo_until - now).total_seconds() if row.undo_until and row.status == "submitted" else None,
        resolution=row.resolution, returned=row.returned,
    )


@dataclass
class EpisodeCard:
    episode_id: str
    task: str
    goal: str
    status: str
    feed: EpisodeFeed
    tasks: list[TaskView] = field(default_factory=list)  # this person's visible human tasks of the episode
    siblings: list[ForkInfo] = field(default_factory=list)  # the forks side by side

    @property
    def joined(self) -> int:
        return self.feed.joined

    @property
    def forked(self) -> int:
        return len(self.feed.forks)


async def episode_card(pages: HumanPages, session_factory: Callable[[], Any], episode: Episode, tasks: list[TaskView]) -> EpisodeCard:
    feed = await pages.feeds.get(episode.id)
    if not feed.streamed and not feed.organizer_text and episode.status not in ("pending", "running"):
        from shared.store import repository

        segments = await in_thread(session_factory, lambda s: repository.episode_segments(s, episode.id))
        organizer = next((seg for seg in segments if seg.role == "organizer"), None)
        if organizer is not None:
            feed.organizer_text = organizer.text
    return EpisodeCard(
        episode_id=episode.id, task=episode.task, goal=goal_of(episode), status=feed.status or episode.status,
        feed=feed, tasks=tasks, siblings=list(feed.forks.values()),
    )


async def inbox(pages: HumanPages, session_factory: Callable[[], Any], person: Person) -> list[EpisodeCard]:
    """The person's active tasks (open, claimed, submitted) in their pools, grouped by episode, oldest first."""
    from shared.store import people, repository

    def load(session: Any) -> list[tuple[Episode, list[HumanTask]]]:
        rows = people.list_tasks(session, pools=person.pools, statuses=ACTIVE, limit=500)
        grouped: dict[str, list[HumanTask]] = {}
        for row in rows:
            grouped.setdefault(row.episode_id, []).append(row)
        out = []
        for episode_id, tasks in grouped.items():
            episode = repository.get_episode(session, episode_id)
            if episode is not None:
                out.append((episode, tasks))
        return out

    groups = await in_thread(session_factory, load)
    return [
        await episode_card(pages, session_factory, episode, [task_view(t, person) for t in tasks]) for episode, tasks in groups
    ]
