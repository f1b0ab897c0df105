"""Dead-letter replay on genuine services: an index that refuses documents until the operator
fixes its mapping, `inflow dlq list|show|replay`, the replay-count loop guard, and every
replayed id indexed once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from elasticsearch import AsyncElasticsearch

from indexer import model_space, model_write_alias
from schemas import encode_event, parse_dead_letter_headers
from tests.e2e.conftest import ROOT, Names, WorkerFactory, read_topic
from tests.e2e.test_pipeline import _indexed_ids, _produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _dlq(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli.main", "dlq", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def _dead_letters(bootstrap: str, topic: str, expected: int) -> list[dict[str, str]]:
    records = await read_topic(bootstrap, topic, expected, timeout_s=120)
    assert len(records) == expected, f"{len(records)} dead letters on {topic}, not {expected}"
    return [parse_dead_letter_headers(list(headers.items())) for _, _, headers in records]


async def test_dead_letters_replayed_after_the_index_is_fixed_are_indexed_once(
    workers: WorkerFactory, names: Names, kafka_bootstrap: str, es_url: str
) -> None:
    # The alias's write index maps `label` as an integer: every prediction is refused for good.
    bad, good = f"{names.alias}-bad", f"{names.alias}-000002"
    async with AsyncElasticsearch(es_url) as es:
        await es.indices.create(
            index=bad,
            mappings={"properties": {"label": {"type": "integer"}}},
            aliases={names.alias: {"is_write_index": True}},
        )
    worker = workers.start()
    env = {**workers.env}
    ids = [f"dl-{i}" for i in range(12)]
    records = [(i.encode(), encode_event(f"the film number {i} was fine", id=i)) for i in ids]
    await _produce(kafka_bootstrap, names.texts, [*records, (b"blank", b'{"text": " "}')])

    dead = await _dead_letters(kafka_bootstrap, names.predictions_dlq, len(ids))
    assert {d["inflow.error.code"] for d in dead} == {"index_rejected"}
    assert {d["inflow.error.stage"] for d in dead} == {"index"}
    [version] = {d["inflow.engine.version"] for d in dead}
    assert "inflow.replay.count" not in dead[0]
    await _dead_letters(kafka_bootstrap, names.texts_dlq, 1)

    listed = json.loads(_dlq(env, "list", "--json"))
    assert len(listed) == len(ids) + 1
    by_stage = json.loads(_dlq(env, "list", "--json", "--stage", "index", "--since", "10m"))
    assert sorted(d["key"] for d in by_stage) == sorted(ids)
    assert {d["engine_version"] for d in by_stage} == {version}
    assert json.loads(_dlq(env, "list", "--json", "--engine-version", "no-such")) == []
    shown = _dlq(env, "show", by_stage[0]["position"])
    assert "code: index_rejected" in shown and f'"id":"{by_stage[0]["key"]}"' in shown

    # Replayed before the fix: each fails again and its new dead letter keeps the count (1) ...
    out = _dlq(env, "replay", "--code", "index_rejected", "--max-replays", "1")
    assert out.splitlines()[0] == f"replayed {len(ids)} ({len(ids)} to {names.predictions})"
    dead = await _dead_letters(kafka_bootstrap, names.predictions_dlq, 2 * len(ids))
    assert sorted(d.get("inflow.replay.count", "0") for d in dead) == ["0"] * 12 + ["1"] * 12
    # ... so with --max-replays 1 nothing loops, and nothing is replayed twice.
    out = _dlq(env, "replay", "--code", "index_rejected", "--max-replays", "1")
    assert out.startswith("replayed 0 (nothing)")
    assert f"skipped {len(ids)} already replayed" in out
    assert f"refused {len(ids)} replayed 1 times already" in out

    # The operator fixes the index (a new index with Inflow's mapping behind the read alias and
    # the model's write alias) and replays: the stage filter leaves the bad text event alone.
    model_alias = model_write_alias(names.alias, model_space(version))
    async with AsyncElasticsearch(es_url) as es:
        await es.indices.create(index=good)
        await es.indices.update_aliases(
            actions=[
                {"remove": {"index": bad, "alias": names.alias}},
                {"remove": {"index": bad, "alias": model_alias}},
                {"add": {"index": good, "alias": names.alias, "is_write_index": True}},
                {"add": {"index": good, "alias": model_alias, "is_write_index": True}},
            ]
        )
    out = _dlq(env, "replay", "--stage", "index")
    assert out.splitlines()[0] == f"replayed {len(ids)} ({len(ids)} to {names.predictions})"
    indexed = await _indexed_ids(es_url, names.alias, len(ids), timeout_s=120)
    assert sorted(indexed) == sorted(ids), "every replayed id indexed exactly once"
    await asyncio.sleep(2)  # nothing more arrives: no replay loops on
    assert sorted(await _indexed_ids(es_url, names.alias, len(ids), timeout_s=5)) == sorted(ids)
    assert _dlq(env, "replay", "--stage", "index").startswith("replayed 0 (nothing)")

    # The copies on the predictions topic: original key and bytes, and the replay count.
    copies = await read_topic(kafka_bootstrap, names.predictions, 3 * len(ids), timeout_s=60)
    originals = {key: value for key, value, h in copies if "inflow.replay.count" not in h}
    counts = sorted(h.get("inflow.replay.count", b"0") for _, _, h in copies)
    assert counts == [b"0"] * 12 + [b"1"] * 12 + [b"2"] * 12
    assert all(value == originals[key] for key, value, _ in copies)
    [pending] = [line for line in _dlq(env, "list").splitlines() if "pending" in line]
    assert "empty_text" in pending
    assert worker.proc.poll() is None
