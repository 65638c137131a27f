"""engine/memory_check.py: the memory available to clustering, and the check that stops a
clustering (or a training run, at start-up) that cannot fit with one sentence before any
distance is computed."""

from __future__ import annotations

import pytest

from bmil.cluster import estimate_jaccard_memory
from bmil.config import ClusterConfig, save_config
from bmil.data.records import INFRARED, VISIBLE
from bmil.engine import association, memory_check
from bmil.errors import BmilError
from helpers import clustered_features, run_cli


def test_meminfo_parsing():
    text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12345678 kB\n"
    assert memory_check.parse_meminfo(text) == 12345678 * 1024
    assert memory_check.parse_meminfo("MemTotal: 1 kB\n") is None
    assert memory_check.host_available_memory() > 0


def test_clustering_that_cannot_fit_stops_with_one_sentence():
    cfg = ClusterConfig(k1=30, block_size=2048)
    estimate = estimate_jaccard_memory(34167, 30, 2048, 2048, max_distance=cfg.eps)
    assert memory_check.require_clustering_memory(34167, 2048, 30, cfg, available=estimate) == estimate
    with pytest.raises(memory_check.ClusteringMemoryError) as err:
        memory_check.require_clustering_memory(34167, 2048, 30, cfg, available=estimate - 1)
    message = str(err.value)
    assert isinstance(err.value, BmilError) and "\n" not in message
    assert "N = 34167" in message and f"{estimate / 2**30:.2f} GiB" in message
    assert "cluster.block_size" in message and "cluster.backend=faiss" in message
    off = ClusterConfig(memory_check=False)
    assert memory_check.require_clustering_memory(34167, 2048, 30, off, available=1) == estimate


def test_cluster_once_checks_memory_before_computing(monkeypatch):
    x, modality, _ = clustered_features({VISIBLE: 40, INFRARED: 20})
    monkeypatch.setattr(memory_check, "available_memory", lambda device="cpu": 1000)

    def must_not_run(*args, **kwargs):
        raise AssertionError("jaccard_distance ran although the memory check failed")

    monkeypatch.setattr(association, "jaccard_distance", must_not_run)
    with pytest.raises(memory_check.ClusteringMemoryError, match="N = 60"):
        association.cluster_once(x, ClusterConfig(k1=10, k2=3), modality)


def test_training_that_cannot_cluster_stops_before_the_first_epoch(synthetic_root, tmp_path, make_config,
                                                                   monkeypatch, capsys):
    """Checked for the largest clustering of the run (stage 2: all images) at start-up."""
    monkeypatch.setattr(memory_check, "available_memory", lambda device="cpu": 4096)
    out = tmp_path / "run"
    cfg = make_config(synthetic_root, out)
    save_config(cfg, tmp_path / "tiny.yaml")
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "tiny.yaml"))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "N = 144 features" in err  # 96 visible + 48 infrared training images
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
