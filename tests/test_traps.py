"""Traps users of this field fall into (issue 9), each made impossible or loud; sections by
the module they test: run.json and recipes, dataset counts, RegDB trials and directions,
memory before clustering, the eps scan, the clustering / memory / loss components at
extreme modality ratios, hard-coded paths.

The traps that need a training run are in test_traps_training.py."""

from __future__ import annotations

import json
import logging
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from bmil import cli
from bmil.cluster import estimate_jaccard_memory, split_by_modality
from bmil.config import ClusterConfig, config_to_dict, load_config, save_config
from bmil.data.records import INFRARED, VISIBLE
from bmil.engine import association, memory_check
from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.cluster_scan import parse_eps, scan_eps, scan_table
from bmil.engine.run_log import write_run_info
from bmil.errors import BmilError, ConfigError
from bmil.model import build_model, model_signature

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------ engine/run_log.py run.json, configs/ vs docs/recipes.md, distributed SyncBN


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


def _recipe_rows() -> dict[str, tuple[int, int, float, int]]:
    """{preset: (ids, instances, lr, bn batch)} from the table of docs/recipes.md."""
    rows = {}
    pattern = re.compile(r"^\| `([^`]+)`(?: … `[^`]+`)? \| (\d+) × (\d+) \| ([0-9.e-]+) \| (\d+) \|")
    for line in (REPO / "docs" / "recipes.md").read_text().splitlines():
        match = pattern.match(line)
        if match:
            name, ids, instances, lr, bn = match.groups()
            rows[name] = (int(ids), int(instances), float(lr), int(bn))
    return rows


def test_recipes_give_each_preset_its_batch_lr_and_bn_batch():
    rows = _recipe_rows()
    presets = sorted(p.stem for p in (REPO / "src" / "bmil" / "configs").glob("*.yaml"))
    assert set(presets) <= set(rows), f"presets without a recipe: {set(presets) - set(rows)}"
    for name, (ids, instances, lr, bn) in rows.items():
        cfg = load_config(cli.preset_path(name))
        t = cfg.train
        assert (t.num_ids, t.num_instances, t.lr) == (ids, instances, lr), name
        views = 2 if cfg.data.channel_aug else 1
        assert bn == (views + 1) * ids * instances, name


def test_sync_bn_conversion_for_torchrun():
    """The helper the trainer calls under torchrun: every BatchNorm becomes SyncBatchNorm
    with the same state-dict keys; a CPU or single-process job keeps BatchNorm."""
    from bmil.engine.distributed import DistContext, convert_sync_bn

    model = build_model(depth=18, non_local=False, pretrained="none")
    keys = set(model.state_dict())
    bn_count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    same, synced = convert_sync_bn(model, DistContext(world_size=1), enabled=True)
    assert same is model and not synced
    same, synced = convert_sync_bn(model, DistContext(world_size=2, device=torch.device("cpu")), enabled=True)
    assert not synced
    converted, synced = convert_sync_bn(model, DistContext(world_size=2, device=torch.device("cuda", 0)), True)
    assert synced
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == bn_count
    assert set(converted.state_dict()) == keys


# ------------------------ data/check.py: published dataset counts


def test_check_data_names_the_published_counts(synthetic_root, capsys):
    """The synthetic tree has the SYSU-MM01 layout but far fewer ids and images."""
    code, out, _ = run_cli(capsys, "check-data", "--dataset", "sysu", str(synthetic_root))
    assert code == 1
    assert "SYSU-MM01 train ids: found 8, expected 395" in out
    assert re.search(r"train visible images: found \d+, expected 22258", out)
    assert re.search(r"train infrared images: found \d+, expected 11909", out)
    assert re.search(r"query images: found \d+, expected 3803", out)


