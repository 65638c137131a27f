"""What a run writes beside its checkpoints: metrics.jsonl, TensorBoard events, run.json."""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


class RunLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors every numeric
    value to TensorBoard under its key (``loss/intra`` etc.).

    On resume, lines of epochs at or after the resumed epoch are dropped so the log
    matches an uninterrupted run.
    """

    def __init__(self, out_dir: str | Path, resume_epoch: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if resume_epoch is not None and self.path.exists():
            self._truncate(resume_epoch)
        self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def _truncate(self, epoch: int) -> None:
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", -1) < epoch
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        record = _jsonable(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_info(out_dir: str | Path, *, device: str, world_size: int, per_process_batch: int,
                   bn_batch: int, sync_bn: bool) -> dict[str, Any]:
    """Write ``run.json``: world size, batches (per process and as BatchNorm sees it), the
    versions that change numbers, the device, the git commit and the command line."""
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "git_commit": _git_commit(),
        "device": device,
        "world_size": world_size,
        "per_process_batch": per_process_batch,
        "effective_bn_batch": bn_batch,
        "sync_bn": sync_bn,
        "versions": {
            "python": platform.python_version(),
            "bmil": _version("bmil"),
            "torch": _version("torch"),
            "torchvision": _version("torchvision"),
            "scikit-learn": _version("scikit-learn"),
            "faiss": _version("faiss-cpu") or _version("faiss-gpu"),
            "numpy": _version("numpy"),
        },
    }
    Path(out_dir, "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
