"""LagTracker: lag from offsets, and when each partition last made progress (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.ops.lag import ConsumerLag, LagTracker, merge_samples

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


# Transaction markers: what a probe found between the committed offset and the log end.

P = ("predictions", 0)


def test_a_gap_of_markers_only_is_no_lag_and_counts_as_caught_up() -> None:
    # An exactly-once writer's partition: the group committed last data + 1, the commit marker
    # after it keeps the log end one further.
    tracker = LagTracker()
    assert tracker.to_probe({P: 41}, {P: 40}) == {P: (40, 41)}, "new and lagging: probe"
    tracker.record_probe(P, (40, 41), markers_only=True)
    first = tracker.update(now=0.0, end_offsets={P: 41}, committed={P: 40})
    assert first.lag == {P: 0} and first.partitions[P].markers == 1
    assert tracker.to_probe({P: 41}, {P: 40}) == {}, "answer kept: an idle worker does not re-probe"
    idle = tracker.update(now=600.0, end_offsets={P: 41}, committed={P: 40})
    assert idle.partitions[P].progress_at == 600.0 and idle.stalled(5) == []
    assert idle.total == 0 and idle.partitions[P].markers == 1


def test_markers_are_known_only_for_the_gap_probed_records_since_may_be_data() -> None:
    tracker = LagTracker()
    tracker.record_probe(P, (40, 41), markers_only=True)
    tracker.update(now=0.0, end_offsets={P: 41}, committed={P: 40})
    grown = tracker.update(now=1.0, end_offsets={P: 44}, committed={P: 40})
    assert grown.lag == {P: 4} and grown.partitions[P].markers == 0
    assert tracker.to_probe({P: 44}, {P: 40}) == {P: (40, 44)}, "a new gap: probe again"


def test_real_records_found_stay_lag_and_still_stall_without_another_probe() -> None:
    tracker = LagTracker()
    tracker.update(now=0.0, end_offsets={P: 50}, committed={P: 40})
    assert tracker.to_probe({P: 50}, {P: 40}) == {P: (40, 50)}
    tracker.record_probe(P, (40, 50), markers_only=False)
    assert tracker.to_probe({P: 50}, {P: 40}) == {}
    assert tracker.to_probe({P: 60}, {P: 40}) == {}, "the records found are still there"
    stuck = tracker.update(now=10.0, end_offsets={P: 60}, committed={P: 40})
    (stalled,) = stuck.stalled(5)
    assert (stalled.lag, stalled.markers, stalled.idle_s) == (20, 0, 10.0)


def test_an_undecided_probe_leaves_the_lag_and_a_stall_is_not_excused() -> None:
    # No record_probe: the probe timed out, or an open transaction held read_committed back.
    tracker = LagTracker()
    tracker.update(now=0.0, end_offsets={P: 41}, committed={P: 40})
    assert tracker.to_probe({P: 41}, {P: 40}) == {P: (40, 41)}, "asked again next time"
    stuck = tracker.update(now=10.0, end_offsets={P: 41}, committed={P: 40})
    assert [p.lag for p in stuck.stalled(5)] == [1]


def test_a_moving_or_caught_up_group_is_not_probed() -> None:
    tracker = LagTracker()
    tracker.update(now=0.0, end_offsets={P: 100, T0: 10}, committed={P: 10, T0: 10})
    assert tracker.to_probe({P: 150, T0: 10}, {P: 60, T0: 10}) == {}, "moved: progress anyway"
    tracker.update(now=1.0, end_offsets={P: 150, T0: 10}, committed={P: 60, T0: 10})
    assert tracker.to_probe({P: 150, T0: 10}, {P: 60, T0: 10}) == {P: (60, 150)}, "stood still"


def test_a_probe_answer_is_dropped_once_the_group_moves_or_loses_the_partition() -> None:
    tracker = LagTracker()
    tracker.record_probe(P, (40, 41), markers_only=True)
    tracker.update(now=0.0, end_offsets={P: 41}, committed={P: 40})
    tracker.update(now=1.0, end_offsets={P: 45}, committed={P: 44})
    assert tracker.markers_only(P, 40, 41) is None
    tracker.record_probe(P, (44, 45), markers_only=True)
    tracker.update(now=2.0, end_offsets={T0: 1}, committed={T0: 1})  # P revoked
    assert tracker.markers_only(P, 44, 45) is None


def test_a_gap_from_the_log_start_is_probed_when_nothing_is_committed() -> None:
    # Every transaction aborted (or only markers written): the group has nothing to commit.
    tracker = LagTracker()
    assert tracker.to_probe({P: 6}, {P: None}, {P: 0}) == {P: (0, 6)}
    tracker.record_probe(P, (0, 6), markers_only=True)
    sample = tracker.update(now=0.0, end_offsets={P: 6}, committed={P: None}, log_start={P: 0})
    assert sample.lag == {P: 0} and sample.partitions[P].markers == 6


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 30),  # committed
            st.integers(0, 30),  # end
            st.sampled_from([None, True, False]),  # what a probe found (None: undecided)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_lag_and_markers_split_what_the_group_has_left(
    steps: list[tuple[int, int, bool | None]],
) -> None:
    tracker = LagTracker()
    for now, (committed, end, found) in enumerate(steps):
        for key, gap in tracker.to_probe({P: end}, {P: committed}).items():
            if found is not None:
                tracker.record_probe(key, gap, markers_only=found)
        part = tracker.update(float(now), {P: end}, {P: committed}).partitions[P]
        assert part.lag >= 0 and part.markers >= 0
        assert part.lag + part.markers == max(0, end - committed)
        assert part.markers == 0 or part.lag == 0, "all of a gap is markers, or none of it"
        if part.markers:
            assert tracker.markers_only(P, committed, end) is True


async def test_consumer_lag_refuses_a_probe_timeout_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="probe_timeout_s"):
        ConsumerLag("g", lambda: [], {"bootstrap_servers": "127.0.0.1:1"}, probe_timeout_s=0)
