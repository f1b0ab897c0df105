"""`inflow batch-bench`: how the batching policy trades throughput against queueing delay.

Feeds the same real texts through the Batcher with the active engine, once per policy, as
Kafka delivers them: in bursts of `--burst` texts. Prints texts/s and p50/p95 time from
submit to answer per policy; all rows are measured in one run on the same texts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engines.types import Engine
from streams.config import Settings
from streams.delivery.batcher import Batcher, BatchPolicy


@dataclass(frozen=True, slots=True)
class PolicyResult:
    max_batch_size: int
    max_batch_tokens: int
    max_wait_ms: int
    texts_per_s: float
    p50_ms: float
    p95_ms: float
    mean_batch: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    engine: Engine, texts: list[str], policy: BatchPolicy, burst: int
) -> PolicyResult:
    batcher = Batcher(engine, policy)
    await batcher.start()
    latencies: list[float] = []

    async def one(text: str) -> None:
        started = time.perf_counter()
        await batcher.submit(text)
        latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    tasks = []
    for i in range(0, len(texts), burst):
        tasks += [asyncio.create_task(one(t)) for t in texts[i : i + burst]]
        await asyncio.sleep(0)  # let the batcher see a burst, as a fetch from Kafka gives
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    await batcher.stop()
    sizes = batcher.stats.batch_size_histogram
    mean_batch = sum(size * n for size, n in sizes.items()) / max(1, sum(sizes.values()))
    return PolicyResult(
        batcher.policy.max_batch_size,
        policy.max_batch_tokens,
        policy.max_wait_ms,
        len(texts) / elapsed,
        statistics.median(latencies),
        _percentile(latencies, 0.95),
        mean_batch,
    )


def run_batch_bench(
    settings: Settings,
    *,
    n: int,
    sizes: list[int],
    token_budgets: list[int],
    waits: list[int],
    burst: int,
    json_path: Path | None,
) -> int:
    from engines.builder.data import sample_texts
    from engines.load import load_engine

    engine = load_engine(settings.engine_dir, settings.engine_version or None)
    texts = sample_texts(n, seed=1)
    engine.predict(texts[:32])  # warm-up
    policies = [
        BatchPolicy(size, tokens, wait)
        for size in sizes
        for tokens in token_budgets
        for wait in waits
    ]
    identity = engine.identity
    print(f"engine {identity.version}; {len(texts)} real tweets; bursts of {burst}")
    header = f"{'batch':>5} {'tokens':>7} {'wait ms':>7} {'texts/s':>8} {'p50 ms':>8} {'p95 ms':>8}"
    print(header + f" {'mean batch':>10}")
    results = []
    for i, policy in enumerate(policies, 1):
        print(f"  [{i}/{len(policies)}] measuring {policy}", file=sys.stderr, end="\r")
        result = asyncio.run(measure(engine, texts, policy, burst))
        results.append(result)
        print(
            f"{result.max_batch_size:>5} {result.max_batch_tokens:>7} {result.max_wait_ms:>7} "
            f"{result.texts_per_s:>8.1f} {result.p50_ms:>8.0f} {result.p95_ms:>8.0f} "
            f"{result.mean_batch:>10.1f}"
        )
    engine.close()
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {"engine": asdict(identity), "n": len(texts), "burst": burst,
                 "results": [asdict(r) for r in results]},
                indent=2,
            )
        )  # fmt: skip
    return 0
