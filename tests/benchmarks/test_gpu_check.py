"""The GPU machine check (benchmarks/gpu_check.py) runs every section it can at tiny sizes
on the CPU (``--device cpu --smoke``), so its code paths work before it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_smoke_on_the_cpu_passes_and_writes_json(gpu_check, tmp_path, capsys):
    # Every section but `train` (three tiny trainings: the CLI tests cover that path).
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--only", "env,model,nccl,cluster,throughput",
                         "--budget-s", "600", "--out", str(out)])
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if r["status"] == "FAIL"]
    assert rc == 0 and not failed, failed
    passed = {(r["section"], r["check"]) for r in rows if r["status"] == "PASS"}
    for expected in [("model", "fp32 vs CPU"), ("model", "bf16 training step"), ("model", "resume optimizer layout"),
                     ("nccl", "DDP steps"), ("cluster", "kNN device vs CPU"), ("cluster", "Jaccard device vs CPU"),
                     ("throughput", "with the real loader"), ("env", "clustering without faiss")]:
        assert expected in passed
    assert "status" in table.splitlines()[0] and "DDP steps" in table
    assert not any(r["section"] == "train" for r in rows)


def test_a_failing_check_is_a_row_and_the_exit_code(gpu_check, tmp_path, capsys, monkeypatch):
    def broken(self):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(gpu_check.GpuCheck, "cluster", broken)
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--only", "cluster,env", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 1
    assert any(r["section"] == "cluster" and r["status"] == "FAIL" and "no such kernel" in r["result"] for r in rows)
    assert any(r["section"] == "env" and r["status"] == "PASS" for r in rows)  # the other section still ran


def test_budget_skips_sections_that_do_not_fit(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--only", "model", "--budget-s", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["section"], r["status"]) for r in rows if r["section"] == "model"] == [("model", "SKIP")]
