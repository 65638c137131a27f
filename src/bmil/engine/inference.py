"""A trained model from a checkpoint alone: the architecture comes from the configuration
saved inside it, so no configuration file is needed at inference time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.config import Config, config_from_dict
from bmil.data.records import Record
from bmil.engine.checkpoint import load_checkpoint
from bmil.engine.extract import extract_features
from bmil.errors import CheckpointError, ConfigError
from bmil.model import build_model, model_signature


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """The model of ``checkpoint`` in eval mode on ``device``, and the run's configuration.

    The checkpoint must hold ``config`` (a dict from ``config_to_dict``), ``model`` (the
    state dict) and, when present, ``signature`` (checked against the rebuilt model).
    Raises CheckpointError for a missing, unreadable or mismatching file.
    """
    state = load_checkpoint(checkpoint)
    values = state.get("config")
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {checkpoint} holds no saved configuration: was it written by bmil train?")
    try:
        cfg = config_from_dict(values)
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {checkpoint} holds a configuration this bmil cannot read ({err})") from err
    model = build_model(depth=cfg.model.depth, non_local=cfg.model.non_local, pretrained="none")
    expected = model_signature(model)
    if state.get("signature") not in (None, expected):
        raise CheckpointError(
            f"checkpoint {checkpoint} has signature {state['signature']} but its configuration builds {expected}"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model its configuration describes") from err
    return model.to(torch.device(device)).eval(), cfg


def train_set_features(
    model: nn.Module, cfg: Config, device: torch.device | str = "cpu", *, progress: bool = True
) -> tuple[np.ndarray, list[Record]]:
    """Test features [N, D] (flip-averaged, L2-normalised) of ``cfg``'s training images, and
    their records (person ids -1 where the dataset has none)."""
    from bmil.engine.datasets import train_records

    records = train_records(cfg)
    feats = extract_features(
        model, records, height=cfg.data.height, width=cfg.data.width, batch_size=cfg.train.extract_batch,
        device=device, flip=True, workers=cfg.data.workers, amp=cfg.train.amp, progress=progress,
        desc="train features",
    )
    return feats, records
