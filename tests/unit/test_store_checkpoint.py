"""The organizer's checkpoint writer: latest only, debounced, skipped when little is new, never after the
final save (services.runtime.StoreCheckpoint)."""

from __future__ import annotations

import asyncio
import threading

from services.runtime import StoreCheckpoint
from shared.messages import SegmentRecord


class Recording(StoreCheckpoint):
    def __init__(self, **kw: object) -> None:
        super().__init__(lambda: None, "ep", **kw)  # type: ignore[arg-type]
        self.written: list[int] = []
        self.started = threading.Event()  # a write has begun (set in the writer's thread)
        self.gate = threading.Event()  # a write finishes only once this is set
        self.gate.set()

    def _save(self, segment: SegmentRecord) -> None:
        self.started.set()
        assert self.gate.wait(10), "the test never released the held write"
        self.written.append(segment.generated_tokens)


def seg(tokens: int) -> SegmentRecord:
    return SegmentRecord(agent="organizer", role="organizer", generated_tokens=tokens, completion_ids=[1] * tokens,
                         completion_mask=[1] * tokens)


async def settled(cp: Recording) -> None:
    """Wait until the background writer has taken every checkpoint it was handed and stopped (not a sleep:
    once it has stopped, nothing more can be written until the next checkpoint)."""
    writer = cp._writer
    assert writer is not None, "no writer was started"
    await asyncio.wait_for(asyncio.shield(writer), 10)


async def test_only_the_latest_checkpoint_is_written_after_the_delay() -> None:
    cp = Recording(delay_s=0.05, min_new_tokens=10)
    for n in (40, 50, 60):
        await cp.checkpoint("ep", seg(n))
    await cp.checkpoint("other", seg(99))  # another episode's: ignored
    assert cp.written == []  # nothing before the delay
    await settled(cp)
    assert cp.written == [60]
    await cp.checkpoint("ep", seg(65))  # 5 new tokens: not worth a write
    await cp.checkpoint("ep", seg(66))  # 6 new: neither
    await settled(cp)
    assert cp.written == [60]
    await cp.checkpoint("ep", seg(80))  # 20 new since the 60 written
    await settled(cp)
    assert cp.written == [60, 80] and cp.saved == 2


async def test_finish_drops_a_pending_checkpoint_and_waits_for_one_being_written() -> None:
    cp = Recording(delay_s=0.05, min_new_tokens=1)
    await cp.checkpoint("ep", seg(10))
    await cp.finish()  # before the delay: never written
    assert cp._writer is not None and cp._writer.done()  # the writer is gone: nothing can come later
    assert cp.written == [] and not cp.started.is_set()
    cp.gate.clear()
    await cp.checkpoint("ep", seg(20))
    assert await asyncio.to_thread(cp.started.wait, 10)  # the write has started and is held
    finishing = asyncio.create_task(cp.finish())
    for _ in range(5):  # let finish run up to its wait
        await asyncio.sleep(0)
    assert not finishing.done() and cp.written == []
    cp.gate.set()
    await asyncio.wait_for(finishing, 10)
    assert cp.written == [20]
