"""bmil.analysis and ``bmil analyze``: each figure's numbers against a brute-force
re-computation, and the PNG/JSON files the command writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import sparse

from bmil import cli
from bmil.analysis import (
    analyze_features,
    identity_pair_distances,
    neighbour_modality_share,
    pair_distances,
    read_curves,
    same_label_pairs,
    tsne_points,
)
from bmil.errors import DatasetError
from bmil.model import build_model
from helpers import save_model_checkpoint


def identities(ids: int, per_modality: int, seed: int, d: int = 12):
    """Features of ``ids`` identities, ``per_modality`` images of each in each modality,
    with a shared infrared offset (a modality gap)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    pids = np.repeat(np.arange(ids), 2 * per_modality)
    modality = np.tile(np.repeat([0, 1], per_modality), ids)
    gap = rng.normal(size=d)
    x = centres[pids] + 0.5 * rng.normal(size=(len(pids), d)) + 1.5 * modality[:, None] * gap / np.linalg.norm(gap)
    return x.astype(np.float32), pids, modality


def test_neighbour_share_matches_a_loop():
    x, _, modality = identities(6, 5, 0)
    k = 7
    share = neighbour_modality_share(x, modality, k)
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(len(f)):
        others = [j for j in range(len(f)) if j != i]
        nearest = sorted(others, key=lambda j: (-float(f[i] @ f[j]), j))[:k]
        assert share[i] == pytest.approx(sum(modality[j] == modality[i] for j in nearest) / k)
    assert 0.5 < share.mean() < 1.0  # the modality gap shows


def test_same_label_pairs_and_lookup():
    labels = np.array([2, 0, 2, -1, 0, 2, 5])
    rows, cols = same_label_pairs(labels)
    expected = [(i, j) for i in range(7) for j in range(i + 1, 7) if labels[i] == labels[j] >= 0]
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == expected
    # stored entries (explicit zeros included) are read back; absent pairs are 1
    dense = np.ones((7, 7))
    dense[0, 2] = dense[2, 0] = 0.0
    dense[1, 4] = dense[4, 1] = 0.25
    stored = sparse.csr_array(([0.0, 0.0, 0.25, 0.25], ([0, 2, 1, 4], [2, 0, 4, 1])), shape=(7, 7))
    np.testing.assert_array_equal(pair_distances(stored, rows, cols), dense[rows, cols])


def test_identity_pair_distances_split_by_modality():
    rng = np.random.default_rng(3)
    n = 20
    pids = rng.integers(0, 4, n)
    modality = rng.integers(0, 2, n)
    dense = rng.uniform(0, 1, (n, n))
    dense = (dense + dense.T) / 2
    dist = sparse.csr_array(np.where(dense < 0.7, dense, 0.0))
    dist.data[:] = dense[dense < 0.7]  # only pairs below 0.7 stored; the rest read as 1
    got = identity_pair_distances(dist, pids, modality)
    intra, cross = [], []
    for i in range(n):
        for j in range(i + 1, n):
            if pids[i] == pids[j]:
                value = dense[i, j] if dense[i, j] < 0.7 else 1.0
                (intra if modality[i] == modality[j] else cross).append(value)
    np.testing.assert_allclose(np.sort(got["intra"]), np.sort(intra))
    np.testing.assert_allclose(np.sort(got["cross"]), np.sort(cross))


