"""engine/run_log.py: run.json records everything needed to reproduce a run (command, device,
batch sizes, library versions, git commit)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import torch

from bmil.engine.run_log import write_run_info
from helpers import REPO


def test_run_json_records_everything_needed_to_reproduce(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bmil", "train", "--config", "sysu"])
    write_run_info(tmp_path, device="cpu", world_size=1, per_process_batch=128, bn_batch=384, sync_bn=False)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["world_size"] == 1 and info["per_process_batch"] == 128 and info["effective_bn_batch"] == 384
    assert info["device"] == "cpu" and info["command"] == ["bmil", "train", "--config", "sysu"]
    versions = info["versions"]
    assert versions["python"] == platform.python_version()
    def base(version: str) -> str:
        return version.split("+")[0]

    assert base(versions["torch"]) == base(torch.__version__)
    import faiss
    import sklearn
    import torchvision

    assert base(versions["torchvision"]) == base(torchvision.__version__)
    assert versions["scikit-learn"] == sklearn.__version__
    assert versions["faiss"] and base(versions["faiss"]) == base(faiss.__version__)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert info["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
