"""Which KV-cache slot a sequence gets: free slots, and finished slots kept for continuations.

A finished sequence's slot is *retained* with the ids whose K/V it holds. A new request whose ids
start with exactly those ids (and are longer) takes that slot back and prefills only the rest.
Retained slots are indexed by ``(session, first 16 ids)`` (all their ids when they hold fewer), so
finding a continuation costs a dict lookup per key length in use plus a list comparison per
candidate; a request without a session still matches, among the retained slots with the same first ids. When no slot is free, the least recently retained one is
evicted. Free slots are handed out lowest index first, which keeps the decode batch bucket small.

Limits: exact-prefix reuse only (no shared prefixes across sequences, no partial matches).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from typing import Any

_KEY_LEN = 16


class SlotPool:
    """Free and retained slots of one engine (pure bookkeeping; no tensors)."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self._free = list(range(n_slots))  # a heap
        self._retained: OrderedDict[int, list[int]] = OrderedDict()  # slot -> cached ids, LRU first
        self._index: dict[tuple[Any, ...], set[int]] = {}
        self._key: dict[int, tuple[Any, ...]] = {}
        self._short: Counter[int] = Counter()  # key lengths below _KEY_LEN in use -> retained slots

    @property
    def n_available(self) -> int:
        """Slots a request could get now (free or retained)."""
        return len(self._free) + len(self._retained)

    def take_continuation(self, session: str | None, ids: list[int]) -> tuple[int, int] | None:
        """The retained slot holding the longest proper prefix of ``ids``: ``(slot, cached length)``."""
        best, best_len = None, 0
        lengths = [_KEY_LEN, *(n for n in self._short if n < len(ids))]
        for slot in (s for n in lengths for s in self._index.get((session, *ids[:n]), ())):
            cached = self._retained[slot]
            n = len(cached)
            if best_len < n < len(ids) and ids[:n] == cached:
                best, best_len = slot, n
        if best is None:
            return None
        self._drop(best)
        return best, best_len

    def take_free(self) -> int | None:
        """A free slot, evicting the least recently retained cache if none is free."""
        if self._free:
            return heapq.heappop(self._free)
        if self._retained:
            slot = next(iter(self._retained))
            self._drop(slot)
            return slot
        return None

    def release(self, slot: int, session: str | None, cached: list[int] | None) -> None:
        """Give a slot back; with ``cached`` (the ids whose K/V it holds) it is retained for reuse."""
        if not cached:
            heapq.heappush(self._free, slot)
            return
        key = (session, *cached[:_KEY_LEN])
        self._retained[slot] = cached
        self._key[slot] = key
        self._index.setdefault(key, set()).add(slot)
        if len(cached) < _KEY_LEN:
            self._short[len(cached)] += 1

    def forget_caches(self) -> None:
        """Turn every retained slot into a free one (after a weight update)."""
        for slot in list(self._retained):
            self._drop(slot)
            heapq.heappush(self._free, slot)

    def _drop(self, slot: int) -> None:
        self._retained.pop(slot)
        key = self._key.pop(slot)
        if len(key) - 1 < _KEY_LEN:
            self._short[len(key) - 1] -= 1
            if not self._short[len(key) - 1]:
                del self._short[len(key) - 1]
        members = self._index[key]
        members.discard(slot)
        if not members:
            del self._index[key]
