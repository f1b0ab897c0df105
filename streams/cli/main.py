"""`inflow`: the one console script. Parses flags, builds Settings once, and dispatches.

Every failure a user can cause (bad config, a port in use, a missing tool, no engine) ends
as one line on stderr and exit code 2, never a traceback (INFLOW_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streams.config import Settings

Handler = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return Settings.load(overrides=overrides)


def dev_services(settings: Settings) -> Any:
    from streams.dev.services import DevServices

    return DevServices.for_state_dir(settings.state_dir)


# --------------------------------------------------------------------------- dev


def cmd_dev_up(args: argparse.Namespace) -> int:
    services = dev_services(Settings.load(env={**os.environ}))
    endpoints = services.up(
        broker=args.broker, kafka_port=args.kafka_port, es_port=args.es_port, search=args.search
    )
    for line in endpoints.env_lines():
        print(line)
    return 0


def cmd_dev_down(args: argparse.Namespace) -> int:
    services = dev_services(Settings.load())
    stopped = services.down()
    for record in stopped:
        print(f"stopped {record.name}: {record.description} (pid {record.pid})")
    if not stopped:
        print("nothing to stop")
    return 0


def cmd_dev_status(args: argparse.Namespace) -> int:
    services = dev_services(Settings.load())
    code = 0
    for name, record in services.status().items():
        if record is None:
            print(f"{name}: not running")
            code = 1
        else:
            print(f"{name}: {record.description} pid {record.pid} at {record.address}")
    return code


# --------------------------------------------------------------------------- pipeline


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.worker import run_worker

    settings = _settings(
        args, web_host=args.web_host, web_port=args.web_port, log_level=args.loglevel
    )
    return run_worker(settings, loglevel=settings.log_level)


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.cli.produce import produce_file

    settings = _settings(args)
    sent = produce_file(settings, args.file, fmt=args.format, topic=args.topic, key=args.key)
    print(f"produced {sent} events to {args.topic or settings.texts_topic}", file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from streams.cli.search import run_search

    return run_search(
        _settings(args),
        args.query,
        label=args.label,
        mode="similar" if args.similar else "hybrid" if args.hybrid else "text",
        k=args.k,
        as_json=args.json,
    )


def cmd_web_key(args: argparse.Namespace) -> int:
    from streams.ops.auth import new_key

    key, entry = new_key(args.key_id)
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"entry (append to INFLOW_WEB_API_KEYS, comma-separated): {entry}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from streams.cli.settings import run_settings

    return run_settings(as_json=args.json)


def cmd_topics(args: argparse.Namespace) -> int:
    from streams.topics import ensure_topics_sync

    settings = _settings(args, topic_partitions=args.partitions)
    for line in ensure_topics_sync(settings):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.cli.demo import run_demo

    return run_demo(_settings(args), n=args.n)


def cmd_batch_bench(args: argparse.Namespace) -> int:
    from streams.cli.bench.batch import run_batch_bench

    return run_batch_bench(
        _settings(args),
        n=args.n,
        sizes=args.sizes,
        token_budgets=args.tokens,
        waits=args.waits,
        burst=args.burst,
        json_path=args.json,
    )


def cmd_bench_passages(args: argparse.Namespace) -> int:
    from streams.cli.bench.passages import run_passages_bench

    return run_passages_bench(
        _settings(args),
        n=args.n,
        lengths=args.lengths,
        batch=args.batch,
        rounds=args.rounds,
        json_path=args.json,
        reviews=args.reviews,
    )


def cmd_bench_knn(args: argparse.Namespace) -> int:
    from streams.cli.bench.knn import run_knn_bench

    return run_knn_bench(
        _settings(args),
        sizes=args.sizes,
        queries=args.queries,
        types=args.types.split(","),
        seed=args.seed,
        keep=args.keep,
        json_path=args.json,
    )


def cmd_bench_scale(args: argparse.Namespace) -> int:
    import json

    from streams.cli.bench.machine import cpu_description
    from streams.cli.bench.processes import local_services
    from streams.cli.bench.scale import as_json, run_scale_bench

    with local_services(_settings(args)) as settings:
        results = run_scale_bench(
            settings, n=args.n, workers=args.workers, kinds=args.texts.split(",")
        )
    args.json.write_text(
        json.dumps({"cpu": cpu_description(), "runs": as_json(results)}, indent=2) + "\n"
    )
    print(f"results written to {args.json}")
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from streams.cli.bench.pipeline import run_pipeline_bench

    return run_pipeline_bench(
        _settings(args),
        n=args.n,
        baseline_n=args.baseline_n,
        rates=args.rates,
        latency_events=args.latency_events,
        baselines=[] if args.no_baselines else ["per-event", "take"],
        json_path=args.json,
        png_path=None if args.no_chart else args.png,
        study=None
        if not (args.pin or args.policies)
        else {
            "n": args.n,
            "fraction": args.at,
            "policies": args.policies or "8/2048/10,target",
            "pin": args.pin,
            "target": args.latency_target_ms,
            "runs": args.runs,
        },
    )


def _selection(args: argparse.Namespace) -> Any:
    from streams.cli.dlq import Selection, parse_time

    return Selection(
        codes=frozenset(args.code or ()),
        stages=frozenset(args.stage or ()),
        engine_versions=frozenset(args.engine_version or ()),
        since_ms=None if args.since is None else parse_time(args.since),
        until_ms=None if args.until is None else parse_time(args.until),
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from streams.cli.dlq import run_list

    return run_list(
        _settings(args), args.topic, _selection(args), limit=args.limit, as_json=args.json
    )


def cmd_dlq_show(args: argparse.Namespace) -> int:
    from streams.cli.dlq import run_show

    return run_show(_settings(args), args.position, max_bytes=args.max_bytes)


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from streams.cli.dlq import run_replay

    return run_replay(
        _settings(args),
        args.topic,
        _selection(args),
        max_replays=args.max_replays,
        to_topic=args.to_topic,
        dry_run=args.dry_run,
    )


def _add_dlq_commands(sub: Any) -> None:
    from streams.cli.dlq import DEFAULT_MAX_REPLAYS

    dlq = sub.add_parser("dlq", help="list, show and replay dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument(
        "--topic",
        choices=("texts", "predictions", "all"),
        default="all",
        help="which dead-letter topic: the input's, the predictions', or both (all)",
    )
    filters.add_argument("--code", action="append", help="error code (repeatable)")
    filters.add_argument("--stage", action="append", help="decode, infer or index (repeatable)")
    filters.add_argument("--engine-version", action="append", help="engine version (repeatable)")
    filters.add_argument(
        "--since", default=None, help="dead-lettered at or after: RFC 3339, epoch ms, or 30m/2h/7d"
    )
    filters.add_argument("--until", default=None, help="dead-lettered before (same forms)")
    listing = dlq_sub.add_parser("list", parents=[filters], help="dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=50, help="lines shown, newest (0: all)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_dlq_list)
    show = dlq_sub.add_parser("show", help="one dead letter: headers, value, replay state")
    show.add_argument("position", help="TOPIC:PARTITION:OFFSET, as `dlq list` prints it")
    show.add_argument("--max-bytes", type=int, default=4000, help="value bytes printed")
    show.set_defaults(handler=cmd_dlq_show)
    rep = dlq_sub.add_parser(
        "replay",
        parents=[filters],
        help="put dead letters back on the topic they came from (original key and bytes)",
    )
    rep.add_argument(
        "--max-replays",
        type=int,
        default=DEFAULT_MAX_REPLAYS,
        help=f"refuse a record replayed this many times already ({DEFAULT_MAX_REPLAYS})",
    )
    rep.add_argument("--to-topic", default=None, help="instead of each one's source topic")
    rep.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    rep.set_defaults(handler=cmd_dlq_replay)


def cmd_reindex(args: argparse.Namespace) -> int:
    from streams.cli.reindex import run_reindex

    return run_reindex(
        _settings(args),
        args.version,
        from_timestamp=args.from_timestamp,
        from_offset=args.from_offset,
        rollback=args.rollback,
        activate=args.activate,
        handover_s=args.handover_s,
        metrics_port=args.metrics_port,
        quiet=args.quiet,
        eval_set=args.eval_set,
        tolerance=args.tolerance,
        eval_mode=args.eval_mode,
    )


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from streams.cli.evaluate import run_eval_retrieval

    return run_eval_retrieval(
        _settings(args),
        args.folder,
        version=args.version,
        as_json=args.json,
        keep=args.keep,
        quiet=args.quiet,
    )


def _add_eval_commands(sub: Any) -> None:
    evals = sub.add_parser("eval", help="measure quality on an eval set").add_subparsers(
        dest="eval", required=True
    )
    retrieval = evals.add_parser(
        "retrieval",
        help="nDCG@10, P@10 and recall@100 of BM25, kNN and hybrid search on a BEIR folder",
    )
    retrieval.add_argument(
        "folder",
        nargs="?",
        type=Path,
        default=None,
        help="corpus.jsonl, queries.jsonl, qrels/test.tsv (default: the shipped bbc-topics set)",
    )
    retrieval.add_argument("--version", default=None, help="engine version (default: active)")
    retrieval.add_argument("--json", type=Path, default=None, help="also write JSON (- = stdout)")
    retrieval.add_argument("--keep", action="store_true", help="keep the eval index")
    retrieval.add_argument("--quiet", action="store_true", help="no progress on stderr")
    retrieval.set_defaults(handler=cmd_eval_retrieval)


def _add_reindex_command(sub: Any) -> None:
    rx = sub.add_parser(
        "reindex",
        help="re-embed the input topic with an engine version into its own index, then switch "
        "the alias to it atomically (or --rollback)",
    )
    rx.add_argument("--version", default=None, help="the engine version to re-embed with")
    rx.add_argument(
        "--rollback",
        action="store_true",
        help="back to the version served before the last cutover (re-embeds what it missed)",
    )
    rx.add_argument(
        "--from-timestamp", default=None, help="RFC 3339, epoch ms, or an age such as 2h"
    )
    rx.add_argument("--from-offset", default=None, help="PARTITION:OFFSET[,...] of the input")
    rx.add_argument(
        "--activate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make the version the active engine once caught up (default: yes)",
    )
    rx.add_argument(
        "--handover-s",
        type=float,
        default=None,
        help="keep following the input after activation (default 3 x INFLOW_ENGINE_POLL_S + 5)",
    )
    rx.add_argument("--metrics-port", type=int, default=None, help="serve inflow_reindex_*")
    rx.add_argument(
        "--eval-set",
        type=Path,
        default=None,
        help="a BEIR folder (`inflow eval retrieval`): refuse the cutover when the new model "
        "scores worse on it than the live one by more than --tolerance",
    )
    rx.add_argument(
        "--tolerance", type=float, default=0.0, help="nDCG@10 the new model may lose (0)"
    )
    rx.add_argument(
        "--eval-mode",
        choices=("bm25", "knn", "hybrid", "hybrid-rrf"),
        default="knn",
        help="which search the gate measures (knn: the part a model changes)",
    )
    rx.add_argument("--quiet", action="store_true", help="no progress bar")
    rx.set_defaults(handler=cmd_reindex)


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("values must not be negative")
    return values


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inflow", description="Streaming inference: Kafka -> engine -> Elasticsearch"
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="engine registry folder (default: INFLOW_ENGINE_DIR or .inflow/engines)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="local Kafka and search server for development")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    up = dev_sub.add_parser("up", help="start (idempotent) and print the endpoints")
    up.add_argument(
        "--broker",
        choices=("auto", "kafka", "noida"),
        default=os.environ.get("INFLOW_DEV_BROKER", "auto"),
        help="kafka = genuine Apache Kafka (needs Java+Maven); noida = imitation; auto = "
        "Apache Kafka when Java and Maven exist",
    )
    up.add_argument(
        "--search",
        choices=("auto", "elasticsearch", "noida"),
        default=os.environ.get("INFLOW_DEV_SEARCH", "auto"),
        help="elasticsearch = genuine Elasticsearch 8.15 (needs a JDK+Maven); noida = imitation; "
        "auto = Elasticsearch when they exist",
    )
    up.add_argument("--kafka-port", type=int, default=0, help="0 picks a free port")
    up.add_argument("--es-port", type=int, default=0, help="0 picks a free port")
    up.set_defaults(handler=cmd_dev_up)
    dev_sub.add_parser("down", help="stop what `up` started").set_defaults(handler=cmd_dev_down)
    dev_sub.add_parser("status", help="what runs").set_defaults(handler=cmd_dev_status)

    worker = sub.add_parser("worker", help="run the agents and the web server")
    worker.add_argument("--web-host", default=None, help="default 127.0.0.1")
    worker.add_argument("--web-port", type=int, default=None, help="default 6066")
    worker.add_argument("--loglevel", default=None, help="default INFLOW_LOG_LEVEL, else info")
    worker.set_defaults(handler=cmd_worker)

    produce = sub.add_parser("produce", help="publish text events from a file or stdin")
    produce.add_argument("file", nargs="?", default="-", help="FILE or - for stdin")
    produce.add_argument("--format", choices=("jsonl", "text"), default="jsonl")
    produce.add_argument("--topic", default=None)
    produce.add_argument("--key", choices=("id", "none"), default="id", help="message key")
    produce.set_defaults(handler=cmd_produce)

    search = sub.add_parser("search", help="search indexed predictions")
    search.add_argument("query")
    search.add_argument("--label", default=None)
    how = search.add_mutually_exclusive_group()
    how.add_argument("--similar", action="store_true", help="kNN by the query's embedding")
    how.add_argument(
        "--hybrid",
        action="store_true",
        help="full text and kNN fused by reciprocal rank fusion (on the server where "
        "Elasticsearch has the rrf retriever, else in the client)",
    )
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--json", action="store_true")
    search.set_defaults(handler=cmd_search)

    web_key = sub.add_parser(
        "web-key", help="make an API key for the search views and its hashed settings entry"
    )
    web_key.add_argument("key_id", help="a name for the key (audit lines carry it)")
    web_key.set_defaults(handler=cmd_web_key)

    shown = sub.add_parser(
        "settings",
        help="the effective settings, secrets masked, each with where it came from "
        "(flag, env, the dev.env file, default)",
    )
    shown.add_argument("--json", action="store_true", help="a JSON list of {name, value, source}")
    shown.set_defaults(handler=cmd_settings)

    topics = sub.add_parser("topics", help="create Inflow's topics when missing")
    topics.add_argument("--partitions", type=int, default=None)
    topics.set_defaults(handler=cmd_topics)

    demo = sub.add_parser("demo", help="the end-to-end demo (make demo)")
    demo.add_argument("-n", type=int, default=2000, help="number of real texts to publish")
    demo.set_defaults(handler=cmd_demo)

    bench = sub.add_parser("batch-bench", help="throughput and latency per batching policy")
    bench.add_argument("--n", type=int, default=1024, help="real texts (1024)")
    bench.add_argument("--sizes", type=_int_list, default=[8, 16, 32, 64])
    bench.add_argument("--tokens", type=_int_list, default=[4096])
    bench.add_argument("--waits", type=_int_list, default=[25])
    bench.add_argument("--burst", type=int, default=200, help="texts arriving together (200)")
    bench.add_argument("--json", type=Path, default=None)
    bench.set_defaults(handler=cmd_batch_bench)

    benches = sub.add_parser("bench", help="benchmarks of the whole pipeline").add_subparsers(
        dest="bench", required=True
    )
    pipeline = benches.add_parser(
        "pipeline",
        help="worker drain, latency under load and user-written torch baselines, in one run",
    )
    pipeline.add_argument("--n", type=int, default=3000, help="backlog of real texts (3000)")
    pipeline.add_argument(
        "--baseline-n", type=int, default=600, help="backlog for each torch baseline (600)"
    )
    pipeline.add_argument(
        "--rates",
        type=_float_list,
        default=[0.25, 0.5, 0.75, 1.0],
        help="offered load as fractions of the measured drain rate (0.25,0.5,0.75,1)",
    )
    pipeline.add_argument(
        "--latency-events", type=int, default=600, help="events offered per rate, at most (600)"
    )
    pipeline.add_argument("--no-baselines", action="store_true", help="skip the torch baselines")
    pipeline.add_argument("--json", type=Path, default=Path("pipeline-bench.json"))
    pipeline.add_argument("--png", type=Path, default=Path("pipeline-bench.png"))
    pipeline.add_argument("--no-chart", action="store_true", help="no PNG (no matplotlib)")
    pipeline.add_argument(
        "--pin",
        action="store_true",
        help="drain and latency only, unpinned and then with the worker on its own core and "
        "Kafka, the search server and the load generator on the others",
    )
    pipeline.add_argument(
        "--policies",
        default="",
        help="drain and latency only, for each batching policy at one offered load: fixed "
        "knobs SIZE/TOKENS/WAIT_MS or 'target', e.g. 1/2048/0,8/2048/10,32/4096/10,target",
    )
    pipeline.add_argument(
        "--at", type=float, default=0.5, help="offered load: this fraction of the first "
        "policy's drain rate, the same for every policy of a placement (0.5)"
    )  # fmt: skip
    pipeline.add_argument(
        "--latency-target-ms",
        default="auto",
        help="the 'target' policy's INFLOW_LATENCY_TARGET_MS; auto: 3x the median batch time "
        "the first policy ran at that load (auto)",
    )
    pipeline.add_argument("--runs", type=int, default=1, help="repeat the study (1)")
    pipeline.set_defaults(handler=cmd_bench_pipeline)
    scale = benches.add_parser(
        "scale",
        help="1 then N workers in one group drain the same backlog, each pinned to a core; "
        "the capacity formula (docs/capacity.md) fed by the first run predicts the others",
    )
    scale.add_argument("--n", type=int, default=3000, help="backlog of texts per run (3000)")
    scale.add_argument("--workers", type=_int_list, default=[1, 2], help="worker counts (1,2)")
    scale.add_argument(
        "--texts", default="tweets,reviews", help="tweets, reviews or both (tweets,reviews)"
    )
    scale.add_argument("--json", type=Path, default=Path("scale-bench.json"))
    scale.set_defaults(handler=cmd_bench_scale)
    passages = benches.add_parser(
        "passages",
        help="engine ms per event by text length, truncated and with passages (windows)",
    )
    passages.add_argument("--n", type=int, default=32, help="texts per length (32)")
    passages.add_argument(
        "--lengths", type=_int_list, default=[64, 128, 256, 512, 1024, 2048], help="tokens"
    )
    passages.add_argument("--batch", type=int, default=8, help="texts per predict call (8)")
    passages.add_argument("--rounds", type=int, default=2, help="best of this many (2)")
    passages.add_argument(
        "--reviews", type=int, default=300, help="long IMDB reviews for the label figures (300)"
    )
    passages.add_argument("--json", type=Path, default=None)
    passages.set_defaults(handler=cmd_bench_passages)
    knn = benches.add_parser(
        "knn", help="kNN p50/p99 and bulk rate as a scratch index grows (generated vectors)"
    )
    knn.add_argument(
        "--sizes", type=_int_list, default=[10_000, 100_000, 300_000, 1_000_000], help="steps"
    )
    knn.add_argument("--queries", type=int, default=200, help="kNN queries per step (200)")
    knn.add_argument("--types", default="int8_hnsw,hnsw", help="index_options types")
    knn.add_argument("--seed", type=int, default=7)
    knn.add_argument("--keep", action="store_true", help="keep the scratch indices")
    knn.add_argument("--json", type=Path, default=None)
    knn.set_defaults(handler=cmd_bench_knn)

    _add_dlq_commands(sub)
    _add_reindex_command(sub)
    _add_eval_commands(sub)

    try:
        from streams.cli.engine import add_commands
    except ImportError:  # engines CLI not importable: keep the rest of the CLI usable
        pass
    else:
        add_commands(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from streams.dev.console import DevError

    errors: list[type[BaseException]] = [DevError]
    try:
        from engines.errors import EngineError
    except ImportError:
        pass
    else:
        errors.append(EngineError)
    from streams.errors import InflowError

    errors.append(InflowError)  # ConfigError among them
    try:
        from indexer.errors import IndexerError
    except ImportError:
        pass
    else:
        errors.append(IndexerError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if args.command != "worker":
        # One-shot commands report failures themselves, in one line; the client's own
        # connection-retry logging would only repeat them.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        logging.getLogger("elastic_transport").setLevel(logging.CRITICAL)
    try:
        if args.registry is not None:
            os.environ["INFLOW_ENGINE_DIR"] = str(args.registry)
        else:
            args.registry = Settings.load().engine_dir
        return handler(args)
    except KeyboardInterrupt:
        print("inflow: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        print(f"inflow: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # last resort: still one line, the traceback only on request
        if os.environ.get("INFLOW_DEBUG"):
            traceback.print_exc()
        print(
            f"inflow: unexpected {type(exc).__name__}: {exc} (INFLOW_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
