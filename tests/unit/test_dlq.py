"""`inflow dlq`: selection, the replay plan and the loop guard, without Kafka."""

from __future__ import annotations

import pytest

from schemas import DecodeError, ErrorCode, dead_letter_headers, encode_event
from streams.cli.dlq import (
    DeadLetter,
    Selection,
    parse_time,
    plan_replay,
    replay_headers,
    replays_topic,
)
from streams.cli.main import build_parser
from streams.cli.records import Record
from streams.errors import ConfigError


def _dead(
    offset: int,
    code: ErrorCode = ErrorCode.INDEX_REJECTED,
    stage: str = "index",
    *,
    ts_ms: int = 1_000,
    count: int = 0,
    version: str | None = "v1",
    value: bytes | None = b"{}",
    topic: str = "p.dlq",
) -> DeadLetter:
    headers = dead_letter_headers(
        DecodeError(code, "m"),
        topic="preds",
        partition=0,
        offset=offset,
        stage=stage,
        replay_count=count,
        engine_version=version,
    )
    return DeadLetter.of(Record(topic, 0, offset, ts_ms, b"k", value, headers))


def test_parse_time_takes_rfc3339_epoch_ms_and_ages() -> None:
    assert parse_time("2026-11-25T10:00:00Z") == 1_795_600_800_000
    assert parse_time("1795600800000") == 1_795_600_800_000
    assert parse_time("30m", now_ms=10_000_000) == 10_000_000 - 1_800_000
    assert parse_time("2h", now_ms=10_000_000) == 10_000_000 - 7_200_000
    with pytest.raises(ConfigError, match="RFC 3339"):
        parse_time("yesterday")


def test_selection_filters_code_stage_version_and_time() -> None:
    rejected = _dead(1, ts_ms=5_000)
    decode = _dead(2, ErrorCode.INVALID_JSON, "decode", version=None, ts_ms=9_000)
    assert Selection().matches(rejected) and Selection().matches(decode)
    assert not Selection(codes=frozenset({"invalid_json"})).matches(rejected)
    assert Selection(stages=frozenset({"decode"})).matches(decode)
    assert Selection(engine_versions=frozenset({"v1"})).matches(rejected)
    assert not Selection(engine_versions=frozenset({"v1"})).matches(decode)
    assert not Selection(since_ms=6_000).matches(rejected)
    assert Selection(since_ms=6_000, until_ms=9_001).matches(decode)
    with pytest.raises(ConfigError, match="unknown error code"):
        Selection(codes=frozenset({"nope"}))
    with pytest.raises(ConfigError, match="unknown stage"):
        Selection(stages=frozenset({"nope"}))


def test_engine_version_falls_back_to_the_prediction_value() -> None:
    value = b'{"id": "a", "model": {"version": "v7"}}'
    assert _dead(1, version=None, value=value).engine_version == "v7"
    assert _dead(1, version=None, value=b"not json").engine_version is None
    decode = _dead(1, ErrorCode.INVALID_JSON, "decode", version=None, value=value)
    assert decode.engine_version is None  # a text event's value names no engine


def test_replay_plan_refuses_loops_and_never_replays_twice() -> None:
    fresh, again, looping = _dead(1), _dead(2, count=1), _dead(3, count=3)
    done = _dead(4)
    plan = plan_replay([fresh, again, looping, done], {done.position}, max_replays=3)
    assert plan.replay == [fresh, again]
    assert plan.refused == [looping]
    assert plan.already == [done]
    assert replay_headers(fresh) == [("inflow.replay.count", b"1")]
    assert replay_headers(again) == [("inflow.replay.count", b"2")]
    assert replays_topic("inflow.texts.dlq") == "inflow.texts.dlq.replays"


def test_a_dead_letter_without_source_topic_is_not_replayed() -> None:
    record = Record("t.dlq", 0, 5, 1, None, encode_event("x"), [("inflow.error.code", b"x")])
    plan = plan_replay([DeadLetter.of(record)], set(), max_replays=3)
    assert plan.unroutable and not plan.replay


def test_dlq_commands_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["dlq", "replay", "--code", "index_rejected", "--code", "invalid_json", "--since", "2h"]
    )
    assert args.code == ["index_rejected", "invalid_json"] and args.max_replays == 3
    assert parser.parse_args(["dlq", "show", "t.dlq:0:5"]).position == "t.dlq:0:5"
    assert parser.parse_args(["dlq", "list", "--topic", "texts"]).topic == "texts"
