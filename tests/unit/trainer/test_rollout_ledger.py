"""The slot engine's vectorized per-slot bookkeeping against a plain per-slot Python reference."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from trainer.rollout.ledger import ALWAYS, NEVER, SlotLedger

VOCAB = 50


def test_record_appends_to_live_rows_and_flags_eos_length_and_triggers() -> None:
    led = SlotLedger(n_slots=4, max_len=16, vocab=VOCAB, eos_ids=[7, 999, -1])  # out-of-range ids ignored
    trig = led.stop_row(frozenset({3, 4}))
    assert led.stop_row(frozenset({4, 3})) == trig  # one row per set
    led.admit(0, pos=5, max_new=10, stop=NEVER)
    led.admit(1, pos=2, max_new=2, stop=trig)
    led.admit(3, pos=9, max_new=10, stop=ALWAYS)
    rows = led.busy()
    assert rows.tolist() == [0, 1, 3]
    gens = led.gen[rows]
    led.advance(rows)
    assert led.pos[[0, 1, 3]].tolist() == [6, 3, 10] and led.pos[2] == 16

    n, flagged = led.record(rows, gens, np.array([1, 3, 0, 2]))  # slot 2 idle: its id is ignored
    assert n == 3
    assert flagged.tolist() == [1, 3]  # 3 is a trigger for slot 1; slot 3 checks after every id
    assert led.reasons(flagged) == ([1, 3], [False, False], [True, True], [False, False])

    n, flagged = led.record(rows, gens, np.array([7, 5, 0, 7]))
    assert n == 3 and flagged.tolist() == [0, 1, 3]
    slots, eos, trigger, full = led.reasons(flagged)
    assert eos == [True, False, True] and trigger == [False, False, True] and full == [False, True, False]
    assert led.output(0) == [1, 7] and led.output(1) == [3, 5] and led.output(3) == [2, 7]
    assert led.tail(0, 1) == [7] and led.tail(1, -64) == [3, 5] and led.tail(3, 2) == []


def test_rows_of_a_finished_or_readmitted_slot_are_skipped() -> None:
    led = SlotLedger(n_slots=2, max_len=8, vocab=VOCAB)
    led.admit(0, pos=1, max_new=5, stop=NEVER)
    led.admit(1, pos=1, max_new=5, stop=NEVER)
    rows = led.busy()
    step1, step2 = (rows, led.gen[rows]), (rows, led.gen[rows])  # two steps launched, still in flight
    led.record(*step1, np.array([4, 4]))
    led.retire(0)  # slot 0's request ended after step 1 ...
    led.admit(0, pos=3, max_new=5, stop=NEVER)  # ... and a new one took the slot before step 2 was read
    n, _ = led.record(*step2, np.array([9, 9]))
    assert n == 1
    assert led.output(0) == [] and led.output(1) == [4, 9]
    led.retire(1)
    assert led.busy().tolist() == [0] and led.pos[1] == 8


@dataclass
class _Ref:
    limit: int
    triggers: frozenset[int] | None  # None: every id
    out: list[int] = field(default_factory=list)


def test_matches_a_per_slot_reference_over_random_steps() -> None:
    rng = random.Random(0)
    n_slots, eos = 16, {0, 1}
    trig_sets = [frozenset(rng.sample(range(VOCAB), 5)) for _ in range(3)]
    led = SlotLedger(n_slots, max_len=64, vocab=VOCAB, eos_ids=eos)
    rows_of = {s: led.stop_row(s) for s in trig_sets}
    ref: dict[int, _Ref] = {}
    inflight: list[tuple[np.ndarray, np.ndarray, dict[int, _Ref]]] = []
    for _ in range(400):
        for slot in range(n_slots):  # admit into free slots now and then
            if slot not in ref and rng.random() < 0.3:
                kind = rng.choice(["none", "always", *trig_sets])
                trig: frozenset[int] | None = frozenset() if kind == "none" else None
                stop = NEVER if kind == "none" else ALWAYS
                if isinstance(kind, frozenset):
                    trig, stop = kind, rows_of[kind]
                ref[slot] = _Ref(limit=rng.randint(1, 30), triggers=trig)
                led.admit(slot, pos=rng.randint(0, 20), max_new=ref[slot].limit, stop=stop)
        rows = led.busy()
        assert rows.tolist() == sorted(ref)
        inflight.append((rows, led.gen[rows], dict(ref)))
        led.advance(rows)
        if len(inflight) <= 2:  # two steps in flight, as with pipeline_depth=2
            continue
        rows, gens, owners = inflight.pop(0)
        ids = np.array([rng.randrange(VOCAB) for _ in range(n_slots)])
        n, flagged = led.record(rows, gens, ids)
        expect_n, expect_flagged = 0, []
        for slot in rows.tolist():
            r = owners[slot]
            if ref.get(slot) is not r:  # finished, or the slot went to someone else
                continue
            tok = int(ids[slot])
            r.out.append(tok)
            expect_n += 1
            if tok in eos or len(r.out) >= r.limit or (r.triggers is None or tok in r.triggers):
                expect_flagged.append(slot)
        assert n == expect_n and flagged.tolist() == expect_flagged
        for slot in flagged.tolist():
            assert led.output(slot) == ref[slot].out
            # the engine retires a slot at its length limit, and at EOS or a stop match
            if len(ref[slot].out) >= ref[slot].limit or rng.random() < 0.7:
                del ref[slot]
                led.retire(slot)
