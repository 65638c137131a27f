"""benchmarks/recipe_time.py: runs from a source checkout (PYTHONPATH=src) and adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_time", REPO / "benchmarks" / "recipe_time.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recipe_time", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_recipe_counts_hand_worked():
    counts = _load_module().recipe_counts()
    assert counts["s1_iterations"] == counts["s2_iterations"] == 50 * 200
    # Stage-1 epochs extract the clustered visible half + the infrared images (11,129 + 11,909),
    # stage-2 epochs all 34,167; evaluations at epochs 0, 2, ..., 48 of each stage: stage 1
    # on trial 0 (3,803 queries + 384 gallery), stage 2 on 10 trials (+ 3,840).
    assert counts["extract_images"] == 50 * 23_038 + 50 * 34_167 + 25 * (3_803 + 384) + 25 * (3_803 + 3_840)
    assert counts["intra_calls"] == 100 and counts["global_calls"] == 50
    assert counts["eval_trials"] == 25 + 25 * 10


@pytest.mark.e2e
def test_smoke_run_writes_a_complete_table(tmp_path):
    out = tmp_path / "recipe.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recipe_time.py"), "--smoke", "--device", "cpu",
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["complete"], [p for p in result["pieces"] if p["status"] != "ok"]
    names = " ".join(p["name"] for p in result["pieces"])
    for piece in ("stage-1 iteration", "stage-2 iteration", "extraction", "global", "evaluation",
                  "resized-image cache fill", "loader only, stage-1 batch pair (pil jitter, no cache)"):
        assert piece in names
    assert result["loader"] == "data.jitter=tensor, resized-image cache on"
    # The estimate is the sum of (seconds per unit × units) over the pieces.
    total = sum(p["seconds_per_unit"] * p["units"] for p in result["pieces"])
    assert abs(result["recipe_hours"]["fp32"] - total / 3600) < 1e-9 * max(1.0, total)
    assert "estimated recipe, fp32:" in proc.stdout
