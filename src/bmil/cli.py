"""The ``bmil`` command: its parser, and the dispatch to the command's module in
:mod:`bmil.commands` (imported only when that command runs). With the commands it owns all
console output; user errors become one sentence on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bmil.commands import PRESETS
from bmil.errors import BmilError

log = logging.getLogger("bmil")

# each command's module under bmil.commands, whose run(args) the command calls
MODULES = {
    "train": "train",
    "eval": "evaluate",
    "demo": "demo",
    "check-data": "check_data",
    "cluster-scan": "cluster_scan",
    "extract": "extract",
    "search": "search",
    "export": "export",
    "analyze": "analyze",
}

EPILOG = """\
examples:
  bmil demo                                   # synthetic data, CPU, a few minutes
  bmil train --config sysu data.root=/data/SYSU-MM01
  bmil train --config regdb data.root=/data/RegDB data.trial=3 output=runs/regdb3
  bmil eval --config sysu data.root=/data/SYSU-MM01 --checkpoint runs/sysu/checkpoints/best_stage2.pt
  bmil check-data --dataset sysu /data/SYSU-MM01
  bmil cluster-scan --config sysu data.root=/data/SYSU-MM01 --checkpoint CKPT --eps 0.3:0.7:0.05
  bmil extract --checkpoint CKPT --images my_images/visible --out gallery.npz --ids-from-folders
  bmil search --checkpoint CKPT --gallery gallery.npz --query ir.jpg --query-id anna --out ranks.png
  bmil export --checkpoint CKPT --format onnx --out exported/
  bmil analyze --checkpoint CKPT --out figures/       (docs/inference.md explains these four)

--config takes a YAML file or a preset name: sysu, regdb, llcm, folder, folder-small, demo, ablation/m1 … ablation/m6.
Any configuration value can be overridden as section.key=value (see configs/sysu.yaml for the keys).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmil",
        description="Unsupervised visible-infrared person re-identification (BMIL, AAAI 2026).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bmil {package_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also the INFO lines of the libraries bmil calls (e.g. the ONNX exporter)")
    # -q / -v are accepted after the command too; SUPPRESS keeps them from resetting the top level's
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="as bmil -q")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as bmil -v")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class _Sub:  # every sub-command parser takes the common options
        @staticmethod
        def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
            return subparsers.add_parser(name, parents=[common], **kwargs)

    sub = _Sub()

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help=f"YAML file or preset name ({PRESETS})")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.lr=1e-4 data.root=/data")

    def with_checkpoint(p: argparse.ArgumentParser, help: str = "a .pt file written by bmil train") -> None:
        p.add_argument("--checkpoint", required=True, help=help)

    def with_device(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")

    p = sub.add_parser("train", help="train stage 1 then stage 2 as configured")
    with_config(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")

    p = sub.add_parser("eval", help="evaluate a checkpoint with the dataset's test protocol")
    with_config(p)
    with_checkpoint(p)

    p = sub.add_parser("demo", help="generate the synthetic dataset, train both stages on the CPU, print results")
    p.add_argument("--out", help="run folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/demo.yaml")

    p = sub.add_parser("check-data", help="compare a dataset folder with the published counts; list bad images")
    p.add_argument("--dataset", required=True, help="a data.dataset name (not synthetic)")
    p.add_argument("root", help="dataset root folder")
    p.add_argument("--ids-from-folders", action=argparse.BooleanOptionalAction, default=None,
                   help="folder only: read <camera>/<person id>/ folders as ids (default: decided from the layout)")

    p = sub.add_parser("cluster-scan", help="cluster counts, outliers and ARI/NMI for a range of DBSCAN eps")
    with_config(p)
    with_checkpoint(p)
    p.add_argument("--eps", required=True, help="START:STOP:STEP (e.g. 0.3:0.7:0.05, both ends included) or 0.4,0.6")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    with_device(p)

    p = sub.add_parser("extract", help="features of every image under a folder, saved as .npz")
    with_checkpoint(p)
    p.add_argument("--images", required=True,
                   help="folder of images (searched recursively); a folder holding visible/ and infrared/ "
                        "is split by them")
    p.add_argument("--modality", choices=["visible", "infrared", "both"],
                   help="the images' modality; default: from the folder names (FOLDER/visible/, "
                        "FOLDER/infrared/, or a folder itself named visible or infrared)")
    p.add_argument("--out", required=True, help="features file (.npz)")
    p.add_argument("--ids-from-folders", action="store_true",
                   help="person id = the name of the folder each image lies in (any string, e.g. anna)")
    with_device(p)

    p = sub.add_parser("search", help="rank a features file for one query image; draw the rank list")
    with_checkpoint(p, "the checkpoint that extracted the gallery")
    p.add_argument("--query", required=True, help="query image file")
    p.add_argument("--gallery", required=True, help="features file written by bmil extract")
    p.add_argument("--top", type=int, default=10, help="matches to show (default 10)")
    p.add_argument("--query-modality", choices=["visible", "infrared"],
                   help="default: the other modality than the gallery's")
    p.add_argument("--query-id", help="the query's person id (a folder name, e.g. anna or 0007): "
                                     "colours matches green/red")
    p.add_argument("--out", default="rank_list.png", help="rank-list image (default rank_list.png)")
    with_device(p)

    p = sub.add_parser("export", help="export a checkpoint as ONNX, one model per modality")
    with_checkpoint(p)
    p.add_argument("--format", required=True, choices=["onnx"])
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")

    p = sub.add_parser("analyze", help="the paper's diagnostic figures (PNG + JSON) for a checkpoint or a run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="figures 1a, 3, 1b/5 on the training set")
    source.add_argument("--run", help="run folder: pseudo-label quality per epoch (figure 4)")
    p.add_argument("--config", help="dataset configuration (default: the one saved in the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.root=/data/SYSU-MM01")
    p.add_argument("--out", help="output folder (default for --run: RUN/analysis)")
    with_device(p)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command: ``bmil.commands.<module>.run(args)``, its exit status."""
    module = importlib.import_module(f"bmil.commands.{MODULES[args.command]}")
    return module.run(args)


def error_sentence(err: BaseException) -> str:
    """The one-sentence message of a user error. An error raised in a DataLoader worker
    comes back with the worker's traceback in its text; its last line holds the message."""
    text = str(err)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in text:
        prefix = f"{type(err).__name__}: "
        return lines[-1].split(prefix, 1)[1] if prefix in lines[-1] else lines[-1]
    return text


def package_version() -> str:
    """The installed bmil's version (``unknown`` when run from a source tree that was never installed)."""
    from importlib import metadata

    try:
        return metadata.version("bmil")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    previous = log.level
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)  # bmil's own INFO lines unless -q
    try:
        return run_command(args)
    except BmilError as err:
        print(f"error: {error_sentence(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        log.setLevel(previous)


if __name__ == "__main__":
    sys.exit(main())