def test_train_logs_the_counts_it_read_and_warns_on_differences(synthetic_root, tmp_path, make_config, caplog):
    from bmil.engine.trainer import Trainer

    cfg = make_config(synthetic_root, tmp_path, "data.dataset=sysu")
    with caplog.at_level(logging.INFO, logger="bmil"):
        Trainer(cfg, progress=False)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("sysu: train ids 8, train visible images") for m in infos)
    assert any("SYSU-MM01 train ids: found 8, expected 395" in m for m in warnings)
    assert any("expected 22258" in m for m in warnings)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bmil"):
        Trainer(make_config(synthetic_root, tmp_path / "synthetic"), progress=False)
    assert not any("expected" in r.getMessage() for r in caplog.records)  # no published counts


# ------------------------ engine/evaluate.py, data/registry.py: RegDB trials, eval directions


def _regdb_checkpoint(tmp_path: Path, trial: int) -> Path:
    cfg = load_config(None, ["data.dataset=regdb", f"data.trial={trial}", "model.depth=18",
                             "model.non_local=false", "model.pretrained=none"])
    model = build_model(depth=18, non_local=False, pretrained="none")
    path = tmp_path / "regdb.pt"
    save_checkpoint({"config": config_to_dict(cfg), "signature": model_signature(model),
                     "model": model.state_dict()}, path)
    return path


def test_regdb_model_refuses_another_trial(tmp_path, capsys):
    path = _regdb_checkpoint(tmp_path, trial=1)
    (tmp_path / "RegDB").mkdir()
    code, out, err = run_cli(capsys, "eval", "--config", "regdb", "--checkpoint", str(path),
                             f"data.root={tmp_path / 'RegDB'}", "model.depth=18", "model.non_local=false",
                             "model.pretrained=none", f"output={tmp_path / 'out'}", "data.trial=2")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "trained on RegDB trial 1 but data.trial=2" in err and "eval.allow_trial_mismatch=true" in err

    from bmil.engine.evaluate import check_regdb_trial

    state = torch.load(path, weights_only=False)
    allowed = load_config(None, ["data.dataset=regdb", "data.trial=2", "eval.allow_trial_mismatch=true"])
    check_regdb_trial(allowed, state, path)  # the explicit override
    check_regdb_trial(load_config(None, ["data.dataset=regdb", "data.trial=1"]), state, path)


@pytest.mark.parametrize(("dataset", "direction", "passed"), [
    ("regdb", "v2t", "v2t"), ("regdb", "t2v", "t2v"), ("regdb", "both", "both"),
    ("llcm", "v2t", "v2i"), ("llcm", "t2v", "i2v"),
])
def test_eval_direction_reaches_the_protocol(dataset, direction, passed, monkeypatch):
    from bmil import evaluation
    from bmil.engine.datasets import run_protocol

    seen = {}

    def fake(extract, root, **kwargs):
        seen.update(kwargs)
        return ["result"]

    monkeypatch.setattr(evaluation, f"evaluate_{dataset}", fake)
    cfg = load_config(None, [f"data.dataset={dataset}", f"eval.direction={direction}"])
    assert run_protocol(cfg, lambda records: None) == ["result"]
    assert seen["direction"] == passed
    with pytest.raises(ConfigError, match="eval.direction"):
        load_config(None, ["eval.direction=sideways"])


# ------------------------ engine/memory_check.py: memory before clustering


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


# ------------------------ engine/cluster_scan.py: the eps scan


def test_parse_eps():
    assert parse_eps("0.3:0.7:0.05") == pytest.approx([0.3 + 0.05 * i for i in range(9)])
    assert parse_eps("0.4,0.6") == [0.4, 0.6]
    assert parse_eps("0.5") == [0.5]
    for bad in ("0.7:0.3:0.05", "0.3:0.7:0", "a:b:c", "0.5:1.2:0.5", ""):
        with pytest.raises(ConfigError, match="--eps"):
            parse_eps(bad)


