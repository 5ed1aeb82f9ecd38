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
        self.gate = threading.Event()
        self.gate.set()

    def _save(self, segment: SegmentRecord) -> None:
        self.gate.wait(5)
        self.written.append(segment.generated_tokens)


def seg(tokens: int) -> SegmentRecord:
    return SegmentRecord(agent="organizer", role="organizer", generated_tokens=tokens, completion_ids=[1] * tokens,
                         completion_mask=[1] * tokens)


async def test_only_the_latest_checkpoint_is_written_after_the_delay() -> None:
    cp = Recording(delay_s=0.05, min_new_tokens=10)
    for n in (40, 50, 60):
        await cp.checkpoint("ep", seg(n))
    await cp.checkpoint("other", seg(99))  # another episode's: ignored
    await asyncio.sleep(0.2)
    assert cp.written == [60]
    await cp.checkpoint("ep", seg(65))  # 5 new tokens: not worth a write
    await cp.checkpoint("ep", seg(66))
    await asyncio.sleep(0.2)
    assert cp.written == [60]
    await cp.checkpoint("ep", seg(80))
    await asyncio.sleep(0.2)
    assert cp.written == [60, 80]


async def test_finish_drops_a_pending_checkpoint_and_waits_for_one_being_written() -> None:
    cp = Recording(delay_s=0.05, min_new_tokens=1)
    await cp.checkpoint("ep", seg(10))
    await cp.finish()  # before the delay: never written
    await asyncio.sleep(0.15)
    assert cp.written == []
    cp.gate.clear()
    await cp.checkpoint("ep", seg(20))
    await asyncio.sleep(0.1)  # the write has started and is held
    finishing = asyncio.create_task(cp.finish())
    await asyncio.sleep(0.05)
    assert not finishing.done()
    cp.gate.set()
    await asyncio.wait_for(finishing, 2)
    assert cp.written == [20]
