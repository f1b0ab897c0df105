"""`inflow bench pipeline --pin / --policies`: the worker's own tail, placed and batched.

For each placement (unpinned; pinned: the worker on its own cores, Kafka, the search server and
this load generator on the others, by `sched_setaffinity` on every thread) and each batching
policy (fixed knobs "SIZE/TOKENS/WAIT_MS", or "target" for INFLOW_LATENCY_TARGET_MS), one fresh
worker process:
  1. drains a backlog of N real texts: its capacity (events/s);
  2. is offered events at one fixed rate, the same for every policy of the placement: a
     fraction of the first policy's drain rate;
  3. reports, from its own histograms over that phase, the p50/p99 of "record taken ->
     prediction acknowledged" (the latency the target holds), the median batch time and the
     batch sizes it chose, and the cores each process used.
"target auto" is 3x the median batch time the first policy ran at that load in the same
placement (the issue's definition). `--runs` repeats everything; the table has every run.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from streams.cli.bench.machine import CpuSampler, cpu_description
from streams.cli.bench.metrics import histogram_quantile, percentile, scrape
from streams.cli.bench.processes import (
    isolated_run,
    service_pids,
    start_worker,
    stop_process,
    wait_ready,
)
from streams.cli.bench.traffic import (
    collect,
    collect_keys,
    offer_load,
    produce_backlog,
    wait_indexed,
)
from streams.config import Settings


@dataclass(frozen=True, slots=True)
class Placement:
    name: str
    worker_cores: frozenset[int] | None  # None: wherever the kernel puts it
    other_cores: frozenset[int] | None


def placements(pin: bool) -> list[Placement]:
    """Unpinned, and with `pin` the worker on the first core, everything else on the rest."""
    out = [Placement("unpinned", None, None)]
    cores = sorted(os.sched_getaffinity(0))
    if pin:
        if len(cores) < 2:
            raise SystemExit(
                "--pin needs at least 2 CPUs: the worker gets one, the rest the others"
            )
        out.append(Placement("pinned", frozenset(cores[:1]), frozenset(cores[1:])))
    return out


# The cores this bench may use (a container's cpuset may allow fewer than the machine has).
ALL_CORES = frozenset(os.sched_getaffinity(0))


def pin_process(pid: int, cores: frozenset[int] | None) -> None:
    """Every thread of `pid` onto `cores` (None: back onto all of `ALL_CORES`); threads it
    starts later inherit it. A process that ended meanwhile is skipped."""
    allowed = cores or ALL_CORES
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, allowed)
        except (ProcessLookupError, PermissionError):
            continue


def cores_of(pid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(pid))
    except (ProcessLookupError, PermissionError):
        return []


@dataclass(frozen=True, slots=True)
class Policy:
    name: str  # as given: "8/2048/10" or "target"
    env: dict[str, str]


def parse_policies(spec: str) -> list[Policy]:
    """ "8/2048/10,1/2048/0,target": fixed knobs SIZE/TOKENS/WAIT_MS, or the latency target."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "target":
            out.append(Policy("target", {}))
            continue
        try:
            size, tokens, wait = (int(x) for x in part.split("/"))
        except ValueError:
            raise SystemExit(
                f"--policies: {part!r} is not SIZE/TOKENS/WAIT_MS (like 8/2048/10) or 'target'"
            ) from None
        out.append(
            Policy(
                part,
                {
                    "INFLOW_MAX_BATCH_SIZE": str(size),
                    "INFLOW_MAX_BATCH_TOKENS": str(tokens),
                    "INFLOW_MAX_WAIT_MS": str(wait),
                    "INFLOW_LATENCY_TARGET_MS": "0",
                },
            )
        )
    if not out:
        raise SystemExit("--policies: name at least one policy")
    return out


@dataclass
class PolicyRun:
    run: int
    placement: str
    policy: str
    target_ms: float  # 0: fixed knobs
    drain_per_s: float
    offered_per_s: float
    events: int
    p50_ms: float  # record taken -> prediction acknowledged, the worker's own histogram
    p99_ms: float
    produce_p99_ms: float  # the bench's send -> the prediction's record timestamp
    median_batch_ms: float
    queue_p99_ms: float  # waiting in the batcher, and a batch on the engine (where the p99 went)
    batch_p99_ms: float
    mean_batch_size: float
    p90_batch_size: float
    cores_used: dict[str, float] = field(default_factory=dict)
    cores_allowed: dict[str, list[int]] = field(default_factory=dict)

    @property
    def within_target(self) -> bool:
        return self.target_ms > 0 and self.p99_ms <= self.target_ms


