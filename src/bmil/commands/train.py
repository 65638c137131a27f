"""``bmil train``: stage 1 then stage 2 as configured; writes ``summary.json`` and prints the
scores of the selected and the last evaluated model of each stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bmil.commands import config_from_args


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


def run(args: argparse.Namespace) -> int:
    """Train, write OUTPUT/summary.json, print the result table (main process only)."""
    from bmil.engine.distributed import shutdown
    from bmil.engine.trainer import Trainer

    cfg = config_from_args(args)
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
