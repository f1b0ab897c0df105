"""`inflow engine ...` and `inflow train ...` commands.

`add_commands(subparsers)` is called by the top-level CLI (streams/cli.py); each handler
takes the parsed args (the registry root in `args.registry`) and returns an exit code.
Errors print one line to stderr and return 2. Heavy modules are imported inside handlers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engines.assets import registry_dir
from engines.errors import EngineError

if TYPE_CHECKING:
    from engines.registry import Manifest

Handler = Callable[[argparse.Namespace], int]


def _registry_root(args: argparse.Namespace) -> Path:
    value = getattr(args, "registry", None)
    return Path(value) if value else registry_dir()


def _guard(fn: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except EngineError as exc:
            print(f"inflow: error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _thresholds(args: argparse.Namespace) -> object:
    from engines.builder.parity import Thresholds

    return Thresholds(
        min_agreement=args.min_agreement,
        min_cosine=args.min_cosine,
        max_accuracy_drop=args.max_accuracy_drop,
        max_score_diff=args.max_score_diff,
    )


@_guard
def cmd_build(args: argparse.Namespace) -> int:
    from engines.builder.parity import Thresholds
    from engines.builder.pipeline import build

    th = _thresholds(args)
    assert isinstance(th, Thresholds)
    manifest = build(
        backend=args.backend,
        precision=args.precision,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        model=args.model,
        registry_root=_registry_root(args),
        thresholds=th,
        parity_texts=args.parity_texts,
        activate=args.activate,
        force=args.force,
        progress=not args.quiet,
    )
    return 0 if manifest.accepted or args.force else 3


@_guard
def cmd_list(args: argparse.Namespace) -> int:
    from engines.registry import Registry

    registry = Registry(_registry_root(args))
    manifests = registry.list()
    if not manifests:
        print(f"no engines in {registry.root}: run `inflow engine ensure`")
        return 0
    active = registry.active_version()
    rollout = registry.rollout()
    candidate = rollout.candidate if rollout is not None and rollout.running else None
    failed = registry.failed()
    width = max(len("version"), *(len(m.version) for m in manifests))
    print(f"  {'version':<{width}}  {'status':<8}  {'model':<24}  agreement  cos min  created")
    for m in manifests:
        parity = m.parity or {}
        agreement = parity.get("agreement")
        cos = parity.get("cosine_min")
        print(
            f"{_marker(m.version, active, candidate)} {m.version:<{width}}  {m.status:<8}  "
            f"{m.model_name:<24}  {agreement if agreement is None else f'{agreement:9.4f}'}  "
            f"{cos if cos is None else f'{cos:7.4f}'}  {m.created}"
        )
        for line in _evaluation_lines(m):
            print(f"  {'':<{width}}  {line}")
        mark = failed.get(m.version)
        if mark is not None:  # workers skip it until it is activated anew
            where = f" on {mark.worker}" if mark.worker else ""
            print(f"  {'':<{width}}  failed {mark.time}{where}: {mark.reason}")
    serving = registry.serving_version()
    if active is not None and serving != active:
        print(
            f"active {active} is marked failed: workers serve {serving or 'nothing'} "
            "(`inflow engine activate VERSION` picks one)"
        )
    return 0


def _evaluation_lines(manifest: Manifest) -> list[str]:
    """The model's evaluation per domain, as `inflow train` measured it (fp32, before the build:
    the parity columns say how far this engine is from it)."""
    lines = []
    for domain, score in (manifest.extra.get("evaluation") or {}).items():
        if not isinstance(score, dict):
            continue
        share = (score.get("predicted_share") or {}).get("neutral")
        lines.append(
            f"{domain:<12} accuracy {score.get('accuracy', float('nan')):.3f}  balanced "
            f"{score.get('balanced_accuracy', float('nan')):.3f}  macro-F1 "
            f"{score.get('macro_f1', float('nan')):.3f}  ECE {score.get('ece', float('nan')):.3f}"
            + (f"  neutral {share:.0%}" if share is not None else "")
            + f"  (n={score.get('n', 0)})"
        )
    return lines


def _marker(version: str, active: str | None, candidate: str | None) -> str:
    return "*" if version == active else "~" if version == candidate else " "


def _check_loads(root: Path, version: str) -> None:
    """Load and warm `version` up here, as every worker will, before anything points at it: a
    version that cannot would only fail there (contained, but not served)."""
    from engines.errors import ActivationRefused, EngineNotFound
    from engines.load import describe_failure, load_engine

    try:
        engine = load_engine(root, version)
    except EngineNotFound:
        raise
    except Exception as exc:
        raise ActivationRefused(
            f"engine {version} was not activated, it fails its load check: {describe_failure(exc)}"
        ) from exc
    engine.close()


@_guard
def cmd_activate(args: argparse.Namespace) -> int:
    """Activate after the load and warm-up check (`--force` skips the parity gate, never it)."""
    from engines.registry import Registry

    root = _registry_root(args)
    registry = Registry(root)
    if registry.get(args.version).accepted or args.force:  # else activate refuses it below
        _check_loads(root, args.version)
    manifest = registry.activate(args.version, force=args.force)
    print(f"active engine: {manifest.version}")
    return 0


@_guard
def cmd_rollback(args: argparse.Namespace) -> int:
    """During a shadow or canary: end it (the candidate gets no more events). Otherwise:
    re-activate the previously active version."""
    from engines.registry import ROLLED_BACK, Registry

    registry = Registry(_registry_root(args))
    record = registry.rollout()
    if record is not None and record.running:
        ended = registry.end_rollout(ROLLED_BACK, "rolled back by hand")
        print(
            f"rolled back the {ended.mode} of {ended.candidate}: every event goes to "
            f"{registry.active_version()}"
        )
        return 0
    version = registry.rollback()
    print(f"rolled back: active engine is {version}")
    return 0


def _rule(args: argparse.Namespace) -> object:
    from engines.registry import RolloutRule

    def off(value: float) -> float | None:
        return None if value < 0 else value

    try:
        return RolloutRule(
            min_agreement=off(args.min_agreement),
            max_error_rate=off(args.max_error_rate),
            min_samples=args.min_samples,
        )
    except ValueError as exc:
        from engines.errors import ActivationRefused

        raise ActivationRefused(str(exc)) from None


def _start_rollout(args: argparse.Namespace, mode: str) -> int:
    from engines.registry import Registry, RolloutRule

    rule = _rule(args)
    assert isinstance(rule, RolloutRule)
    root = _registry_root(args)
    registry = Registry(root)
    if registry.get(args.version).accepted:  # else start_rollout refuses it below
        _check_loads(root, args.version)  # a candidate is loaded by every worker too
    record = registry.start_rollout(mode, args.version, args.share, rule)
    checks = []
    if rule.min_agreement is not None:
        checks.append(f"label agreement below {rule.min_agreement}")
    if rule.max_error_rate is not None:
        checks.append(f"error rate above {rule.max_error_rate}")
    auto = " or ".join(checks) or "never (no rule)"
    what = "predicted beside" if mode == "shadow" else "predicted and published instead of"
    print(
        f"{mode}: {record.candidate} {what} {record.active} for {record.share:.0%} of keys; "
        f"rolled back automatically on {auto} over {rule.min_samples} events; "
        "`inflow engine promote` or `inflow engine rollback` ends it"
    )
    return 0


@_guard
def cmd_shadow(args: argparse.Namespace) -> int:
    return _start_rollout(args, "shadow")


@_guard
def cmd_canary(args: argparse.Namespace) -> int:
    return _start_rollout(args, "canary")


@_guard
def cmd_promote(args: argparse.Namespace) -> int:
    from engines.registry import Registry

    record = Registry(_registry_root(args)).promote()
    print(
        f"promoted: active engine is {record.candidate} (was {record.active}; "
        "`inflow engine rollback` goes back)"
    )
    return 0


@_guard
def cmd_rollout(args: argparse.Namespace) -> int:
    import json

    from engines.registry import Registry
    from streams.cli.compare import live_comparison

    registry = Registry(_registry_root(args))
    record = registry.rollout()
    if record is None:
        print("no rollout yet: `inflow engine shadow|canary VERSION` starts one")
        return 0
    live = live_comparison(registry, record)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({"record": asdict(record), "live": live.to_dict()}, indent=1))
        return 0
    print(
        f"{record.mode} of {record.candidate} against {record.active}, {record.share:.0%} of "
        f"keys, {record.status.replace('_', ' ')} (started {record.started}"
        + (f", ended {record.ended}: {record.reason})" if record.ended else ")")
    )
    print(f"  live: {live.describe()}")
    return 0


@_guard
def cmd_bench(args: argparse.Namespace) -> int:
    from engines.builder.bench import run_bench

    run_bench(
        specs=args.backends,
        batch_sizes=args.batch_sizes,
        n=args.n,
        model=args.model,
        registry_root=_registry_root(args),
        max_seq=args.max_seq,
        threads=args.threads,
        json_path=args.json,
        progress=not args.quiet,
    )
    return 0


@_guard
def cmd_ensure(args: argparse.Namespace) -> int:
    from engines.builder.parity import Thresholds
    from engines.builder.pipeline import ensure

    th = _thresholds(args)
    assert isinstance(th, Thresholds)
    manifest = ensure(_registry_root(args), thresholds=th, progress=not args.quiet)
    print(f"active engine: {manifest.version}")
    return 0


@_guard
def cmd_verify(args: argparse.Namespace) -> int:
    from engines.registry import Registry

    registry = Registry(_registry_root(args))
    version = args.version or registry.active_version()
    if version is None:
        print(f"inflow: error: no active engine in {registry.root}", file=sys.stderr)
        return 2
    registry.verify(version)
    print(f"{version}: every artifact matches its manifest")
    return 0


@_guard
def cmd_baseline(args: argparse.Namespace) -> int:
    from engines.builder.pipeline import record_baseline

    record_baseline(args.version, _registry_root(args), parity_texts=args.texts)
    return 0


@_guard
def cmd_compare(args: argparse.Namespace) -> int:
    from streams.cli.compare import run_compare
    from streams.config import Settings

    settings = Settings.load(overrides={"engine_dir": _registry_root(args)})
    return run_compare(
        settings, args.versions, sample=args.sample, since=args.since, as_json=args.json
    )


@_guard
def cmd_train(args: argparse.Namespace) -> int:
    from engines.builder.train import train

    path = train(
        dataset=args.dataset,
        frozen=args.frozen,
        out_dir=args.out,
        max_train=args.max_train,
        epochs=args.epochs,
        progress=not args.quiet,
        out_of_domain=args.out_of_domain,
        calibrated=args.calibrate,
        compare_frozen=args.compare_frozen,
    )
    print(path)
    return 0


def _engine_help(parser: argparse.ArgumentParser) -> Handler:
    def show(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


def _add_thresholds(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parity gate thresholds")
    g.add_argument("--min-agreement", type=float, default=0.95, help="label agreement (0.95)")
    g.add_argument("--min-cosine", type=float, default=0.97, help="min embedding cosine (0.97)")
    g.add_argument(
        "--max-accuracy-drop", type=float, default=0.02, help="accuracy drop allowed (0.02)"
    )
    g.add_argument("--max-score-diff", type=float, default=None, help="max |Δprob| (off)")


def _share(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a share: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share is within (0, 1] (or 1%..100%), got {text}")
    return value


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive integers")
    return values


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `engine {build,list,activate,rollback,bench,ensure,verify}` and `train`."""
    engine = subparsers.add_parser("engine", help="build, gate, list, activate engines")
    engine.set_defaults(handler=_engine_help(engine))
    esub = engine.add_subparsers(dest="engine_command", metavar="COMMAND")

    b = esub.add_parser("build", help="export/compile, gate against torch fp32, register")
    b.add_argument("--backend", choices=["onnxruntime", "tensorrt", "torch"], default="onnxruntime")
    b.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default=None,
        help="default: int8 for onnxruntime, fp16 for tensorrt, fp32 for torch",
    )
    b.add_argument("--max-batch", type=int, default=64)
    b.add_argument("--max-seq", type=int, default=256)
    b.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local model folder: a Hugging Face sequence classifier, a sentence-transformers "
        "embedder, or an `inflow train` head (default: the trained sentiment head)",
    )
    b.add_argument(
        "--activate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="activate the build when it passes the gate (default: yes)",
    )
    b.add_argument("--force", action="store_true", help="activate even if the gate rejects it")
    b.add_argument("--parity-texts", type=int, default=500, help="validation texts (500)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_thresholds(b)
    b.set_defaults(handler=cmd_build)

    esub.add_parser(
        "list",
        help="versions, status, parity; * marks the active one, ~ a rollout's candidate; "
        "versions that failed on a worker say so",
    ).set_defaults(handler=cmd_list)

    a = esub.add_parser(
        "activate",
        help="make VERSION the active engine once it loads and warms up here; clears a failed mark",
    )
    a.add_argument("version")
    a.add_argument(
        "--force",
        action="store_true",
        help="allow a build the gate rejected (the load and warm-up check still runs)",
    )
    a.set_defaults(handler=cmd_activate)

    esub.add_parser(
        "rollback",
        help="end a running shadow or canary; without one, re-activate the previous version",
    ).set_defaults(handler=cmd_rollback)

    for mode, handler, what, share in (
        ("shadow", cmd_shadow, "predict beside the active engine, never published", 0.2),
        ("canary", cmd_canary, "predict and publish instead of the active engine", 0.25),
    ):
        r = esub.add_parser(
            mode,
            help=f"run VERSION on a share of keys ({what}); the workers follow within seconds",
        )
        r.add_argument("version")
        r.add_argument(
            "--share", type=_share, default=share, help=f"share of keys, by key hash ({share})"
        )
        g = r.add_argument_group("automatic rollback (per worker; a negative value: off)")
        g.add_argument("--min-agreement", type=float, default=0.9, help="label agreement (0.9)")
        g.add_argument("--max-error-rate", type=float, default=0.05, help="candidate errors (0.05)")
        g.add_argument("--min-samples", type=int, default=200, help="judged from (200) events")
        r.set_defaults(handler=handler)

    esub.add_parser(
        "promote", help="activate the running rollout's candidate and end the rollout"
    ).set_defaults(handler=cmd_promote)
    ro = esub.add_parser("rollout", help="the latest shadow or canary and its live comparison")
    ro.add_argument("--json", action="store_true")
    ro.set_defaults(handler=cmd_rollout)

    v = esub.add_parser("verify", help="check the sha256 of every artifact of a version")
    v.add_argument("version", nargs="?", default=None, help="default: the active version")
    v.set_defaults(handler=cmd_verify)

    be = esub.add_parser("bench", help="texts/s and p50/p95 latency on real texts")
    be.add_argument(
        "--backends",
        nargs="+",
        default=["torch:fp32", "onnxruntime:fp32", "onnxruntime:int8"],
        help="backend:precision specs and/or registry versions",
    )
    be.add_argument("--batch-sizes", type=_csv_ints, default=[1, 8, 32, 64])
    be.add_argument("--n", type=int, default=512, help="real texts to cycle through (512)")
    be.add_argument("--model", type=Path, default=None)
    be.add_argument("--max-seq", type=int, default=256)
    be.add_argument("--threads", type=int, default=None, help="intra-op threads")
    be.add_argument("--json", type=Path, default=None, help="write results as JSON")
    be.add_argument("--quiet", action="store_true")
    be.set_defaults(handler=cmd_bench)

    en = esub.add_parser(
        "ensure", help="make sure an active engine exists (train, build int8, gate, activate)"
    )
    en.add_argument("--quiet", action="store_true")
    _add_thresholds(en)
    en.set_defaults(handler=cmd_ensure)

    bl = esub.add_parser(
        "baseline",
        help="record what a version predicts on its evaluation split (the drift reference; "
        "builds record it themselves)",
    )
    bl.add_argument("version", nargs="?", default=None, help="default: the active version")
    bl.add_argument("--texts", type=int, default=500, help="evaluation texts (500)")
    bl.set_defaults(handler=cmd_baseline)

    co = esub.add_parser(
        "compare",
        help="live predictions in Elasticsearch against each version's evaluation split: "
        "label shares, confidence, population-stability index",
    )
    co.add_argument("versions", nargs="*", help="default: the active version")
    co.add_argument("--sample", type=int, default=1000, help="latest predictions (1000)")
    co.add_argument("--since", default=None, help="only predictions since (now-1h, RFC 3339)")
    co.add_argument("--json", action="store_true")
    co.set_defaults(handler=cmd_compare)

    t = subparsers.add_parser("train", help="fine-tune MiniLM with a classifier head")
    t.add_argument("--dataset", default="sentiment", help="sentiment | topic | CSV/JSONL path")
    t.add_argument(
        "--frozen",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="frozen encoder + logistic regression only (default: fine-tune the encoder too)",
    )
    t.add_argument(
        "--out-of-domain",
        type=int,
        default=500,
        help="IMDB reviews to score a sentiment model on out of domain (500; 0: none)",
    )
    t.add_argument(
        "--compare-frozen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the frozen-encoder head fine-tuning starts from (default)",
    )
    t.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit class-prior offsets and a temperature on the validation splits and fold them "
        "into the head (default)",
    )
    t.add_argument(
        "--max-train",
        type=int,
        default=None,
        help="cap on the dataset's own training examples (sentiment: tweets; every review "
        "sentence of the training split comes on top)",
    )
    t.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (1)")
    t.add_argument("--out", type=Path, default=None, help="models folder (.inflow/models)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: `python -m streams.cli.engine engine list` (the real CLI is `inflow`)."""
    parser = argparse.ArgumentParser(prog="python -m streams.cli.engine")
    parser.add_argument("--registry", type=Path, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