def run_policy(
    settings: Settings,
    texts: list[str],
    offer: list[str],
    policy: Policy,
    placement: Placement,
    pids: dict[str, int],
    *,
    run: int,
    target_ms: float,
    offered_per_s: float | None,
    fraction: float,
) -> PolicyRun:
    """One worker process: drain `texts`, then `offer` at `offered_per_s` (default `fraction` of
    its own drain rate)."""
    from streams.topics import ensure_topics_sync

    s, tag = isolated_run(settings, "lat")
    ensure_topics_sync(s)
    asyncio.run(produce_backlog(s, s.texts_topic, texts, tag))
    env = dict(policy.env)
    if policy.name == "target":
        env["INFLOW_LATENCY_TARGET_MS"] = f"{target_ms:g}"
    for name in ("kafka", "search"):
        if name in pids:
            pin_process(pids[name], placement.other_cores)
    pin_process(os.getpid(), placement.other_cores)
    proc = start_worker(s, s.web_port, tag, env=env, cores=placement.worker_cores)
    sampler = CpuSampler({**pids, "worker": proc.pid, "bench": os.getpid()}).start()
    try:
        wait_ready(s.web_port, proc, timeout_s=300)
        stamps = asyncio.run(collect(s, s.predictions_topic, len(texts), "drain", timeout_s=1800))
        ends = sorted(stamps.values())
        drain = (len(ends) - 1) / max((ends[-1] - ends[0]) / 1000, 1e-3)
        wait_indexed(s, len(texts), timeout_s=300)
        rate = offered_per_s if offered_per_s is not None else fraction * drain
        before = scrape(s.web_port)
        began = time.time()
        sent = asyncio.run(offer_load(s, s.texts_topic, offer, rate, f"{tag}-offer"))
        got = asyncio.run(collect_keys(s, s.predictions_topic, set(sent), f"{policy.name} load"))
        after = scrape(s.web_port)
        ended = time.time()
        allowed = {"worker": cores_of(proc.pid), "bench": cores_of(os.getpid())}
        allowed.update({name: cores_of(pid) for name, pid in pids.items()})
        used = {
            name: round(sampler.used(name, began, ended) / max(ended - began, 1e-3), 2)
            for name in ("worker", "kafka", "search", "bench")
        }
    finally:
        stop_process(proc)
        sampler.stop()
        for pid in (*pids.values(), os.getpid()):
            pin_process(pid, None)
    taken = "inflow_taken_to_acked_seconds"
    return PolicyRun(
        run=run,
        placement=placement.name,
        policy=policy.name,
        target_ms=target_ms if policy.name == "target" else 0.0,
        drain_per_s=round(drain, 1),
        offered_per_s=round(rate, 1),
        events=len(sent),
        p50_ms=round(1000 * histogram_quantile(before, after, taken, 0.5), 1),
        p99_ms=round(1000 * histogram_quantile(before, after, taken, 0.99), 1),
        produce_p99_ms=round(percentile([got[k] - sent[k] for k in sent], 0.99), 1),
        median_batch_ms=round(histogram_quantile(before, after, "inflow_batch_infer_ms"), 1),
        queue_p99_ms=round(histogram_quantile(before, after, "inflow_queue_ms", 0.99), 1),
        batch_p99_ms=round(histogram_quantile(before, after, "inflow_batch_infer_ms", 0.99), 1),
        mean_batch_size=round(
            (after.get("inflow_batch_size_sum", 0) - before.get("inflow_batch_size_sum", 0))
            / max(
                after.get("inflow_batch_size_count", 0) - before.get("inflow_batch_size_count", 0),
                1,
            ),
            2,
        ),
        p90_batch_size=round(histogram_quantile(before, after, "inflow_batch_size", 0.9), 1),
        cores_used=used,
        cores_allowed=allowed,
    )