def test_scan_equals_clustering_each_eps_from_scratch():
    x, modality, pids = clustered_features({VISIBLE: 48, INFRARED: 24}, ids=6)
    cfg = ClusterConfig(k1=10, k2=3, subset_ratio=1.0)
    eps_values = [0.3, 0.5, 0.7]
    rows = scan_eps(x, modality, eps_values, cfg, pids)
    assert [r["eps"] for r in rows] == eps_values
    for row, eps in zip(rows, eps_values, strict=True):
        one = ClusterConfig(k1=10, k2=3, eps=eps)
        for m, name in ((VISIBLE, "visible"), (INFRARED, "infrared")):
            labels = association.cluster_once(x[modality == m], one)
            assert row[f"{name}/clusters"] == len(set(labels[labels >= 0].tolist()))
            assert row[f"{name}/outliers"] == int(np.sum(labels < 0))
        labels = association.cluster_once(x, one, modality)
        mixed = {c for c in set(labels[labels >= 0].tolist()) if len(set(modality[labels == c].tolist())) == 2}
        clusters = len(set(labels[labels >= 0].tolist()))
        assert row["global/clusters"] == clusters and row["global/outliers"] == int(np.sum(labels < 0))
        assert row["global/cross_share"] == pytest.approx(len(mixed) / clusters)
        singletons = np.where(labels >= 0, labels, labels.max() + 1 + np.arange(len(labels)))
        assert row["global/ari"] == pytest.approx(adjusted_rand_score(pids, singletons))
    # well-separated people: some eps finds them in both modalities
    assert max(r["global/cross_share"] for r in rows) > 0.5
    table = scan_table(rows)
    assert table.count("\n") == 2 + len(eps_values) and "global ARI" in table
    unlabelled = scan_table(scan_eps(x, modality, [0.5], cfg, None))
    assert "ARI" not in unlabelled


def test_cluster_scan_cli(synthetic_root, tmp_path, make_config, capsys):
    cfg = make_config(synthetic_root, tmp_path)
    save_config(cfg, tmp_path / "tiny.yaml")
    model = build_model(depth=18, non_local=False, pretrained="none")
    save_checkpoint({"config": config_to_dict(cfg), "signature": model_signature(model),
                     "model": model.state_dict()}, tmp_path / "model.pt")
    code, out, err = run_cli(capsys, "cluster-scan", "--config", str(tmp_path / "tiny.yaml"), "--checkpoint",
                             str(tmp_path / "model.pt"), "--eps", "0.5:0.7:0.1", "--device", "cpu",
                             "--out", str(tmp_path / "scan.json"))
    assert code == 0, err
    table = [line for line in out.splitlines() if re.match(r"^\| 0\.\d", line)]
    assert [line.split("|")[1].strip() for line in table] == ["0.5", "0.6", "0.7"]
    rows = json.loads((tmp_path / "scan.json").read_text())
    assert [r["eps"] for r in rows] == pytest.approx([0.5, 0.6, 0.7])
    for name, images in (("visible", 96), ("infrared", 48)):
        outliers = [r[f"{name}/outliers"] for r in rows]
        # DBSCAN on one distance: a larger eps keeps every core point, so never more outliers
        assert outliers == sorted(outliers, reverse=True) and outliers[-1] >= 0 and outliers[0] <= images
        assert all(0 <= r[f"{name}/clusters"] <= images - r[f"{name}/outliers"] for r in rows)  # ≥ 1 image each
    assert all(-1.0 <= r["global/ari"] <= 1.0 for r in rows)
    code, _, err = run_cli(capsys, "cluster-scan", "--config", str(tmp_path / "tiny.yaml"), "--checkpoint",
                           str(tmp_path / "model.pt"), "--eps", "0.7:0.3:0.1")
    assert code == 2 and "--eps" in err


def test_cluster_scan_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cluster-scan", "--help"])
    assert exit_info.value.code == 0
    assert "--eps" in capsys.readouterr().out


# ------------------------ engine/association.py, memory.py, losses.py at extreme modality ratios


