"""The ``bmil`` command. It owns all console output; user errors become one sentence on
stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from bmil.errors import BmilError, ConfigError

log = logging.getLogger("bmil")

EPILOG = """\
examples:
  bmil demo                                   # synthetic data, CPU, a few minutes
  bmil train --config sysu data.root=/data/SYSU-MM01
  bmil train --config regdb data.root=/data/RegDB data.trial=3 output=runs/regdb3
  bmil eval --config sysu data.root=/data/SYSU-MM01 --checkpoint runs/sysu/checkpoints/best_stage2.pt
  bmil check-data --dataset sysu /data/SYSU-MM01

--config takes a YAML file or a preset name: sysu, regdb, llcm, folder, demo, ablation/m1 … ablation/m6.
Any configuration value can be overridden as section.key=value (see configs/sysu.yaml for the keys).
"""


def preset_path(name: str) -> Path:
    """A YAML path, or the packaged preset called ``name``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = Path(str(resources.files("bmil") / "configs" / f"{name}.yaml"))
    if not preset.is_file():
        raise ConfigError(f"config '{name}' is neither a YAML file nor a preset (sysu, regdb, llcm, folder, demo)")
    return preset


def _load(args: argparse.Namespace):
    from bmil.config import load_config

    return load_config(preset_path(args.config), args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from bmil.engine.trainer import Trainer

    cfg = _load(args)
    summary = Trainer(cfg, resume=args.resume, progress=not args.quiet).fit()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bmil.config import load_config
    from bmil.engine.demo import demo_table, run_demo

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output={args.out}")
    cfg = load_config(preset_path("demo"), overrides)
    summary = run_demo(cfg, progress=not args.quiet)
    print(demo_table(summary))
    print(f"\nsummary written to {Path(cfg.output) / 'summary.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bmil.engine.evaluate import evaluate_checkpoint
    from bmil.evaluation import results_table

    cfg = _load(args)
    results, path = evaluate_checkpoint(cfg, args.checkpoint, progress=not args.quiet)
    if not results:
        print("no evaluation: this dataset has no person ids, so no score can be computed")
        return 0
    print(results_table(results))
    print(f"\nresults written to {path}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from bmil.data.check import check_dataset

    problems = check_dataset(args.dataset, args.root)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} difference(s) from the published {args.dataset} dataset")
        return 1
    print(f"{args.root}: matches the published {args.dataset} counts, every image readable")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmil",
        description="Unsupervised visible-infrared person re-identification (BMIL, AAAI 2026).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="YAML file or preset name (sysu, regdb, llcm, folder, demo)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-4 data.root=/data")

    p = sub.add_parser("train", help="train stage 1 then stage 2 as configured")
    with_config(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint with the dataset's test protocol")
    with_config(p)
    p.add_argument("--checkpoint", required=True, help="a .pt file written by bmil train")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="generate the synthetic dataset, train both stages on the CPU, print results")
    p.add_argument("--out", help="run folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/demo.yaml")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-data", help="compare a dataset folder with the published counts; list bad images")
    p.add_argument("--dataset", required=True, choices=["sysu", "regdb", "llcm", "folder"])
    p.add_argument("root", help="dataset root folder")
    p.set_defaults(func=cmd_check_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except BmilError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
