"""Shared fixtures: a tiny synthetic dataset and a tiny CPU configuration.

The suite runs on the CPU, also on a machine with GPUs: for every test not marked
``@pytest.mark.cuda`` CUDA looks absent (``device="auto"`` resolves to the CPU, and
processes the tests start see no GPU). Tests marked ``cuda`` are about CUDA; they see the
GPUs and are skipped where there is none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bmil.config import Config, load_config

# Asked before CUDA_VISIBLE_DEVICES is cleared below, so this process keeps its answer.
CUDA_PRESENT = torch.cuda.is_available()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: the test is about CUDA (skipped without a GPU)")
    config.addinivalue_line(
        "markers", "e2e: an end-to-end run (training, a whole command, worker processes); "
        "`-m 'not e2e'` leaves the unit tests"
    )
    # Processes the tests start (CLI subprocesses, DDP workers) run on the CPU.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items) -> None:
    if CUDA_PRESENT:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """CUDA looks absent to tests not marked ``cuda``."""
    if "cuda" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

# tests/helpers.py holds plain functions that assert: report their failures as in a test.
pytest.register_assert_rewrite("helpers")

TINY_SYNTHETIC = {"num_ids": 12, "num_train_ids": 8, "images_per_camera": 3, "height": 64, "width": 32, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from bmil.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, **TINY_SYNTHETIC)
    return root


def tiny_config(root: Path, out: Path, *overrides: str) -> Config:
    """Depth-18, 64×32, a handful of iterations: a whole two-stage run in seconds on a CPU."""
    synthetic = [f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    return load_config(None, [
        "data.dataset=synthetic", f"data.root={root}", *synthetic,
        "data.height=64", "data.width=32", "data.workers=0", "data.cache_images=true", "train.device=cpu",
        "model.depth=18", "model.non_local=false", "model.pretrained=none",
        "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.6",
        "train.stage1_epochs=2", "train.stage2_epochs=2", "train.iterations=2",
        "train.num_ids=4", "train.num_instances=4", "train.eval_every=1", "train.extract_batch=64",
        "eval.trials=2", f"output={out}", *overrides,
    ])


@pytest.fixture(scope="session")
def make_config():
    """The :func:`tiny_config` factory, as a fixture."""
    return tiny_config