def run_latency_study(
    settings: Settings,
    *,
    n: int,
    latency_events: int,
    fraction: float,
    policies: Sequence[Policy],
    pin: bool,
    target: str,
    runs: int,
    echo: Callable[[str], None] = print,
) -> list[PolicyRun]:
    """Every policy in every placement, `runs` times (the services must be up)."""
    from engines.builder.data import sample_texts

    if target != "auto":
        try:
            float(target)
        except ValueError:
            raise SystemExit(
                f"--latency-target-ms must be a number of ms or 'auto', got {target!r}"
            ) from None
    pids = service_pids(settings)
    texts = sample_texts(n, seed=1)
    offer = sample_texts(latency_events, seed=2)
    cpu = cpu_description()
    echo(f"cpu: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']})")
    results: list[PolicyRun] = []
    for run in range(1, runs + 1):
        for placement in placements(pin):
            first: PolicyRun | None = None
            for policy in policies:
                if policy.name == "target" and target == "auto" and first is None:
                    raise SystemExit("--latency-target-ms auto needs a fixed policy first")
                target_ms = 0.0
                if policy.name == "target":
                    auto = target == "auto" and first is not None
                    target_ms = 3 * first.median_batch_ms if auto and first else float(target)
                if policy.name == "target" and not 0 < target_ms < float("inf"):
                    raise SystemExit(
                        f"--latency-target-ms: {target_ms} is not a positive number of ms"
                    )
                result = run_policy(
                    settings,
                    texts,
                    offer,
                    policy,
                    placement,
                    pids,
                    run=run,
                    target_ms=target_ms,
                    offered_per_s=None if first is None else first.offered_per_s,
                    fraction=fraction,
                )
                first = first or result
                results.append(result)
                echo(format_row(result))
    return results


HEADER = (
    f"{'run':>3} {'placement':<9} {'policy':<11} {'drain/s':>8} {'offered':>8} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'target':>7} {'ok':>3} {'batch ms':>9} {'3x':>6} "
    f"{'size mean/p90':>13} {'queue/batch p99':>15}  cores used (allowed)"
)


def format_row(r: PolicyRun) -> str:
    names = ("worker", "kafka", "search", "bench")
    allowed = {name: ",".join(map(str, r.cores_allowed.get(name, []))) for name in names}
    cores = ", ".join(f"{name} {r.cores_used.get(name, 0):.2f} ({allowed[name]})" for name in names)
    target = f"{r.target_ms:.1f}" if r.target_ms else "-"
    ok = ("yes" if r.within_target else "no") if r.target_ms else "-"
    return (
        f"{r.run:>3} {r.placement:<9} {r.policy:<11} {r.drain_per_s:>8.1f} {r.offered_per_s:>8.1f} "
        f"{r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {target:>7} {ok:>3} {r.median_batch_ms:>9.1f} "
        f"{3 * r.median_batch_ms:>6.1f} {r.mean_batch_size:>6.2f}/{r.p90_batch_size:<6.1f}"
        f" {r.queue_p99_ms:>7.1f}/{r.batch_p99_ms:<7.1f}"
        f"  {cores}"
    )


def summary(results: Sequence[PolicyRun]) -> list[str]:
    """Per placement and policy: runs within target, median p99 and drain; and per run, the
    target against the best fixed policy (p99 and drain rate)."""
    lines = [HEADER, *(format_row(r) for r in results), ""]
    keys = sorted({(r.placement, r.policy) for r in results})
    for placement, policy in keys:
        rows = [r for r in results if (r.placement, r.policy) == (placement, policy)]
        within = sum(r.within_target for r in rows)
        p99 = statistics.median(r.p99_ms for r in rows)
        drain = statistics.median(r.drain_per_s for r in rows)
        lines.append(
            f"{placement:<9} {policy:<11} p99 median {p99:7.1f} ms, drain median {drain:7.1f}/s"
            + (f", within target {within}/{len(rows)}" if rows[0].target_ms else "")
        )
    for run in sorted({r.run for r in results}):
        for placement in sorted({r.placement for r in results}):
            rows = [r for r in results if r.run == run and r.placement == placement]
            adaptive = [r for r in rows if r.policy == "target"]
            fixed = [r for r in rows if r.policy != "target"]
            if not adaptive or not fixed:
                continue
            a = adaptive[0]
            best_p99 = min(fixed, key=lambda r: r.p99_ms)
            best_drain = max(fixed, key=lambda r: r.drain_per_s)
            lines.append(
                f"run {run} {placement}: target p99 {a.p99_ms:.1f} ms vs best fixed "
                f"{best_p99.p99_ms:.1f} ({best_p99.policy}); drain {a.drain_per_s:.1f}/s = "
                f"{a.drain_per_s / best_drain.drain_per_s:.1%} of the best "
                f"({best_drain.drain_per_s:.1f}, {best_drain.policy})"
            )
    return lines


def as_json(results: Sequence[PolicyRun]) -> list[dict[str, object]]:
    return [{**asdict(r), "within_target": r.within_target} for r in results]
