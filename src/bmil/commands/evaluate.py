"""``bmil eval``: evaluate a saved checkpoint with the configured dataset's protocol."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from bmil.commands import config_from_args
from bmil.config import Config
from bmil.datasets import get_dataset
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.data_setup import can_score, run_protocol
from bmil.errors import CheckpointError
from bmil.inference import feature_extractor, load_model, resolve_device
from bmil.model import model_signature

log = logging.getLogger(__name__)


def check_trained_trial(cfg: Config, state: dict, path: str | Path) -> None:
    """A model of a per-trial dataset (RegDB) trained on split i must not be scored on
    split j (its test ids would be other people's training ids) unless
    ``eval.allow_trial_mismatch`` says so."""
    entry = get_dataset(cfg.data.dataset)
    trained = state.get("config", {}).get("data", {})
    if not entry.per_trial or trained.get("dataset") != entry.name:
        return
    if trained.get("trial") != cfg.data.trial and not cfg.eval.allow_trial_mismatch:
        raise CheckpointError(
            f"checkpoint {path} was trained on {entry.title} trial {trained.get('trial')} but "
            f"data.trial={cfg.data.trial}: evaluate with data.trial={trained.get('trial')}, "
            "or set eval.allow_trial_mismatch=true"
        )


def result_path(cfg: Config, checkpoint: str | Path) -> Path:
    """Where ``bmil eval`` writes its results: ``eval_<dataset>[_trial<t>]_<checkpoint
    name>.json`` in ``cfg.output``, so scoring another checkpoint or trial keeps the others."""
    trial = f"_trial{cfg.data.trial}" if get_dataset(cfg.data.dataset).per_trial else ""
    return Path(cfg.output) / f"eval_{cfg.data.dataset}{trial}_{Path(checkpoint).stem}.json"


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, progress: bool = True) -> tuple[list, Path | None]:
    """Results of ``checkpoint`` on the test protocol of ``cfg``'s dataset, and the JSON path
    they were written to (:func:`result_path`; ``None`` when the dataset cannot be scored).

    The network (its ``model:`` section) and its input size (``data.height`` × ``data.width``)
    come from the checkpoint, as for every other command; ``cfg`` decides the data, the
    protocol and the resize (``eval.resize``)."""
    from bmil.evaluation import save_results

    state = load_checkpoint(checkpoint)
    check_trained_trial(cfg, state, checkpoint)
    device = resolve_device(cfg.train.device)
    model, trained = load_model(checkpoint, device, state=state)
    size = (trained.data.height, trained.data.width)
    log.info("model read from the checkpoint: %s, input %d×%d (the configuration's model section is not used)",
             ", ".join(f"{k}={v}" for k, v in model_signature(model).items()), *size)
    if cfg.train.channels_last:  # the layout extraction gives the images
        model = model.to(memory_format=torch.channels_last)
    if not can_score(cfg):
        return run_protocol(cfg, lambda records: None), None
    results = run_protocol(cfg, feature_extractor(model, cfg, device, progress=progress, size=size))
    path = result_path(cfg, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_results(results, path)
    return results, path


def run(args: argparse.Namespace) -> int:
    """Score ``--checkpoint`` and print the results table (or why there is no score)."""
    from bmil.evaluation import results_table

    cfg = config_from_args(args)
    results, path = evaluate_checkpoint(cfg, args.checkpoint, progress=not args.quiet)
    if not results:
        print("no evaluation: this dataset has no person ids, so no score can be computed "
              "(a folder laid out as <camera>/<person id>/ is scored with data.ids_from_folders=true)")
        return 0
    print(results_table(results))
    print(f"\nresults written to {path}")
    return 0
