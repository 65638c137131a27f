"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

Two kinds of file: resume files (``last*.pt``) hold everything ``bmil train --resume``
reads, the optimiser and scheduler state and the random-number state included; model
files (``best_*.pt``, read for inference and to start stage 2 with a fresh optimiser) leave
those :data:`RESUME_ONLY` entries out, which makes them about a third the size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bmil.errors import CheckpointError

RESUME_ONLY = ("optimizer", "scheduler", "rng")  # read by --resume only
MODEL_FILE_PREFIX = "best_"


def save_checkpoint(state: dict[str, Any], path: str | Path, *, resumable: bool | None = None) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves either the old or
    the new file, never a truncated one.

    resumable: False leaves the :data:`RESUME_ONLY` entries out; None (default) decides by
    the name: a ``best_*`` file is a model file (False), any other keeps everything."""
    path = Path(path)
    if resumable is None:
        resumable = not path.name.startswith(MODEL_FILE_PREFIX)
    if not resumable:
        state = {key: value for key, value in state.items() if key not in RESUME_ONLY}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any torch.save'd dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt file
        reason = err.__class__.__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}): is it a bmil checkpoint?") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} holds no 'model' entry: is it a bmil checkpoint?")
    return state
