"""Evaluate a saved checkpoint with the configured dataset's protocol."""

from __future__ import annotations

import logging
from pathlib import Path

from bmil.config import Config
from bmil.data.records import Record
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.datasets import run_protocol
from bmil.engine.extract import extract_features, resolve_device
from bmil.errors import CheckpointError
from bmil.model import build_model, model_signature

log = logging.getLogger(__name__)


def check_regdb_trial(cfg: Config, state: dict, path: str | Path) -> None:
    """A RegDB model trained on trial i must not be scored on trial j (its test ids would
    be other people's training ids) unless ``eval.allow_trial_mismatch`` says so."""
    trained = state.get("config", {}).get("data", {})
    if cfg.data.dataset != "regdb" or trained.get("dataset") != "regdb":
        return
    if trained.get("trial") != cfg.data.trial and not cfg.eval.allow_trial_mismatch:
        raise CheckpointError(
            f"checkpoint {path} was trained on RegDB trial {trained.get('trial')} but data.trial={cfg.data.trial}: "
            f"evaluate with data.trial={trained.get('trial')}, or set eval.allow_trial_mismatch=true"
        )


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, progress: bool = True) -> tuple[list, Path | None]:
    """Results of ``checkpoint`` on the test protocol of ``cfg``'s dataset, and the JSON path
    they were written to (``None`` when the dataset has no labels)."""
    from bmil.evaluation import save_results

    state = load_checkpoint(checkpoint)
    check_regdb_trial(cfg, state, checkpoint)
    device = resolve_device(cfg.train.device)
    model = build_model(depth=cfg.model.depth, non_local=cfg.model.non_local, pretrained="none")
    expected = model_signature(model)
    if state.get("signature") not in (None, expected):
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained with {state['signature']}, but the configuration builds "
            f"{expected}: set model.depth/model.non_local to match it"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the configured model") from err
    model.to(device)

    def extract(records: list[Record]):
        return extract_features(
            model, records, height=cfg.data.height, width=cfg.data.width, batch_size=cfg.train.extract_batch,
            device=device, flip=True, workers=cfg.data.workers, amp=cfg.train.amp, progress=progress,
            desc="test features",
        )

    results = run_protocol(cfg, extract)
    if not results:
        return results, None
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval_{cfg.data.dataset}.json"
    save_results(results, path)
    return results, path
