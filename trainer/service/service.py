"""The trainer service: learn from the stored traces, gate, publish, and roll back.

:class:`TrainerService` runs cycles until stopped (:meth:`~TrainerService.run_forever`), or one at a time
(:meth:`~TrainerService.run_cycle`, for tests and embedding). One cycle:

On start, when the registry has no serving version of the lineage, the base model is registered as the
serving version (kind ``init``, labelled as the fleet labels it) with a copy of its weights under
``OUT/versions/``, the directory every serving process reads checkpoints from.

1. **Data.** ``sft``: finished episodes of the task read from the store after the last cycle's
   watermark, with their stored ids and masks, kept by :func:`~trainer.service.data.keep_for_sft`
   (accuracy, reward, format errors, worker errors, the held-out set, staleness against the serving
   version's lineage) until ``min_episodes`` are there (else the cycle waits ``poll_s`` and looks again).
   ``grpo``: ``problems_per_cycle`` training problems, ``group_size`` episodes each, submitted through
   the normal path (a pending row, then a :class:`~shared.messages.SubmitProblem` on the bus's problems
   stream, sampled at the episode settings' temperature > 0), read back from the store once finished;
   the group advantages (:func:`trainer.grpo.losses.group_advantages`) over each group's stored
   rewards go to every sequence of the episode.
2. **Update.** :func:`~trainer.service.train.train_candidate` on the serving version's checkpoint; a
   new directory ``OUT/versions/<version>`` with its content hash.
3. **Gate.** The candidate and the serving version on the same held-out problems
   (:mod:`trainer.service.gate`; the serving version's score is cached in its row); the candidate
   is registered in ``model_versions`` (parent, data window, update statistics, gate record, hash) as
   ``rejected`` when it regresses by more than ``gate_tolerance``.
4. **Publish.** Otherwise :class:`~shared.control.LoadWeights` goes to the fleet through the
   :class:`~trainer.service.publish.WeightPublisher`; when every process took it the version is
   ``serving``, else the processes that took it are sent back to the parent (automatic rollback) and
   the candidate is ``swap_failed``.
5. **Check after the swap.** ``post_swap_problems`` held-out problems go through the serving fleet
   (greedy); if an episode failed, carries another version, or the score falls below the candidate's
   offline score minus ``post_swap_tolerance``, the parent is published again: an automatic rollback.

Operators (``asyncthink trainer ...``, the gateway's admin routes) send :class:`~shared.control.TrainerCommand`
entries on the bus: ``pause`` and ``resume`` (a running cycle finishes first), ``promote`` and
``rollback`` to any registered version (its checkpoint's hash is checked first, so the weights served are
bit for bit the ones registered), ``status``. Swaps are serialized by one lock.

Limits: one trainer per model lineage (the registry has one writer); the watermark and the pending SFT
data live in memory between cycles (a restart rescans from the last cycle's watermark); training runs in
a worker thread, so stopping waits for a running update to end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import socket
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.bus.base import Bus
from shared.control import (
    TRAINER_GROUP,
    LoadWeights,
    PublishReport,
    TrainerCommand,
    TrainerReply,
    publish_model,
    sleep_or_stop,
    trainer_replies_stream,
    trainer_stream,
)
from shared.episode import EpisodeSettings
from shared.messages import PROBLEMS_STREAM, SubmitProblem
from shared.store import versions as registry
from shared.tasks import get_task
from shared.tasks.base import Problem, Task
from shared.weights import content_hash, initial_label
from trainer.grpo.losses import Sequence
from trainer.service import data
from trainer.service.config import TrainerServiceConfig
from trainer.service.gate import decide, evaluate, fingerprint, gate_settings
from trainer.service.publish import WeightPublisher
from trainer.service.train import VERSIONS_DIR, Candidate, train_candidate

log = logging.getLogger(__name__)

PAGE = 256  # episodes read per query while looking for SFT data
MAX_PAGES = 40  # per look (the scan goes on at the next look)


def publish_base(base: Path, dest: Path) -> Path:
    """A copy of the base model directory at ``dest`` (made once, through a temporary sibling)."""
    if dest.is_dir() and content_hash(dest) == content_hash(base):
        return dest
    tmp = dest.with_name(f".tmp-{dest.name}-{uuid.uuid4().hex[:6]}")
    shutil.copytree(base, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


class TrainerService:
    """See the module docstring."""

    def __init__(
        self,
        config: TrainerServiceConfig,
        *,
        bus: Bus,
        session_factory: Any,
        publisher: WeightPublisher,
        metrics: Any = None,
        task: Task | None = None,
        consumer_name: str | None = None,
    ) -> None:
        if config.base_model is None:
            raise ValueError("the trainer service needs base_model: the model directory the fleet started from")
        self.config = config
        self.bus = bus
        self.session_factory = session_factory
        self.publisher = publisher
        self.metrics = metrics
        self.task: Task = task if task is not None else get_task(config.task)
        self.base_model = Path(config.base_model)
        self.model_id = config.model_id or self.base_model.resolve().name
        self.paused = config.start_paused
        self.consumer_name = consumer_name or f"trainer-{socket.gethostname()}-{os.getpid()}"
        self.cycle = 0  # the last cycle number started
        self.phase = "idle"  # idle | data | train | gate | publish | check
        self.last: dict[str, Any] | None = None  # the last cycle's report
        self.held_out: list[Problem] = []
        self._lock = asyncio.Lock()  # one change of the serving version at a time
        self._scan_after: tuple[datetime, str] | None = None  # SFT: the store is scanned from here
        self._kept: list[data.StoredEpisode] = []  # SFT: good episodes scanned, not yet trained on
        self._seen = 0
        self._first_seen: datetime | None = None
        self._last_seen: tuple[datetime, str] | None = None
        self._skipped: Counter[str] = Counter()
        self._pool: list[Problem] = []
        self._phases: dict[str, float] = {}  # this cycle's seconds per phase
        self._registered = False  # this cycle's candidate is in the registry (its data is consumed)
        self._started = False

    # ------------------------------------------------------------------------------------------ helpers
    async def _db(self, fn: Any) -> Any:
        def run() -> Any:
            with self.session_factory() as session:
                return fn(session)

        return await asyncio.to_thread(run)

    def _count(self, name: str, *labels: str, n: float = 1.0) -> None:
        if self.metrics is not None:
            metric = getattr(self.metrics, name)
            (metric.labels(*labels) if labels else metric).inc(n)

    def _phase(self, name: str, seconds: float) -> None:
        """Record a cycle phase's seconds (the cycle report's ``phases``, and the metrics)."""
        self._phases[name] = self._phases.get(name, 0.0) + seconds
        self._observe("phase_seconds", seconds, name)

    def _observe(self, name: str, value: float, *labels: str) -> None:
        if self.metrics is not None:
            metric = getattr(self.metrics, name)
            (metric.labels(*labels) if labels else metric).observe(value)

    async def serving(self) -> Any:
        row = await self._db(lambda s: registry.serving_version(s, model_id=self.model_id))
        if row is None:
            raise RuntimeError(f"no serving version of {self.model_id} in model_versions (start() registers one)")
        return row

    # ------------------------------------------------------------------------------------------ start
    async def start(self) -> None:
        """Register the base model as the serving version when the registry has none; restore the cycle
        number and the SFT watermark; load the held-out set (and the GRPO training pool)."""
        if self._started:
            return
        cfg = self.config
        label = cfg.init_version if cfg.init_version else await asyncio.to_thread(initial_label, self.base_model)
        digest = await asyncio.to_thread(content_hash, self.base_model)

        def bootstrap(session: Any) -> tuple[Any, list[Any]]:
            current = registry.serving_version(session, model_id=self.model_id)
            if current is None:
                if registry.get_version(session, model_id=self.model_id, version=label) is None:
                    # the base model's weights go to the checkpoints directory too, so a rollback to it
                    # reads a path every serving process shares (SGLang may see the base elsewhere)
                    path = publish_base(self.base_model, cfg.out / VERSIONS_DIR / label)
                    registry.register(
                        session, model_id=self.model_id, version=label, path=str(path.resolve()),
                        kind="init", metrics={"content_hash": digest, "cycle": 0, "source": str(self.base_model)},
                    )  # fmt: skip
                _, current = registry.set_serving(session, model_id=self.model_id, version=label, event="initial")
            return current, registry.list_versions(session, model_id=self.model_id)

        current, rows = await self._db(bootstrap)
        self.cycle = max([int((r.metrics or {}).get("cycle") or 0) for r in rows] + [0])
        windows = [(r.metrics or {}).get("data_window") or {} for r in rows]
        marks = [(w["to"], w["last_id"]) for w in windows if w.get("to") and w.get("last_id")]
        if marks:
            to, last_id = max(marks)
            self._scan_after = (datetime.fromisoformat(to), last_id)
        self.held_out = await asyncio.to_thread(self.task.problems, "test", cfg.eval_problems, 0)
        if cfg.method == "grpo":
            self._pool = await asyncio.to_thread(self.task.problems, "train", cfg.pool_size, cfg.seed)
        if self.metrics is not None:
            self.metrics.set_serving(current.version)
            self.metrics.cycle.set(self.cycle)
            self.metrics.paused.set(1 if self.paused else 0)
        self._started = True
        log.info(
            "trainer for %s (%s, task %s): serving %s, %d cycles so far, %s",
            self.model_id, cfg.method, cfg.task, current.version, self.cycle, "paused" if self.paused else "running",
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ the loop
    async def run_forever(self, stop: asyncio.Event) -> None:
        """Cycles until ``stop`` is set (or ``cycles`` are done), answering operator commands meanwhile."""
        await self.start()
        commands = asyncio.create_task(self.serve_commands(stop), name="trainer-commands")
        done = 0
        try:
            while not stop.is_set():
                if self.paused:
                    await sleep_or_stop(stop, 0.5)
                    continue
                try:
                    report = await self.run_cycle()
                except Exception as exc:  # a broken cycle (store down, a bad checkpoint): log, wait, go on
                    log.exception("trainer cycle %d failed", self.cycle)
                    self._count("cycles", "error")
                    self.last = {"cycle": self.cycle, "outcome": "error", "error": f"{type(exc).__name__}: {exc}"}
                    self.phase = "idle"
                    if await sleep_or_stop(stop, self.config.poll_s):
                        break
                    continue
                if report["outcome"] == "no_data":
                    if await sleep_or_stop(stop, self.config.poll_s):
                        break
                    continue
                done += 1
                if self.config.cycles and done >= self.config.cycles:
                    break
        finally:
            commands.cancel()
            await asyncio.gather(commands, return_exceptions=True)

    async def run_cycle(self) -> dict[str, Any]:
        """One cycle (see the module docstring); returns its report (``outcome`` says how it ended)."""
        await self.start()
        t0 = time.monotonic()
        self._phases = {}
        self._registered = False
        serving = await self.serving()
        self.phase = "data"
        scanned = (self._scan_after, list(self._kept), self._seen, self._first_seen, self._last_seen,
                   Counter(self._skipped))  # fmt: skip
        got = await (self._sft_data(serving) if self.config.method == "sft" else self._grpo_data(serving))
        self._phase("data", time.monotonic() - t0)
        if got is None:
            self.phase = "idle"
            return {"outcome": "no_data", "cycle": self.cycle, "serving": serving.version, "pending": len(self._kept)}
        seqs, advantages, window, cycle = got
        try:
            return await self._train_gate_publish(serving, cycle, seqs, advantages, window, t0)
        except Exception:
            if not self._registered:  # no version holds this data: the next cycle reads it again
                (self._scan_after, self._kept, self._seen, self._first_seen, self._last_seen,
                 self._skipped) = scanned  # fmt: skip
            raise
        finally:
            self.phase = "idle"

    async def _train_gate_publish(
        self, serving: Any, cycle: int, seqs: list[Sequence], advantages: list[float], window: dict[str, Any], t0: float
    ) -> dict[str, Any]:
        cfg = self.config
        self.phase = "train"
        t1 = time.monotonic()
        candidate = await asyncio.to_thread(
            train_candidate, cfg, base=Path(serving.path), cycle=cycle, sequences=seqs, advantages=advantages
        )
        self._phase("train", time.monotonic() - t1)
        report: dict[str, Any] = {"cycle": cycle, "method": cfg.method, "parent": serving.version, "data_window": window}
        if candidate is None:
            report["outcome"] = "no_signal"
            return await self._finish(report, t0)
        report.update(version=candidate.version, path=str(candidate.path), train=candidate.stats)
        self.phase = "gate"
        t2 = time.monotonic()
        cand_eval = await evaluate(candidate.path, candidate.version, self.task, self.held_out, cfg.episode,
                                   device=cfg.device)  # fmt: skip
        serving_eval = await self._serving_eval(serving)
        gate = decide(cand_eval, serving_eval, metric=cfg.gate_metric, tolerance=cfg.gate_tolerance)
        self._phase("gate", time.monotonic() - t2)
        if self.metrics is not None:
            for side, ev in (("candidate", cand_eval), ("serving", serving_eval)):
                for metric in ("accuracy", "reward", "format_error_rate"):
                    self.metrics.gate_score.labels(side, metric).set(float(ev[metric]))
        report["gate"] = gate
        fp = fingerprint(self.task.name, self.held_out, cfg.episode)
        metrics = {
            "cycle": cycle, "method": cfg.method, "content_hash": candidate.content_hash, "data_window": window,
            "train": candidate.stats, "gate": gate, "eval": {fp: cand_eval}, "status": "candidate",
            "trainer": {"task": cfg.task, "config": cfg.to_json()},
        }  # fmt: skip
        await self._db(lambda s: registry.register(
            s, model_id=self.model_id, version=candidate.version, path=str(candidate.path.resolve()),
            kind=cfg.method, parent=serving.version, step=cycle, metrics=metrics,
        ))  # fmt: skip
        self._registered = True  # the data window is recorded with a version now
        if not gate["passed"]:
            await self._patch(candidate.version, {"status": "rejected"}, "gate_failed", delta=gate["delta"])
            report["outcome"] = "rejected"
            log.info("cycle %d: %s rejected by the gate (%s %+.3f)", cycle, candidate.version, cfg.gate_metric, gate["delta"])
            return await self._finish(report, t0)
        await self._patch(candidate.version, None, "gate_passed", delta=gate["delta"])
        async with self._lock:
            now = await self.serving()
            if now.version != serving.version:  # an operator changed the serving version meanwhile
                await self._patch(candidate.version, {"status": "superseded"}, "superseded", serving=now.version)
                report["outcome"] = "superseded"
                return await self._finish(report, t0)
            report.update(await self._publish_candidate(candidate, serving, cand_eval))
        return await self._finish(report, t0)

    async def _finish(self, report: dict[str, Any], t0: float) -> dict[str, Any]:
        report["seconds"] = time.monotonic() - t0
        report["phases"] = dict(self._phases)
        if report.get("version"):  # the cycle's timing beside its other metrics
            await self._patch(report["version"], {"cycle_seconds": report["seconds"], "phases": report["phases"]})
        self._count("cycles", report["outcome"])
        self._observe("cycle_seconds", report["seconds"])
        self.last = {k: v for k, v in report.items() if k != "data_window"} | {
            "episodes": (report.get("data_window") or {}).get("used")
        }
        log.info("cycle %s: %s in %.1fs", report.get("cycle"), report["outcome"], report["seconds"])
        return report

    async def _patch(self, version: str, values: dict[str, Any] | None, event: str | None = None, **detail: Any) -> Any:
        return await self._db(
            lambda s: registry.patch(s, model_id=self.model_id, version=version, values=values, event=event, **detail)
        )

    async def _serving_eval(self, serving: Any) -> dict[str, Any]:
        """The serving version's held-out score (computed once per evaluation fingerprint, then cached)."""
        fp = fingerprint(self.task.name, self.held_out, self.config.episode)
        cached = ((serving.metrics or {}).get("eval") or {}).get(fp)
        if cached is not None:
            return dict(cached)
        result = await evaluate(Path(serving.path), serving.version, self.task, self.held_out, self.config.episode,
                                device=self.config.device)  # fmt: skip
        evals = dict((serving.metrics or {}).get("eval") or {})
        evals[fp] = result
        await self._patch(serving.version, {"eval": evals})
        return result

    # ------------------------------------------------------------------------------------------ data
    async def _sft_data(self, serving: Any) -> tuple[list[Sequence], list[float], dict[str, Any], int] | None:
        cfg = self.config
        lineage = await self._db(lambda s: registry.lineage(s, model_id=self.model_id, version=serving.version))
        allowed = set(lineage[: cfg.max_staleness + 1])
        held = {p.id for p in self.held_out}
        kept: list[data.StoredEpisode] = []
        for ep in self._kept:  # the serving version may have changed since they were read
            why = data.keep_for_sft(ep, cfg, allowed=allowed, held_out=held)
            if why is None:
                kept.append(ep)
            else:
                self._skipped[why] += 1
                self._count("episodes_skipped", why)
        for _ in range(MAX_PAGES):
            if len(kept) >= cfg.max_episodes:
                break
            after = self._scan_after
            page = await self._db(lambda s, after=after: data.read_window(s, task=cfg.task, after=after, limit=PAGE))
            if not page:
                break
            for ep in page:
                assert ep.finished_at is not None
                self._scan_after = (ep.finished_at, ep.id)
                self._seen += 1
                self._first_seen = self._first_seen or ep.finished_at
                self._last_seen = self._scan_after
                why = data.keep_for_sft(ep, cfg, allowed=allowed, held_out=held)
                if why is None:
                    kept.append(ep)
                else:
                    self._skipped[why] += 1
                    self._count("episodes_skipped", why)
                if len(kept) >= cfg.max_episodes:
                    break
        if len(kept) < cfg.min_episodes:
            self._kept = kept
            return None
        use, self._kept = kept[: cfg.max_episodes], kept[cfg.max_episodes :]
        window = data.window_record(first=self._first_seen, last=self._last_seen, seen=self._seen, used=use,
                                    skipped=dict(self._skipped))  # fmt: skip
        self._seen, self._first_seen, self._skipped = 0, None, Counter()
        seqs = [s for ep in use for s in data.sequences(ep)]
        self._count("episodes_consumed", n=len(use))
        self.cycle += 1
        self._set_cycle()
        return seqs, [1.0] * len(seqs), window, self.cycle

    async def _grpo_data(self, serving: Any) -> tuple[list[Sequence], list[float], dict[str, Any], int] | None:
        import torch

        from trainer.grpo.losses import group_advantages

        cfg = self.config
        self.cycle += 1
        cycle = self.cycle
        self._set_cycle()
        rng = random.Random(cfg.seed * 1_000_003 + cycle)
        n = cfg.problems_per_cycle
        problems = rng.sample(self._pool, n) if len(self._pool) >= n else [rng.choice(self._pool) for _ in range(n)]
        jobs: list[tuple[int, Problem, EpisodeSettings]] = []
        for p, problem in enumerate(problems):
            for g in range(cfg.group_size):
                seed = (cfg.seed * 7_919 + cycle * 104_729 + p * cfg.group_size + g) % (2**31 - 1)
                jobs.append((p, problem, cfg.episode.model_copy(update={"seed": seed})))
        t_submit = datetime.now().astimezone()
        ids = await self.submit([(problem, settings) for _, problem, settings in jobs], purpose="grpo")
        got = await self.wait_finished(ids, cfg.episode_timeout_s)
        lineage = await self._db(lambda s: registry.lineage(s, model_id=self.model_id, version=serving.version))
        allowed = set(lineage[: cfg.max_staleness + 1])
        held = {p.id for p in self.held_out}
        groups: dict[int, list[data.StoredEpisode]] = {}
        skipped: Counter[str] = Counter()
        for (p, _, _), eid in zip(jobs, ids, strict=True):
            ep = got.get(eid)
            why = "unfinished" if ep is None else data.keep_for_grpo(ep, allowed=allowed, held_out=held)
            if why is not None:
                skipped[why] += 1
                self._count("episodes_skipped", why)
                continue
            assert ep is not None
            groups.setdefault(p, []).append(ep)
        seqs: list[Sequence] = []
        advantages: list[float] = []
        used: list[data.StoredEpisode] = []
        rewards_all: list[list[float]] = []
        for members in groups.values():
            if len(members) < 2:
                skipped["group_too_small"] += len(members)
                continue
            rewards = torch.tensor([e.reward for e in members], dtype=torch.float32)
            adv = group_advantages(rewards, scale=cfg.advantage_scale)  # type: ignore[arg-type]
            rewards_all.append([e.reward for e in members])
            for ep, a in zip(members, adv.tolist(), strict=True):
                used.append(ep)
                for s in data.sequences(ep):
                    seqs.append(s)
                    advantages.append(float(a))
        self._count("episodes_consumed", n=len(used))
        window = data.window_record(first=t_submit, last=None, seen=len(ids), used=used, skipped=dict(skipped))
        window["submitted"] = len(ids)
        window["groups"] = rewards_all
        window["zero_advantage_groups"] = sum(1 for g in rewards_all if len(set(g)) == 1)
        return seqs, advantages, window, cycle

    def _set_cycle(self) -> None:
        if self.metrics is not None:
            self.metrics.cycle.set(self.cycle)

    # ------------------------------------------------------------------------------------------ submitting
    async def submit(self, jobs: list[tuple[Problem, EpisodeSettings]], *, purpose: str) -> list[str]:
        """Submit episodes as the gateway does: a pending row each, then a ``SubmitProblem`` on the bus."""
        from shared.store import repository

        messages = [
            SubmitProblem(
                episode_id=f"{purpose}-{uuid.uuid4().hex[:20]}", task=problem.task, problem_id=problem.id,
                payload=problem.payload, settings=settings,
            )  # fmt: skip
            for problem, settings in jobs
        ]

        def create(session: Any) -> None:
            for (problem, settings), m in zip(jobs, messages, strict=True):
                repository.create_episode(
                    session, episode_id=m.episode_id, problem=problem, mode=settings.mode,
                    capacity=settings.resolved_capacity(self.task.default_capacity), model_id=self.model_id,
                    config=m.stored_config(), commit=False,
                )  # fmt: skip
            session.commit()

        await self._db(create)
        for m in messages:
            await self.bus.publish(PROBLEMS_STREAM, {"data": m.model_dump_json()})
        self._count("episodes_submitted", purpose, n=len(messages))
        return [m.episode_id for m in messages]

    async def wait_finished(self, ids: list[str], timeout_s: float) -> dict[str, data.StoredEpisode]:
        """The submitted episodes once all have finished, or whichever have after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        got: dict[str, data.StoredEpisode] = {}
        while True:
            missing = [i for i in ids if i not in got]
            got.update(await self._db(lambda s, missing=missing: data.read_ids(s, missing)))
            if len(got) == len(ids) or time.monotonic() >= deadline:
                if len(got) < len(ids):
                    log.warning("%d of %d submitted episodes did not finish in %.0fs", len(ids) - len(got), len(ids), timeout_s)
                return got
            await asyncio.sleep(0.25)

    # ------------------------------------------------------------------------------------------ publishing
    async def _publish_candidate(self, candidate: Candidate, parent: Any, cand_eval: dict[str, Any]) -> dict[str, Any]:
        """Publish a candidate that passed the gate (lock held); roll back when the fleet or the check fails."""
        self.phase = "publish"
        report = await self._switch(candidate.version, reason="publish", event="published")
        out: dict[str, Any] = {"publish": report.summary()}
        if not report.ok:
            out["outcome"] = "swap_failed"
            await self._patch(candidate.version, {"status": "swap_failed", "publish": report.model_dump(mode="json")},
                              "swap_failed", summary=report.summary())  # fmt: skip
            if any(r.ok for r in report.replies):  # some processes took it: send them back
                back = await self._publish(parent, reason="rollback")
                out["rollback"] = back.summary()
                await self._patch(parent.version, None, "restored_after_failed_swap", summary=back.summary())
            return out
        await self._patch(candidate.version, {"publish": report.model_dump(mode="json")})
        if self.config.post_swap_problems == 0:
            out["outcome"] = "published"
            return out
        self.phase = "check"
        t0 = time.monotonic()
        check = await self._post_swap_check(candidate.version, cand_eval)
        self._phase("check", time.monotonic() - t0)
        await self._patch(candidate.version, {"post_swap": check})
        out["post_swap"] = check
        if check["passed"]:
            out["outcome"] = "published"
            return out
        back = await self._switch(parent.version, reason="rollback", event="rolled_back", automatic=True,
                                  why=check["why"])  # fmt: skip
        out["rollback"] = back.summary()
        out["outcome"] = "rolled_back"
        return out

    async def _post_swap_check(self, version: str, cand_eval: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        problems = self.held_out[: cfg.post_swap_problems]
        settings = gate_settings(cfg.episode)
        ids = await self.submit([(p, settings) for p in problems], purpose="check")
        got = await self.wait_finished(ids, cfg.episode_timeout_s)
        eps = [got[i] for i in ids if i in got]
        wrong = {e.id: e.versions for e in eps if e.versions != [version]}
        failed = [e.id for e in eps if e.status == "failed"]
        metric = cfg.gate_metric
        values = [(e.accuracy or 0.0) if metric == "accuracy" else e.reward for e in eps]
        score = sum(values) / len(values) if values else 0.0
        per_problem = cand_eval.get("per_problem") or {}
        offline_values = [float(per_problem.get(p.id, 0.0)) for p in problems]
        offline = sum(offline_values) / len(offline_values) if offline_values and metric == "accuracy" else None
        why = []
        if len(eps) < len(ids):
            why.append(f"{len(ids) - len(eps)} episodes did not finish")
        if failed:
            why.append(f"{len(failed)} episodes failed")
        if wrong:
            why.append(f"{len(wrong)} episodes carry other versions: {sorted({v for vs in wrong.values() for v in vs})}")
        if offline is not None and score < offline - cfg.post_swap_tolerance:
            why.append(f"{metric} {score:.3f} below the candidate's offline {offline:.3f} - {cfg.post_swap_tolerance}")
        return {
            "episodes": ids, "finished": len(eps), "failed": failed, "wrong_versions": wrong, "metric": metric,
            "score": score, "offline": offline, "passed": not why, "why": "; ".join(why),
        }  # fmt: skip

    async def _publish(self, row: Any, *, reason: str) -> PublishReport:
        """Send ``row``'s checkpoint to the fleet (its hash checked first); record the swap's metrics."""
        digest = (row.metrics or {}).get("content_hash")
        if digest is not None:
            found = await asyncio.to_thread(content_hash, row.path)
            if found != digest:
                raise ValueError(
                    f"the checkpoint of {row.version} at {row.path} changed on disk (sha256 {found[:12]}, "
                    f"registered {digest[:12]}); refusing to serve it"
                )
        message = LoadWeights(version=row.version, path=row.path, model_id=self.model_id, content_hash=digest,
                              reason=reason)  # fmt: skip
        t0 = time.monotonic()
        report = await self.publisher.publish(message)
        self._phase("publish", time.monotonic() - t0)
        self._count("swaps", reason, "ok" if report.ok else "failed")
        for reply in report.replies:
            self._observe("swap_pause", reply.seconds, reply.kind)
        log.info("published %s (%s): %s", row.version, reason, report.summary())
        return report

    async def _switch(self, version: str, *, reason: str, event: str, **detail: Any) -> PublishReport:
        """Publish ``version`` and, when every process took it, make it the serving version (lock held)."""
        row = await self._db(lambda s: registry.get_version(s, model_id=self.model_id, version=version))
        if row is None:
            raise LookupError(f"no version {version!r} of {self.model_id}")
        report = await self._publish(row, reason=reason)
        if report.ok:
            await self._db(lambda s: registry.set_serving(
                s, model_id=self.model_id, version=version, event=event, reason=reason, **detail
            ))  # fmt: skip
            if self.metrics is not None:
                self.metrics.set_serving(version)
        else:
            await self._patch(version, None, f"{event}_failed", summary=report.summary())
        return report

    async def serve_version(self, version: str, *, op: str, reason: str = "") -> PublishReport:
        """An operator's promote or rollback: publish ``version`` and make it serve."""
        await self.start()
        event = "promoted" if op == "promote" else "rolled_back"
        async with self._lock:
            current = await self.serving()
            report = await self._switch(version, reason=op, event=event, operator=True, note=reason)
            if not report.ok and any(r.ok for r in report.replies) and current.version != version:
                await self._publish(current, reason="rollback")  # the processes that took it go back
        return report

    # ------------------------------------------------------------------------------------------ commands
    async def serve_commands(self, stop: asyncio.Event) -> None:
        """Answer :class:`TrainerCommand` entries from the bus until ``stop``."""
        prefix = self.config.control_prefix
        stream = trainer_stream(prefix)
        await self.bus.ensure_group(stream, TRAINER_GROUP)
        while not stop.is_set():
            try:
                entries = await self.bus.read_group(stream, TRAINER_GROUP, self.consumer_name, count=10, block_ms=500)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading trainer commands failed: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)
                continue
            for entry in entries:
                try:
                    command = TrainerCommand.model_validate_json(entry.fields.get("data", ""))
                except ValueError:
                    log.error("dropping a malformed trainer command %s", entry.id)
                    await self.bus.ack(stream, TRAINER_GROUP, entry.id)
                    continue
                if command.expired:
                    log.warning("dropping %s command %s: sent %.0fs ago", command.op, command.request_id,
                                time.time() - command.ts)  # fmt: skip
                else:
                    reply = await self.handle(command)
                    await publish_model(self.bus, trainer_replies_stream(prefix), reply)
                await self.bus.ack(stream, TRAINER_GROUP, entry.id)

    async def handle(self, command: TrainerCommand) -> TrainerReply:
        """Run one operator command and say how it went (never raises)."""
        try:
            if command.op == "pause":
                self.paused = True
                message = "paused" + (f" (cycle {self.cycle} finishes its {self.phase} first)" if self.phase != "idle" else "")
            elif command.op == "resume":
                self.paused = False
                message = "resumed"
            elif command.op in ("promote", "rollback"):
                if not command.version:
                    return TrainerReply(request_id=command.request_id, ok=False, message=f"{command.op} needs a version")
                report = await self.serve_version(command.version, op=command.op, reason=command.reason)
                return TrainerReply(
                    request_id=command.request_id, ok=report.ok, message=report.summary(),
                    data={"report": report.model_dump(mode="json"), **await self.status()},
                )  # fmt: skip
            elif command.op == "status":
                message = "ok"
            else:
                return TrainerReply(request_id=command.request_id, ok=False, message=f"unknown op {command.op!r}")
            if self.metrics is not None:
                self.metrics.paused.set(1 if self.paused else 0)
            return TrainerReply(request_id=command.request_id, ok=True, message=message, data=await self.status())
        except Exception as exc:
            log.exception("trainer command %s failed", command.op)
            return TrainerReply(request_id=command.request_id, ok=False, message=f"{type(exc).__name__}: {exc}")

    async def status(self) -> dict[str, Any]:
        serving = await self._db(lambda s: registry.serving_version(s, model_id=self.model_id))
        return {
            "model_id": self.model_id,
            "method": self.config.method,
            "task": self.config.task,
            "paused": self.paused,
            "cycle": self.cycle,
            "phase": self.phase,
            "serving": serving.version if serving is not None else None,
            "pending_episodes": len(self._kept),
            "last": self.last,
        }
