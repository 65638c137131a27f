"""Figure 4: pseudo-label quality per epoch, read from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bmil.errors import DatasetError

CURVE_KEYS = ("ari/visible", "ari/infrared", "global/ari", "global/cross_precision")


def read_curves(run_dir: str | Path, keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, dict[str, list]]:
    """{key: {"epoch": [...], "value": [...]}} for each key some epoch logged with a
    finite number; epochs in file order. DatasetError when the log is missing or unreadable."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DatasetError(f"run folder {run_dir} has no metrics.jsonl: is it a bmil run folder?")
    curves: dict[str, dict[str, list]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} line {number} is not JSON") from err
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                curve = curves.setdefault(key, {"epoch": [], "value": []})
                curve["epoch"].append(int(record.get("epoch", len(curve["epoch"]))))
                curve["value"].append(float(value))
    return curves
