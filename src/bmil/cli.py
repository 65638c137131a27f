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
PRESETS = "sysu, regdb, llcm, folder, folder-small, demo, ablation/m1 … ablation/m6"

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


def preset_path(name: str) -> Path:
    """A YAML path, or the packaged preset called ``name``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    preset = Path(str(resources.files("bmil") / "configs" / f"{name}.yaml"))
    if not preset.is_file():
        raise ConfigError(f"config '{name}' is neither a YAML file nor a preset ({PRESETS})")
    return preset


def _load(args: argparse.Namespace):
    from bmil.config import load_config

    return load_config(preset_path(args.config), args.overrides)


def train_table(summary: dict) -> str:
    """Markdown: per stage, the selected (best) and the last evaluated model, one row per
    evaluated setting, scores in percent as ``bmil eval`` prints them."""
    keys = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
    lines = ["| Stage | Model | Epoch | Setting | R1 | R5 | R10 | R20 | mAP | mINP |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for stage, entry in summary.items():
        for model, part in (("best", entry), ("last", entry["last"])):
            for setting, scores in part["metrics"].items():
                cells = [f"{100.0 * scores[k]:.1f}" if k in scores else "–" for k in keys]
                lines.append(f"| {stage.removeprefix('stage')} | {model} | {part['epoch']} | {setting} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cmd_train(args: argparse.Namespace) -> int:
    from bmil.engine.distributed import shutdown
    from bmil.engine.trainer import Trainer

    cfg = _load(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet)
    try:
        summary = trainer.fit()
    finally:
        shutdown(trainer.run.dist)  # leave the process group (torchrun) before the process ends
    if not trainer.run.dist.is_main:  # one summary per job, not one per process
        return 0
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if summary:
        print(train_table(summary))
        selected_by = next(iter(summary.values()))["selected_by"]
        print(f"best: {selected_by}; last: the stage's last evaluated epoch")
    else:
        print("no evaluation: this dataset has no person ids, so no score was computed")
    print(f"checkpoints in {out / 'checkpoints'}, summary written to {out / 'summary.json'}")
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
        print("no evaluation: this dataset has no person ids, so no score can be computed "
              "(a folder laid out as <camera>/<person id>/ is scored with data.ids_from_folders=true)")
        return 0
    print(results_table(results))
    print(f"\nresults written to {path}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from bmil.data.check import check_report
    from bmil.data.registry import get_dataset

    entry = get_dataset(args.dataset, checkable=True)
    report = check_report(args.dataset, args.root, ids_from_folders=args.ids_from_folders)
    published = bool(entry.published_counts)
    if not published:  # nothing to compare with: say what was found
        for line in report.notes:
            print(line)
        for key, value in report.counts.items():
            print(f"{key}: {value}")
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.problems:
        print(line)
    if report.problems:
        what = f"difference(s) from the published {args.dataset} dataset" if published else f"problem(s) in {args.root}"
        print(f"{len(report.problems)} {what}")
        return 1
    warned = f" ({len(report.warnings)} warning(s) above)" if report.warnings else ""
    if published:
        print(f"{args.root}: matches the published {args.dataset} counts, every image readable{warned}")
    else:
        print(f"{args.root}: no problem found, every image readable{warned}")
    return 0


def cmd_cluster_scan(args: argparse.Namespace) -> int:
    from bmil.engine.cluster_scan import cluster_scan, parse_eps, scan_table
    from bmil.engine.extract import resolve_device

    eps_values = parse_eps(args.eps)
    cfg = _load(args)
    rows = cluster_scan(cfg, args.checkpoint, eps_values, resolve_device(args.device), progress=not args.quiet)
    print(f"{cfg.data.dataset} training set, k1={cfg.cluster.k1}, k2={cfg.cluster.k2}, "
          f"min_samples={cfg.cluster.min_samples}, {'modality-aware' if cfg.cluster.modality_aware else 'plain'} "
          "global distance; visible images clustered whole (no subset)")
    print(scan_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows written to {args.out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from bmil.data.records import MODALITY_NAMES
    from bmil.engine.extract import resolve_device
    from bmil.engine.inference import load_model
    from bmil.engine.search import extract_folder, parse_modality, save_features

    modality = None if args.modality in (None, "both") else parse_modality(args.modality)
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    if cfg.train.channels_last:  # the layout extraction gives the images
        model = model.to(memory_format=torch.channels_last)
    feats = extract_folder(
        model, cfg, args.images, modality, ids_from_folders=args.ids_from_folders, device=device,
        progress=not args.quiet,
    )
    path = save_features(feats, args.out)
    counts = ", ".join(f"{int((feats.modality == m).sum())} {name}" for m, name in MODALITY_NAMES.items()
                       if (feats.modality == m).any())
    print(f"{counts} images, {feats.features.shape[1]}-d features written to {path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from bmil.analysis.rank_list import draw_rank_list
    from bmil.data.records import MODALITY_NAMES
    from bmil.engine import search
    from bmil.engine.extract import resolve_device
    from bmil.engine.inference import load_model
    from bmil.errors import DatasetError

    gallery = search.load_features(args.gallery)
    modality = search.query_modality(gallery, args.query_modality, args.gallery)
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    query = search.embed_image(model, cfg, args.query, modality, device)
    if query.shape[0] != gallery.features.shape[1]:
        raise DatasetError(f"gallery {args.gallery} holds {gallery.features.shape[1]}-d features, "
                           f"but this checkpoint gives {query.shape[0]}-d ones")
    rows = search.cross_modality_rows(gallery, modality)
    if len(rows) < len(gallery.paths):
        log.info("the gallery holds both modalities: ranking its %d %s images", len(rows),
                 MODALITY_NAMES[int(gallery.modality[rows[0]])] if len(rows) else "other-modality")
    picked, scores = search.rank_gallery(query, gallery.features[rows], args.top)
    order = rows[picked]
    flags = search.match_flags(gallery, order, args.query_id)
    ids = None if gallery.pids is None else [gallery.pids[i] or "?" for i in order]
    print(f"query {args.query} ({MODALITY_NAMES[modality]}"
          f"{f', id {args.query_id}' if args.query_id is not None else ''})")
    for rank, (i, score) in enumerate(zip(order, scores, strict=True)):
        pid = f"  id {ids[rank]}" if ids is not None else ""
        mark = {True: "  match", False: "  wrong", None: ""}[flags[rank]] if flags else ""
        print(f"{rank + 1:3d}  {score:.4f}{pid}  {gallery.paths[i]}{mark}")
    out = draw_rank_list(args.query, [gallery.paths[i] for i in order], scores, flags, args.out,
                         query_id=args.query_id, match_ids=ids)
    print(f"\nrank list written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from bmil.engine.export import export_onnx, onnx_max_difference, require_onnx
    from bmil.engine.inference import load_model

    require_onnx()
    if not args.verbose:  # the exporter's own INFO lines (onnxscript prints dozens) only when asked
        for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
            logging.getLogger(name).setLevel(logging.WARNING)
    model, cfg = load_model(args.checkpoint, "cpu")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    paths = export_onnx(model, out, cfg.data.height, cfg.data.width, stem=Path(args.checkpoint).stem,
                        resize=cfg.eval.resize)
    images = torch.randn(2, 3, cfg.data.height, cfg.data.width, generator=torch.Generator().manual_seed(0))
    for modality, path in paths.items():
        line = f"wrote {path}"
        if not args.no_check:
            line += f" (largest difference from PyTorch: {onnx_max_difference(path, model, modality, images):.2e})"
        print(line)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bmil.analysis import analyze_features, analyze_run

    if args.run:
        written = analyze_run(args.run, args.out)
    else:
        from bmil.config import apply_overrides, load_config
        from bmil.data.records import record_arrays
        from bmil.engine.extract import resolve_device
        from bmil.engine.inference import load_model, train_set_features

        if not args.out:
            raise ConfigError("bmil analyze --checkpoint needs --out DIR for the figures")
        device = resolve_device(args.device)
        model, trained = load_model(args.checkpoint, device)
        if args.config:
            cfg = load_config(preset_path(args.config), args.overrides)
        else:
            cfg = apply_overrides(trained, args.overrides) if args.overrides else trained
        # the network's input size is the checkpoint's, whatever the configuration says
        cfg = replace(cfg, data=replace(cfg.data, height=trained.data.height, width=trained.data.width))
        feats, records = train_set_features(model, cfg, device, progress=not args.quiet)
        pids, _, modality = record_arrays(records)
        written = analyze_features(feats, modality, pids, args.out, cfg.cluster, seed=cfg.train.seed)
    for name in sorted(written):
        print(written[name])
    return 0


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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint with the dataset's test protocol")
    with_config(p)
    with_checkpoint(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="generate the synthetic dataset, train both stages on the CPU, print results")
    p.add_argument("--out", help="run folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of configs/demo.yaml")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-data", help="compare a dataset folder with the published counts; list bad images")
    p.add_argument("--dataset", required=True, help="a data.dataset name (not synthetic)")
    p.add_argument("root", help="dataset root folder")
    p.add_argument("--ids-from-folders", action=argparse.BooleanOptionalAction, default=None,
                   help="folder only: read <camera>/<person id>/ folders as ids (default: decided from the layout)")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("cluster-scan", help="cluster counts, outliers and ARI/NMI for a range of DBSCAN eps")
    with_config(p)
    with_checkpoint(p)
    p.add_argument("--eps", required=True, help="START:STOP:STEP (e.g. 0.3:0.7:0.05, both ends included) or 0.4,0.6")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    with_device(p)
    p.set_defaults(func=cmd_cluster_scan)

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
    p.set_defaults(func=cmd_extract)

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
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export a checkpoint as ONNX, one model per modality")
    with_checkpoint(p)
    p.add_argument("--format", required=True, choices=["onnx"])
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="the paper's diagnostic figures (PNG + JSON) for a checkpoint or a run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="figures 1a, 3, 1b/5 on the training set")
    source.add_argument("--run", help="run folder: pseudo-label quality per epoch (figure 4)")
    p.add_argument("--config", help="dataset configuration (default: the one saved in the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.root=/data/SYSU-MM01")
    p.add_argument("--out", help="output folder (default for --run: RUN/analysis)")
    with_device(p)
    p.set_defaults(func=cmd_analyze)
    return parser


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
        return args.func(args)
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
