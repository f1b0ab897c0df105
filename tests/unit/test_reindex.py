"""`inflow reindex` and one index per model, without services."""

from __future__ import annotations

import pytest

from indexer import model_index_name, model_space, model_write_alias
from streams.cli.main import build_parser
from streams.cli.reindex import Progress, parse_offsets
from streams.errors import ConfigError


def test_a_model_space_is_the_model_hash_of_the_engine_version() -> None:
    assert model_space("v3-onnxruntime-int8-b12d8b7e") == "b12d8b7e"
    assert model_space("v4-onnxruntime-fp32-b12d8b7e") == "b12d8b7e"  # same model, same space
    assert model_space("v-test") == "v-test" and model_space("My Model!") == "my-model"
    assert model_write_alias("inflow-predictions", "b12d8b7e") == "inflow-predictions.b12d8b7e"
    assert model_index_name("inflow-predictions", "b12d8b7e") == "inflow-predictions-b12d8b7e"


def test_offsets_and_progress() -> None:
    assert parse_offsets("0:120, 1:98") == {0: 120, 1: 98}
    with pytest.raises(ConfigError, match="PARTITION:OFFSET"):
        parse_offsets("0=120")
    progress = Progress(done=30, lag=10)
    progress.started -= 3.0  # 10 events/s
    assert progress.eta_s == pytest.approx(1.0, rel=0.1)
    assert "30/40 re-embedded, lag 10" in progress.bar("backfill")


def test_reindex_command_parses() -> None:
    args = build_parser().parse_args(["reindex", "--version", "v2-x-y-ab", "--from-offset", "0:5"])
    assert (args.version, args.from_offset, args.activate, args.rollback) == (
        "v2-x-y-ab",
        "0:5",
        True,
        False,
    )
    assert build_parser().parse_args(["reindex", "--rollback"]).rollback