@pytest.mark.parametrize("sizes", [{VISIBLE: 60, INFRARED: 6}, {VISIBLE: 6, INFRARED: 60}], ids=["10to1", "1to10"])
def test_clustering_memories_sampler_and_losses_at_extreme_ratios(sizes):
    from bmil.data import PseudoIdentitySampler
    from bmil.losses import global_loss, intra_loss
    from bmil.memory import PrototypeMemory, positive_mask

    x, modality, _ = clustered_features(sizes, ids=3)
    cfg = ClusterConfig(k1=30, k2=6, eps=0.6)  # k1 above the smaller modality's size
    intra = association.intra_labels(x, modality, cfg, np.random.default_rng(0))
    labels, sub = association.global_labels(x, modality, cfg, split=True)
    assert labels.shape == (66,) and sub.sub_labels.shape == (66,)
    assert np.any(labels >= 0)
    feats = torch.from_numpy(x)
    memory = PrototypeMemory.from_features(feats, torch.from_numpy(sub.sub_labels))
    assert memory.num_clusters == len(sub.sub_to_cluster)
    for m in (VISIBLE, INFRARED):
        rows = np.flatnonzero(modality == m)
        if np.any(intra[m] >= 0):
            mem = PrototypeMemory.from_features(feats[rows], torch.from_numpy(intra[m]))
            kept = intra[m] >= 0
            loss = intra_loss(feats[rows][kept], mem, torch.from_numpy(intra[m][kept]))
            assert torch.isfinite(loss)
        clustered = rows[labels[rows] >= 0]
        if clustered.size == 0:
            continue
        sampler = PseudoIdentitySampler(labels[rows], num_ids=8, num_instances=16, iterations=2, seed=0)
        picked = rows[np.asarray(list(sampler))]
        assert picked.size == 2 * 8 * 16 and np.all(labels[picked] >= 0)
        mask = positive_mask(torch.from_numpy(labels[picked]), torch.from_numpy(sub.sub_to_cluster))
        loss = global_loss(feats[picked], memory, mask)
        assert torch.isfinite(loss)
        memory.update(feats[picked], torch.from_numpy(sub.sub_labels[picked]))
        assert torch.isfinite(memory.hard).all()


def test_modality_with_fewer_images_than_k1_and_with_one_image():
    x, modality, _ = clustered_features({VISIBLE: 40, INFRARED: 5})
    cfg = ClusterConfig(k1=30, k2=6, subset_ratio=1.0)
    intra = association.intra_labels(x, modality, cfg, np.random.default_rng(0))
    assert intra[INFRARED].shape == (5,) and intra[VISIBLE].shape == (40,)
    labels, sub = association.global_labels(x, modality, cfg, split=True)
    assert labels.shape == (45,)
    lone = np.r_[np.zeros(40, dtype=np.int64), [1]]
    labels, sub = association.global_labels(x[:41], lone, cfg, split=True)
    assert np.all(labels == -1) and sub.sub_to_cluster.size == 0


def test_losses_when_every_global_cluster_holds_one_modality():
    from bmil.losses import global_loss
    from bmil.memory import PrototypeMemory, positive_mask

    x, modality, pids = clustered_features({VISIBLE: 12, INFRARED: 12}, ids=3)
    labels = pids + 3 * modality  # six clusters, none mixed
    sub = split_by_modality(labels, modality)
    assert np.array_equal(sub.sub_to_cluster, np.arange(6))
    memory = PrototypeMemory.from_features(torch.from_numpy(x), torch.from_numpy(sub.sub_labels))
    mask = positive_mask(torch.from_numpy(labels), torch.from_numpy(sub.sub_to_cluster))
    assert torch.equal(mask.sum(1), torch.ones(24, dtype=torch.long))
    loss = global_loss(torch.from_numpy(x), memory, mask)
    assert torch.isfinite(loss) and loss > 0


# ------------------------ the package: no hard-coded paths


def test_no_absolute_path_is_hard_coded_in_the_package():
    """Data and weights come from the configuration (data.root, model.pretrained); the only
    absolute path allowed in code is the kernel's /proc interface."""
    import ast

    found = []
    for path in (REPO / "src" / "bmil").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
                if re.fullmatch(r"(/(?!proc/)[\w.-]+|~|[A-Za-z]:)([/\\][\w.-]*)+", text):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {text!r}")
    assert not found, found