def test_read_curves(tmp_path):
    lines = [
        {"epoch": 0, "stage": 1, "ari/visible": 0.2, "ari/infrared": 0.3},
        {"epoch": 1, "stage": 1, "ari/visible": 0.4, "ari/infrared": float("nan")},
        {"epoch": 2, "stage": 2, "ari/visible": 0.5, "ari/infrared": 0.6, "global/ari": 0.1,
         "global/cross_precision": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    curves = read_curves(tmp_path)
    assert curves["ari/visible"] == {"epoch": [0, 1, 2], "value": [0.2, 0.4, 0.5]}
    assert curves["ari/infrared"] == {"epoch": [0, 2], "value": [0.3, 0.6]}
    assert curves["global/ari"] == {"epoch": [2], "value": [0.1]}
    with pytest.raises(DatasetError, match="metrics.jsonl"):
        read_curves(tmp_path / "missing")


@pytest.mark.e2e
def test_analyze_run_cli(tmp_path, capsys):
    lines = [{"epoch": e, "ari/visible": 0.1 * e, "global/ari": 0.05 * e} for e in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert cli.main(["-q", "analyze", "--run", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "analysis" / "curves.json").read_text())
    assert saved["global/ari"]["value"] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert Image.open(tmp_path / "analysis" / "curves.png").format == "PNG"
    capsys.readouterr()


def test_tsne_of_ten_identities(tmp_path):
    x, pids, modality = identities(14, 3, 1)
    pids = pids + 100
    pids[modality == 1] = np.where(pids[modality == 1] == 113, 200, pids[modality == 1])  # 113: visible only
    result = tsne_points(x, pids, modality, num_ids=10, seed=0)
    assert len(result["ids"]) == 10 and 113 not in result["ids"]
    assert result["points"].shape == (60, 2)  # 10 ids × 6 images
    assert set(result["pids"].tolist()) == set(result["ids"].tolist())
    np.testing.assert_array_equal(result["index"], np.flatnonzero(np.isin(pids, result["ids"])))


def test_analyze_features_writes_figures_and_numbers(tmp_path):
    x, pids, modality = identities(10, 6, 2)
    written = analyze_features(x, modality, pids, tmp_path, neighbours=10, tsne_ids=10)
    for name in ("neighbours", "distances", "tsne"):
        assert Image.open(tmp_path / f"{name}.png").format == "PNG"
        assert (tmp_path / f"{name}.json") in written.values()
    numbers = json.loads((tmp_path / "distances.json").read_text())
    # 10 ids, 6 + 6 images: 2·C(6, 2) = 30 intra and 36 cross pairs each
    for name in ("plain", "modality-aware"):
        assert numbers[name]["intra"]["pairs"] == 10 * 30 and numbers[name]["cross"]["pairs"] == 10 * 36
    # the modality-aware distance brings an identity's two modalities closer
    assert numbers["modality-aware"]["cross"]["mean"] < numbers["plain"]["cross"]["mean"]
    share = json.loads((tmp_path / "neighbours.json").read_text())
    assert share["k"] == 10 and share["share"]["all"]["images"] == 120
    assert share["share"]["visible"]["intra"] == pytest.approx(
        neighbour_modality_share(x, modality, 10)[modality == 0].mean()
    )
    tsne = json.loads((tmp_path / "tsne.json").read_text())
    assert len(tsne["points"]) == 120 and len(tsne["ids"]) == 10
    # unlabelled features: only the neighbour figure
    written = analyze_features(x, modality, None, tmp_path / "unlabelled", neighbours=10)
    assert sorted(written) == ["neighbours.json", "neighbours.png"]


@pytest.mark.e2e
def test_analyze_checkpoint_cli(synthetic_root, tmp_path, make_config, capsys):
    cfg = make_config(synthetic_root, tmp_path)
    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none")
    ckpt = save_model_checkpoint(cfg, model, tmp_path / "model.pt")
    code = cli.main(["-q", "analyze", "--checkpoint", str(ckpt), "--out", str(tmp_path / "an")])
    assert code == 0, capsys.readouterr().err
    share = json.loads((tmp_path / "an" / "neighbours.json").read_text())
    # the tiny synthetic training set: 8 ids × 3 images × (4 visible + 2 infrared cameras)
    assert share["share"]["visible"]["images"] == 96 and share["share"]["infrared"]["images"] == 48
    assert share["k"] == 30
    tsne = json.loads((tmp_path / "an" / "tsne.json").read_text())
    assert len(tsne["ids"]) == 8 and len(tsne["points"]) == 144
    assert all(math.isfinite(v) for point in tsne["points"] for v in point)


def test_tsne_legend_names_the_identities_and_distances_have_axis_labels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from bmil.analysis.figures import plot_distance_histograms, tsne_figure

    rng = np.random.default_rng(0)
    pids = np.repeat([3, 11, 42], 4)
    fig = tsne_figure(rng.normal(size=(12, 2)), pids, np.tile([0, 1], 6))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert labels == ["id 3", "id 11", "id 42", "visible", "infrared"]
    captured = {}
    real_save = plt.Figure.savefig
    pairs = {"plain": {"intra": rng.uniform(size=20), "cross": rng.uniform(size=20)}}

    def spy(self, *args, **kwargs):
        captured["labels"] = (self.axes[0].get_xlabel(), self.axes[0].get_ylabel())
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    plot_distance_histograms(pairs, 0.6, tmp_path / "d.png")
    assert "distance" in captured["labels"][0] and "density" in captured["labels"][1]


@pytest.mark.e2e
def test_analyze_with_a_config_keeps_the_checkpoints_input_size(synthetic_root, tmp_path, make_config, capsys,
                                                                 monkeypatch):
    from bmil import inference
    from bmil.config import save_config

    cfg = make_config(synthetic_root, tmp_path)
    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none")
    ckpt = save_model_checkpoint(cfg, model, tmp_path / "model.pt")
    save_config(cfg, tmp_path / "cfg.yaml")
    sizes = []

    def spy(model, cfg, *args, **kwargs):  # records the size, then stops the command (the rest is tested above)
        sizes.append(kwargs.get("size") or (cfg.data.height, cfg.data.width))
        raise DatasetError("stop here")

    monkeypatch.setattr(inference, "feature_extractor", spy)
    code = cli.main(["-q", "analyze", "--checkpoint", str(ckpt), "--config", str(tmp_path / "cfg.yaml"),
                     "data.height=288", "data.width=144", "--out", str(tmp_path / "an")])
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert sizes == [(cfg.data.height, cfg.data.width)]
