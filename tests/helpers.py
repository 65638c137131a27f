"""Plain helpers shared by several test files (the fixtures are in conftest.py): the repository
root, the CLI with captured output, clustered unit features, and the smallest two-stage run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bmil import cli
from bmil.engine.run_log import read_metrics

REPO = Path(__file__).resolve().parents[1]

# One epoch per stage, one step, 2 × 4 images per modality: the smallest run that crosses
# the stage boundary.
SHORT = ("train.stage1_epochs=1", "train.stage2_epochs=1", "train.iterations=1", "train.eval_every=5",
         "train.num_ids=2", "train.num_instances=4")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def clustered_features(sizes: dict[int, int], ids: int = 4, dim: int = 32, seed: int = 0):
    """Unit features of ``ids`` people; ``sizes`` = {modality: count}. Returns (x, modality, pids)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    shift = rng.normal(size=dim) * 0.3  # a modality gap
    feats, mods, pids = [], [], []
    for modality, count in sizes.items():
        pid = np.arange(count) % ids
        x = centres[pid] + 0.15 * rng.normal(size=(count, dim)) + modality * shift
        feats.append(x)
        mods.append(np.full(count, modality))
        pids.append(pid)
    x = np.concatenate(feats).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.concatenate(mods).astype(np.int64), np.concatenate(pids).astype(np.int64)


def finite_losses(out: Path) -> list[float]:
    """Every ``loss/…`` value of ``out``/metrics.jsonl, each asserted finite."""
    values = []
    for record in read_metrics(out / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith("loss/"):
                assert math.isfinite(value), (record["epoch"], key, value)
                values.append(value)
    return values
