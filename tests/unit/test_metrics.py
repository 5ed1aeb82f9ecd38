"""Critical-path latency T and concurrency η against hand-worked examples (the README's Metrics section)."""

import pytest

from shared.metrics import (
    Decode,
    ForkStep,
    Interval,
    JoinStep,
    Timeline,
    concurrency,
    critical_path,
    parallel_metrics,
    schedule,
    tokens_decoded,
)


def worker(n: int) -> Timeline:
    return Timeline.of(Decode(n))


def test_no_forks_is_sequential_length() -> None:
    tl = Timeline.of(Decode(40), Decode(60))
    assert critical_path(tl) == 100
    assert concurrency(tl) == 1.0


def test_fork_then_immediate_join_waits_for_the_whole_worker() -> None:
    # organizer: 10 tokens, fork a 30-token worker, join at once (t=10), then 5 tokens.
    tl = Timeline.of(Decode(10), ForkStep(1, worker(30)), JoinStep(1), Decode(5))
    # clock jumps to max(10, 10 + 30) = 40, then +5
    assert critical_path(tl) == 45
    # busy steps: organizer 15 + worker 30 = 45 over T = 45 -> nobody decodes during... no:
    # steps 10..40 only the worker decodes (a=1), 0..10 and 40..45 only the organizer (a=1).
    assert concurrency(tl) == pytest.approx(1.0)


def test_two_overlapping_workers_with_a_join_that_waits() -> None:
    # t=0..10 organizer; fork A (50 tokens) at 10; organizer 20 more; fork B (15) at 30;
    # organizer 10 more (t=40); join B (ends 45 -> waits to 45); join A (ends 60 -> waits to 60); 8 more.
    tl = Timeline.of(
        Decode(10),
        ForkStep(1, worker(50)),
        Decode(20),
        ForkStep(2, worker(15)),
        Decode(10),
        JoinStep(2),
        JoinStep(1),
        Decode(8),
    )
    assert critical_path(tl) == 68
    # Σ a_t = organizer 48 + worker A 50 + worker B 15 = 113
    assert concurrency(tl) == pytest.approx(113 / 68)


def test_join_of_an_already_finished_worker_does_not_advance_the_clock() -> None:
    # worker of 5 tokens forked at 10 ends at 15; the join happens at 30: no jump.
    tl = Timeline.of(Decode(10), ForkStep(1, worker(5)), Decode(20), JoinStep(1), Decode(10))
    assert critical_path(tl) == 40
    assert concurrency(tl) == pytest.approx((40 + 5) / 40)


def test_unjoined_worker_counts_only_until_the_end() -> None:
    tl = Timeline.of(Decode(10), ForkStep(1, worker(100)), Decode(20))
    assert critical_path(tl) == 30
    assert concurrency(tl) == pytest.approx((30 + 20) / 30)


def test_recursive_worker_runs_on_its_own_clock() -> None:
    # worker 1 forked at 4: decodes 6 (to 10), forks 1.1 (20 tokens, ends 30), decodes 2, joins (30), decodes 3 -> 33
    child = Timeline.of(Decode(6), ForkStep(1, worker(20)), Decode(2), JoinStep(1), Decode(3))
    tl = Timeline.of(Decode(4), ForkStep(1, child), JoinStep(1), Decode(1))
    sched = schedule(tl)
    assert sched.end == 34
    agents = {iv.agent for iv in sched.intervals}
    assert agents == {"organizer", "1", "1.1"}
    assert tokens_decoded(tl) == 4 + 1 + 6 + 2 + 3 + 20


def test_parallel_metrics_use_the_longest_trace() -> None:
    assert parallel_metrics([100, 250, 200]) == (250, pytest.approx(550 / 250))
    assert parallel_metrics([]) == (0, 0.0)


def test_empty_and_invalid_timelines() -> None:
    assert critical_path(Timeline()) == 0
    assert concurrency(Timeline()) == 0.0
    with pytest.raises(ValueError, match="not forked"):
        critical_path(Timeline.of(JoinStep(3)))


def test_json_round_trip() -> None:
    tl = Timeline.of(Decode(3), ForkStep(2, Timeline.of(Decode(4))), JoinStep(2))
    assert Timeline.from_json(tl.to_json()) == tl


def test_spans_start_at_the_fork_and_include_waits() -> None:
    child = Timeline.of(Decode(6), ForkStep(1, worker(20)), Decode(2), JoinStep(1), Decode(3))
    tl = Timeline.of(Decode(4), ForkStep(1, child), ForkStep(2, Timeline()), JoinStep(1), Decode(1))
    spans = {s.agent: (s.start, s.end) for s in schedule(tl).spans}
    # worker 1 starts at its fork (4), waits for 1.1 (ends 30), decodes 3 more -> 33; a 0-token tool at 4
    assert spans == {"organizer": (0, 34), "1": (4, 33), "1.1": (10, 30), "2": (4, 4)}


@pytest.mark.parametrize("tokens", [-1, -5])
def test_a_negative_decode_count_is_rejected_on_every_path(tokens: int) -> None:
    message = f"a decode step cannot have a negative token count (got {tokens})"
    # the step itself refuses it, so schedule(), critical_path(), concurrency() and tokens_decoded()
    # can never see one; a stored timeline with one fails to load
    with pytest.raises(ValueError) as err:
        Decode(tokens)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        Timeline.from_json([["decode", 3], ["fork", 1, [["decode", tokens]]]])
    assert str(err.value) == message


def test_a_zero_token_decode_is_valid_and_occupies_no_step() -> None:
    tl = Timeline.of(Decode(0), Decode(3), ForkStep(1, Timeline.of(Decode(0))), Decode(0))
    sched = schedule(tl)
    assert sched.end == 3
    assert sched.intervals == (Interval("organizer", 0, 3),)  # no empty interval for either 0
    assert tokens_decoded(tl) == 3
    assert concurrency(tl) == 1.0


def test_workers_running_past_the_end_count_nothing_after_t() -> None:
    # organizer decodes 10, forks worker 1, decodes 20 more: T = 30, never joins.
    # worker 1 (from t=10) decodes 50 ([10, 60)) then forks 1.1 at 60, which decodes 20 ([60, 80)).
    # Inside [0, 30): organizer 30 + worker 1 20 (10..30) + worker 1.1 0 (it starts after T) = 50.
    inner = Timeline.of(Decode(50), ForkStep(1, worker(20)))
    tl = Timeline.of(Decode(10), ForkStep(1, inner), Decode(20))
    assert critical_path(tl) == 30
    assert concurrency(tl) == pytest.approx(50 / 30)
    # a worker forked at the very end decodes only after T: it adds nothing, η = 10 / 10
    assert concurrency(Timeline.of(Decode(10), ForkStep(1, worker(5)))) == 1.0


def test_unknown_json_step_names_it() -> None:
    with pytest.raises(ValueError) as err:
        Timeline.from_json([["decode", 1], ["wait", 3]])
    assert str(err.value) == "unknown timeline step 'wait'"
