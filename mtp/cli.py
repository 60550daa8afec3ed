"""`mtp` command line: check a config, train (as one rank of a DeepSpeed job).

Any `ConfigError` ends the command with its one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mtp.config import ConfigError, ExperimentConfig, load_config


def check_experiment(cfg: ExperimentConfig, world_size: int, resume: bool) -> dict[str, int]:
    """Everything that can be checked before processes start: files, rows, labels, configs, output dir."""
    from mtp.data import MultitaskSampler, load_tasks, task_probabilities
    from mtp.model import load_tokenizer
    from mtp.train import CHECKPOINTS, build_ds_config

    build_ds_config(cfg, world_size)
    ckpts = Path(cfg.output_dir) / CHECKPOINTS
    has_ckpt = (ckpts / "latest").exists()
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: no checkpoint in {ckpts}")
    if not resume and has_ckpt:
        raise ConfigError(f"output_dir: {cfg.output_dir} already holds checkpoints; pass --resume to continue "
                          "or choose another output_dir")
    _check_encoder(cfg)
    check_sources(cfg)
    tokenizer = load_tokenizer(cfg.encoder)
    tasks = load_tasks(cfg)
    _check_budget(cfg, tasks, tokenizer.pad_token_id)
    sizes = {t.name: len(t.train_texts) for t in tasks}
    MultitaskSampler(sizes, task_probabilities(cfg, sizes), cfg.train.micro_batch_size, 0, world_size, 0)
    return sizes


def _check_encoder(cfg: ExperimentConfig) -> None:
    from transformers import AutoConfig

    from mtp.model import PRUNABLE_BY_ARCH, resolve_encoder_path

    source = resolve_encoder_path(cfg.encoder.name)
    try:
        hf = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"encoder.name: cannot load {source!r}: {str(err).splitlines()[0]}") from None
    if hf.model_type not in PRUNABLE_BY_ARCH:
        raise ConfigError(f"encoder.name: architecture {hf.model_type!r} is not supported")
    for key in cfg.encoder.config_overrides:
        if not hasattr(hf, key):
            raise ConfigError(f"encoder.config_overrides.{key}: not a field of {type(hf).__name__}")


def _run_tasks(run_dir: str, key: str) -> list[str] | None:
    """The task names of a finished mtp run folder (from its final/mtp.json), None if it is not one."""
    meta = Path(run_dir) / "final" / "mtp.json"
    if not (Path(run_dir) / "final" / "model.safetensors").is_file() or not meta.is_file():
        return None
    try:
        return [t["name"] for t in json.loads(meta.read_text())["tasks"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{key}: {meta} is not an mtp run's final/mtp.json") from None


def check_sources(cfg: ExperimentConfig) -> None:
    """encoder.init_from and distill.teacher name something that can give what the config asks of it."""
    tasks = [t.name for t in cfg.tasks]
    if cfg.encoder.init_from:
        found = _run_tasks(cfg.encoder.init_from, "encoder.init_from")
        if found is None:
            raise ConfigError(f"encoder.init_from: {cfg.encoder.init_from} holds no finished mtp run "
                              "(no final/model.safetensors)")
        missing = [t for t in tasks if t not in found]
        if missing:
            raise ConfigError(f"encoder.init_from: {cfg.encoder.init_from} has no head for task {missing[0]!r}")
    d = cfg.distill
    if d.teacher is None:
        return
    found = _run_tasks(d.teacher, "distill.teacher")
    if found is None:
        if d.logit_weight > 0:
            raise ConfigError(f"distill.teacher: {d.teacher} is not a finished mtp run, so it has no task heads; "
                              "set distill.logit_weight=0 to distil hidden states only")
        from transformers import AutoConfig

        from mtp.model import resolve_encoder_path

        try:
            AutoConfig.from_pretrained(resolve_encoder_path(d.teacher))
        except (OSError, ValueError) as err:
            raise ConfigError(f"distill.teacher: cannot load {d.teacher!r}: {str(err).splitlines()[0]}") from None
    elif d.logit_weight > 0 and any(t not in found for t in tasks):
        missing = next(t for t in tasks if t not in found)
        raise ConfigError(f"distill.teacher: {d.teacher} has no head for task {missing!r} "
                          "(set distill.logit_weight=0 to distil hidden states only)")


def _check_budget(cfg: ExperimentConfig, tasks: list, pad_token_id: int | None) -> None:
    """An infeasible pruning budget is refused here, from the architecture alone (no weights are loaded)."""
    if cfg.pruning.method == "none":
        return
    import torch

    from mtp.model import MultitaskModel, TaskInfo, load_encoder, parameter_counts
    from mtp.pruning import make_budget

    meta_cfg = cfg.encoder.model_copy(update={"random_init": True})
    with torch.device("meta"):
        model = MultitaskModel(load_encoder(meta_cfg, pad_token_id), [TaskInfo(t.name, t.num_labels) for t in tasks])
    make_budget(parameter_counts(model), cfg.pruning.budget)


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sizes = check_experiment(cfg, args.world_size, args.resume)
    print(f"config ok: {len(sizes)} tasks ({', '.join(f'{k} {v}' for k, v in sizes.items())} training rows)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mtp.train import run_training

    cfg = load_config(args.config, args.overrides)
    run_training(cfg, resume=args.resume)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mtp.export import export_run, verify_export

    out = export_run(args.run_dir, args.out)
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
    import shlex

    from mtp.compare import load_compare_config, plan_runs, run_all, write_report

    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as err:
            raise ConfigError(f"--only: {args.only!r} is not a regular expression ({err})") from None
    cfg = load_compare_config(args.config, args.overrides)
    base = Path(cfg.base)
    if not base.is_file():
        from mtp.config import resolve_path

        base = resolve_path(cfg.base, f"{args.config}: base")
    exp = load_config(base, list(cfg.overrides))
    tasks = [t.name for t in exp.tasks]
    unknown = [t for t in cfg.low_resource_tasks if t not in tasks and t not in ("rte", "mrpc", "stsb")]
    if unknown:
        raise ConfigError(f"{args.config}: low_resource_tasks: {unknown[0]!r} is not a task of {cfg.base}")
    plan = plan_runs(cfg, tasks)
    # check one multitask and one single-task run of the plan before anything trains (exit 2 on errors)
    for spec in (plan[0], next(s for s in plan if s.task is not None)):
        overrides = [*cfg.overrides, *spec.overrides, "output_dir=/nonexistent/mtp-check"]
        if spec.method != "none":
            overrides += [f"pruning.method={spec.method}", f"pruning.budget={min(cfg.budgets + cfg.single_task_sizes)}"]
        check_experiment(load_config(base, overrides), cfg.nproc, resume=False)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "compare.yaml").write_text(Path(args.config).read_text())
    if not args.report_only:
        status = run_all(cfg, base, parallel=args.parallel, only=args.only)
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        if failed:
            print(f"mtp compare: {len(failed)} runs failed: {', '.join(failed)} (see their launch.log)",
                  file=sys.stderr)
    command = " ".join(["mtp compare --config", shlex.quote(str(args.config)), *map(shlex.quote, args.overrides)])
    report = write_report(cfg, base, command)
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
    compare.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the compare YAML")
    compare.set_defaults(func=_cmd_compare)
    sub.add_parser("tune", help="Ray Tune search: the same as python -m tune (see its --help)", add_help=False)
    export = sub.add_parser("export", help="write a finished run as a Hugging Face checkpoint and a compact model")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, default=None, help="export folder (default: RUN_DIR/export)")
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
