"""`mtp` command line: check a config, train (as one rank of a DeepSpeed job).

Any `ConfigError` ends the command with its one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mtp.checks import check_experiment
from mtp.config import ConfigError, load_config


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sizes = check_experiment(cfg, args.world_size, args.resume)
    print(f"config ok: {len(sizes)} tasks ({', '.join(f'{k} {v}' for k, v in sizes.items())} training rows)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mtp.training import run_training
    from mtp.training.trainer import LossNotFinite

    cfg = load_config(args.config, args.overrides)
    try:
        run_training(cfg, resume=args.resume)
    except LossNotFinite as err:
        print(f"mtp train: error: {err}", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mtp.export import export_run, verify_export

    out = export_run(args.run_dir, args.out, onnx=not args.no_onnx)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*.safetensors")) for p in (out / "hf", out / "compact")}
    print(f"exported {args.run_dir} to {out}: hf/ {sizes['hf'] / 1e6:.1f} MB of safetensors, "
          f"compact/ {sizes['compact'] / 1e6:.1f} MB")
    if args.verify:
        report = verify_export(args.run_dir, out)
        print(json.dumps(report, indent=2))
        if not report["ok"]:
            print("mtp: error: the compact export does not score as the trained model", file=sys.stderr)
            return 1
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mtp.compare import compare, describe_plan

    if args.plan:
        print(describe_plan(args.config, args.overrides, only=args.only, retrain=args.retrain))
        return 0
    report = compare(args.config, args.overrides, parallel=args.parallel, only=args.only,
                     report_only=args.report_only, retrain=args.retrain)
    print(report.read_text())
    return 0


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the YAML")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a config and its data without training")
    _add_experiment_args(check)
    check.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    check.set_defaults(func=_cmd_check)
    train = sub.add_parser("train", help="train as one rank of a DeepSpeed job (launch.sh starts the ranks)")
    _add_experiment_args(train)
    train.set_defaults(func=_cmd_train)
    compare = sub.add_parser("compare", help="multitask pruning against the best single-task ensemble")
    compare.add_argument("--config", required=True, help="compare YAML (see configs/compare_minilm.yaml)")
    compare.add_argument("--parallel", type=int, default=1, help="runs trained at once on this machine")
    compare.add_argument("--only", default=None,
                         help="train only the runs whose name matches this regular expression (e.g. 'rank|dense')")
    compare.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    compare.add_argument("--retrain", default=None, metavar="REGEX",
                         help="train again, once, the finished pruned runs whose name matches (e.g. results from "
                              "before mtp scored the dev halves); their earlier results move to RESULTS/superseded/")
    compare.add_argument("--plan", action="store_true",
                         help="list the planned runs (those --only matches) with their length and state; train nothing")
    compare.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the compare YAML")
    compare.set_defaults(func=_cmd_compare)
    sub.add_parser("tune", help="Ray Tune search: the same as python -m tune (see its --help)", add_help=False)
    export = sub.add_parser("export", help="write a finished run as a Hugging Face checkpoint and a compact model")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, default=None, help="export folder (default: RUN_DIR/export)")
    export.add_argument("--no-onnx", action="store_true", help="skip onnx/encoder.onnx (its export takes the longest)")
    export.add_argument("--verify", action="store_true",
                        help="score the compact model on the dev sets and compare with the end of training")
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher may append --local_rank=N; LOCAL_RANK is in the environment anyway
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if argv[:1] == ["tune"]:  # its own parser: python -m tune
        from tune.__main__ import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as err:
        print(f"mtp: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
