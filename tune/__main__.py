"""python -m tune --config FILE [--address ADDR] [--resume] [dotted.key=value ...]"""

from __future__ import annotations

import argparse
import sys

from mtp.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune", description="Ray Tune search of an mtp experiment")
    parser.add_argument("--config", required=True, help="search YAML (see tune/configs/)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (e.g. auto, or ray://head:10001); default: a local Ray")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search")
    parser.add_argument("--summary-only", action="store_true", help="rewrite the summary of a finished search")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the search YAML")
    args = parser.parse_args(argv)
    try:
        from tune.space import check_space, load_tune_config

        cfg = load_tune_config(args.config, args.overrides)
        base = check_space(cfg)  # every searched key is a valid override of the trainer config
        if not args.summary_only:
            from mtp.checks import check_sources

            check_sources(base)  # the teacher and init_from runs exist and know every task
        from tune.search import run_search, summarize

        if args.summary_only:
            from tune.search import finished_search

            grid = finished_search(cfg)
        else:
            grid = run_search(cfg, address=args.address, resume=args.resume)
        summary = summarize(cfg, grid)
    except ConfigError as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 2
    from tune.search import experiment_path

    print((experiment_path(cfg) / "summary.md").read_text())
    return 0 if summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
