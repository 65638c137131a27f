"""cluster/memory_check.py: the memory available to clustering, and the check that stops a
clustering (or a training run, at start-up) that cannot fit with one sentence before any
distance is computed."""

from __future__ import annotations

import pytest

from bmil.cluster import association, estimate_jaccard_memory, memory_check
from bmil.config import ClusterConfig, Config, apply_overrides, save_config
from bmil.errors import BmilError
from bmil.records import INFRARED, VISIBLE
from helpers import clustered_features, run_cli


def test_meminfo_parsing():
    text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12345678 kB\n"
    assert memory_check.parse_meminfo(text) == 12345678 * 1024
    assert memory_check.parse_meminfo("MemTotal: 1 kB\n") is None
    assert memory_check.host_available_memory() > 0


def test_clustering_that_cannot_fit_stops_with_one_sentence():
    cfg = ClusterConfig(k1=30, block_size=2048)
    estimate = estimate_jaccard_memory(34167, 30, 2048, 2048, max_distance=cfg.eps, unit_rows=True, phase="before_join")
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


def test_the_join_is_checked_with_the_size_of_v(monkeypatch):
    """Enough memory for the kNN and V, not for the join: stops once V is built, before the join."""
    import bmil.cluster.jaccard as jaccard_module

    x, modality, _ = clustered_features({VISIBLE: 40, INFRARED: 20})
    cfg = ClusterConfig(k1=10, k2=3)
    before_join = memory_check.require_clustering_memory(60, x.shape[1], 10, cfg, available=1 << 40)
    monkeypatch.setattr(memory_check, "available_memory", lambda device="cpu": before_join)
    seen = {}
    join_order = jaccard_module._join_order
    monkeypatch.setattr(jaccard_module, "_join_order", lambda v: seen.setdefault("entries", v.nnz) and join_order(v))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the join ran although its memory check failed")

    monkeypatch.setattr(jaccard_module, "_thresholded_distance", must_not_run)
    with pytest.raises(memory_check.ClusteringMemoryError, match="N = 60 features: the Jaccard join") as err:
        association.cluster_once(x, cfg, modality)
    assert "\n" not in str(err.value) and "lower cluster.k1 or cluster.k2" in str(err.value)
    assert "entries" not in seen  # stopped before the join's row order, its first step
    # the estimate it compared is that of V's actual size
    calls = []
    monkeypatch.setattr(jaccard_module, "_thresholded_distance", lambda v, order, t: calls.append(v.nnz) or v)
    jaccard_module.jaccard_distance(x, 10, 3, modality=modality, max_distance=cfg.eps, memory_check=calls.append)
    assert calls[0] == jaccard_module.estimate_join_memory(60, calls[1], 10, cfg.eps)
    assert calls[0] > before_join  # so the first call did stop at the join check


def test_largest_clustering_of_a_run():
    # the SYSU-MM01 preset's split at a million images: 650,000 visible, 350,000 infrared
    cfg = Config()
    assert (cfg.cluster.subset_ratio, cfg.cluster.global_visible) == (0.5, "left_out")
    assert memory_check.largest_clustering(cfg, 650_000, 350_000) == 325_000 + 350_000
    assert memory_check.largest_clustering(apply_overrides(cfg, ["cluster.global_visible=all"]), 650_000, 350_000) \
        == 1_000_000
    assert memory_check.largest_clustering(apply_overrides(cfg, ["cluster.subset_ratio=1"]), 650_000, 350_000) \
        == 1_000_000  # nothing left out: global clustering takes every visible image
    assert memory_check.largest_clustering(apply_overrides(cfg, ["train.stage2_epochs=0"]), 650_000, 350_000) \
        == 350_000  # intra only: the infrared images outnumber the visible subset
    assert memory_check.largest_clustering(cfg, 7, 2) == 3 + 2  # subsets of int(0.5·7) = 3; one image in neither


@pytest.mark.e2e
def test_training_that_cannot_cluster_stops_before_the_first_epoch(synthetic_root, tmp_path, make_config,
                                                                   monkeypatch, capsys):
    """Checked for the largest clustering of the run (stage 2's global input) at start-up."""
    monkeypatch.setattr(memory_check, "available_memory", lambda device="cpu": 4096)
    out = tmp_path / "run"
    cfg = make_config(synthetic_root, out)
    save_config(cfg, tmp_path / "tiny.yaml")
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "tiny.yaml"))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    # 96 visible + 48 infrared; stage 2 clusters the 48 visible images subset 0 leaves out + 48 infrared
    assert "training on 144 images" in err and "N = 96," in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_cuda_memory_counts_cached_blocks_as_free(monkeypatch):
    """The driver's free memory leaves out what PyTorch caches without using; a clustering
    after training may use those blocks, so they count as available."""
    gib = 1 << 30
    monkeypatch.setattr(memory_check.torch.cuda, "mem_get_info", lambda device: (2 * gib, 80 * gib))
    monkeypatch.setattr(memory_check.torch.cuda, "memory_reserved", lambda device: 30 * gib)
    monkeypatch.setattr(memory_check.torch.cuda, "memory_allocated", lambda device: 12 * gib)
    monkeypatch.setattr(memory_check, "host_available_memory", lambda: 100 * gib)
    assert memory_check.gpu_available_memory("cuda:0") == 2 * gib + 18 * gib
    assert memory_check.available_memory("cuda:0") == 20 * gib
    monkeypatch.setattr(memory_check, "host_available_memory", lambda: 5 * gib)  # the host phase is smaller
    assert memory_check.available_memory("cuda:0") == 5 * gib
