"""Per-slot host bookkeeping of the slot engine, as numpy arrays over the whole batch.

Purpose: after each decode step the engine must append every busy slot's sampled id to its output
and decide which slots finished (EOS, the length budget, or an id after which the stop regex must be
searched). Done slot by slot in Python this costs more host time than the GPU step at batch 1024, so
:class:`SlotLedger` keeps the per-slot state in arrays and does the append and the three checks with
a handful of numpy operations per step; only the few slots it flags go back to Python.

The checks are table lookups: ``eos[id]`` and ``stops[row, id]``, where each slot names a row of the
stop table: :data:`NEVER` (no stop regex), :data:`ALWAYS` (a regex whose last character is unknown:
search after every id) or a row added by :meth:`SlotLedger.stop_row` for a set of trigger ids
(see :mod:`trainer.rollout.stops`).

Limits: pure host state, no tensors and no I/O; ids must lie in ``0 .. vocab-1`` (the sampler's
range); an output holds at most ``max_len + 1`` ids (the engine caps a request's budget below that).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NEVER = 0  # stop-table row: no stop regex
ALWAYS = 1  # stop-table row: search after every id


class SlotLedger:
    """Host-side state of every slot; one step's sampled ids are recorded for the whole batch at once."""

    def __init__(self, n_slots: int, max_len: int, vocab: int, eos_ids: Iterable[int] = ()) -> None:
        self.max_len, self.vocab = max_len, vocab
        self.live = np.zeros(n_slots, dtype=bool)  # the slot holds an unfinished request
        self.gen = np.zeros(n_slots, dtype=np.int64)  # bumped per admission: tells old owners from new
        self.pos = np.full(n_slots, max_len, dtype=np.int64)  # next position fed (mirrors the device's)
        self.n_out = np.zeros(n_slots, dtype=np.int64)  # ids delivered to the slot's request
        self.limit = np.zeros(n_slots, dtype=np.int64)  # its max_new_tokens
        self.stop = np.zeros(n_slots, dtype=np.int64)  # its row of the stop table
        self.out = np.zeros((n_slots, max_len + 1), dtype=np.int32)  # its output ids so far
        self.stops = np.zeros((2, vocab), dtype=bool)  # [rows, V]: search the regex after this id?
        self.stops[ALWAYS] = True
        self._stop_rows: dict[frozenset[int], int] = {}
        self.eos = np.zeros(vocab, dtype=bool)
        self.set_eos(eos_ids)

    def set_eos(self, eos_ids: Iterable[int]) -> None:
        """The ids that end a request (ids outside the vocabulary can never be sampled: ignored)."""
        self.eos[:] = False
        ids = [i for i in eos_ids if 0 <= i < self.vocab]
        self.eos[ids] = True

    def stop_row(self, trigger_ids: frozenset[int]) -> int:
        """The stop-table row for a set of trigger ids (added on first use)."""
        row = self._stop_rows.get(trigger_ids)
        if row is None:
            new = np.zeros((1, self.vocab), dtype=bool)
            new[0, [i for i in trigger_ids if 0 <= i < self.vocab]] = True
            self.stops = np.concatenate([self.stops, new])
            row = self._stop_rows[trigger_ids] = len(self.stops) - 1
        return row

    # ------------------------------------------------------------------ one slot at a time
    def admit(self, slot: int, pos: int, max_new: int, stop: int) -> None:
        """A request takes ``slot``; its next fed id sits at position ``pos``."""
        self.live[slot] = True
        self.gen[slot] += 1
        self.pos[slot] = pos
        self.n_out[slot] = 0
        self.limit[slot] = max_new
        self.stop[slot] = stop

    def retire(self, slot: int) -> None:
        self.live[slot] = False
        self.pos[slot] = self.max_len

    def output(self, slot: int) -> list[int]:
        """The ids delivered so far to the request in ``slot``."""
        return self.out[slot, : self.n_out[slot]].tolist()

    def tail(self, slot: int, start: int) -> list[int]:
        """The ids delivered to the request in ``slot`` from index ``max(start, 0)`` on."""
        return self.out[slot, max(start, 0) : self.n_out[slot]].tolist()

    # ------------------------------------------------------------------ the whole batch
    def busy(self) -> np.ndarray:
        """Busy slots, ascending: ``[n]`` int64."""
        return np.flatnonzero(self.live)

    def advance(self, rows: np.ndarray) -> None:
        """A step was launched for ``rows``: their next positions move on by one."""
        self.pos[rows] += 1

    def record(self, rows: np.ndarray, gens: np.ndarray, ids: np.ndarray) -> tuple[int, np.ndarray]:
        """Append one step's ``ids`` (``[B]``, indexed by slot) to the requests that still own ``rows``.

        ``rows``/``gens``: the busy slots when the step was launched and their :attr:`gen` then; a row
        whose request finished (or whose slot went to another request) since is skipped. Returns the
        number of ids delivered and the slots to look at on the host: those whose id is an EOS id or a
        stop trigger, or whose output reached its limit.
        """
        rows = rows[self.live[rows] & (self.gen[rows] == gens)]  # [n]
        tok = ids[rows]  # [n]
        n = self.n_out[rows]  # [n] ids before this one
        self.out[rows, n] = tok
        n += 1
        self.n_out[rows] = n
        flag = self.eos[tok] | (n >= self.limit[rows]) | self.stops[self.stop[rows], tok]  # [n]
        return len(rows), rows[flag]

    def reasons(self, rows: np.ndarray) -> tuple[list[int], list[bool], list[bool], list[bool]]:
        """For the flagged ``rows`` (after :meth:`record`): the slots, and per slot whether its last id
        is an EOS id, whether it is a stop trigger, and whether the output reached its limit."""
        last = self.out[rows, self.n_out[rows] - 1]  # [n]
        eos = self.eos[last]
        trigger = self.stops[self.stop[rows], last]
        full = self.n_out[rows] >= self.limit[rows]
        return rows.tolist(), eos.tolist(), trigger.tolist(), full.tolist()
