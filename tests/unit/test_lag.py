"""LagTracker: lag from offsets, and when each partition last made progress (no I/O)."""

from __future__ import annotations

import pytest

from streams.lag import ConsumerLag, LagTracker, merge_samples

T0, T1 = ("texts", 0), ("texts", 1)


def test_lag_is_end_minus_committed_or_log_start_when_nothing_is_committed() -> None:
    sample = LagTracker().update(
        now=100.0, end_offsets={T0: 50, T1: 30}, committed={T0: 45, T1: None}, log_start={T1: 10}
    )
    assert sample.lag == {T0: 5, T1: 20}
    assert sample.total == 25
    assert sample.partitions[T1].position == 10
    assert sample.taken_at == 100.0


def test_committed_past_the_end_counts_as_no_lag() -> None:
    sample = LagTracker().update(now=1.0, end_offsets={T0: 10}, committed={T0: 12})
    assert sample.lag == {T0: 0}


def test_a_lagging_partition_that_does_not_advance_stalls() -> None:
    tracker = LagTracker()
    first = tracker.update(now=0.0, end_offsets={T0: 100}, committed={T0: 10})
    assert first.partitions[T0].idle_s == 0.0  # newly seen: a grace period starts now
    moving = tracker.update(now=30.0, end_offsets={T0: 120}, committed={T0: 40})
    assert moving.partitions[T0].progress_at == 30.0 and moving.stalled(60) == []
    stuck = tracker.update(now=100.0, end_offsets={T0: 150}, committed={T0: 40})
    (stalled,) = stuck.stalled(60)
    assert (stalled.topic, stalled.partition, stalled.lag) == ("texts", 0, 110)
    assert stalled.idle_s == 70.0
    assert stuck.stalled(80) == []


def test_caught_up_counts_as_progress_so_new_records_do_not_look_stalled() -> None:
    tracker = LagTracker()
    tracker.update(now=0.0, end_offsets={T0: 10}, committed={T0: 10})
    tracker.update(now=500.0, end_offsets={T0: 10}, committed={T0: 10})
    sample = tracker.update(now=501.0, end_offsets={T0: 11}, committed={T0: 10})
    assert sample.partitions[T0].idle_s == 1.0
    assert sample.stalled(60) == []
    assert sample.last_progress == 500.0


def test_partitions_no_longer_assigned_are_forgotten_and_start_fresh_when_back() -> None:
    tracker = LagTracker()
    tracker.update(now=0.0, end_offsets={T0: 100, T1: 100}, committed={T0: 0, T1: 0})
    only_t1 = tracker.update(now=10.0, end_offsets={T1: 100}, committed={T1: 0})
    assert set(only_t1.partitions) == {T1}
    back = tracker.update(now=500.0, end_offsets={T0: 100, T1: 100}, committed={T0: 0, T1: 0})
    assert back.partitions[T0].idle_s == 0.0  # reassigned: a new grace period
    assert back.partitions[T1].idle_s == 500.0


def test_an_empty_assignment_has_no_lag() -> None:
    sample = LagTracker().update(now=1.0, end_offsets={}, committed={})
    assert sample.lag == {} and sample.total == 0 and sample.last_progress is None


async def test_consumer_lag_refuses_a_sample_before_start_and_bad_timeouts() -> None:
    with pytest.raises(ValueError):
        ConsumerLag("g", lambda: [], {"bootstrap_servers": "127.0.0.1:1"}, timeout_s=0)
    lag = ConsumerLag("g", lambda: [], {"bootstrap_servers": "127.0.0.1:1"})
    assert lag.last is None
    with pytest.raises(RuntimeError):
        await lag.sample()
    await lag.stop()  # safe without start


def test_samples_of_two_groups_merge_so_a_stall_in_either_is_seen() -> None:
    # An exactly-once worker: the predictions in Faust's group, the texts in a group of its own.
    faust = LagTracker().update(now=10.0, end_offsets={("predictions", 0): 5}, committed={})
    texts = LagTracker()
    texts.update(now=0.0, end_offsets={T0: 9}, committed={T0: 1})
    stuck = texts.update(now=20.0, end_offsets={T0: 9}, committed={T0: 1})
    merged = merge_samples([faust, stuck])
    assert merged is not None
    assert merged.lag == {("predictions", 0): 5, T0: 8}
    assert [p.topic for p in merged.stalled(15)] == ["texts"]
    assert merged.taken_at == 10.0  # as old as its oldest part
    assert merge_samples([faust, None]) is None, "one group not sampled yet: no verdict"
    assert merge_samples([faust]) is faust
