"""commands/cluster_scan.py and ``bmil cluster-scan``: the --eps grammar, the scan against
clustering each eps from scratch, the command's table and JSON file, its help."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from bmil import cli
from bmil.cluster import association
from bmil.commands.cluster_scan import parse_eps, scan_eps, scan_table
from bmil.config import ClusterConfig, config_to_dict, save_config
from bmil.engine.checkpoint import save_checkpoint
from bmil.errors import ConfigError
from bmil.model import build_model, model_signature
from bmil.records import INFRARED, VISIBLE
from helpers import clustered_features, run_cli


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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_cluster_scan_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cluster-scan", "--help"])
    assert exit_info.value.code == 0
    assert "--eps" in capsys.readouterr().out
