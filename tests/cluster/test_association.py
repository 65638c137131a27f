"""One epoch's association (docs/method.md, "Clustering feature" and "Stage 2"): the visible split,
which images stage 2's global clustering sees, and ``global/images`` in metrics.jsonl; the intra
and global labels, and the memories, sampler and losses built on them, at extreme modality
ratios (10:1, 1:10), with a modality smaller than k1 and with a modality of one image."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bmil.cluster import association, dbscan_labels, jaccard_distance, visible_subsets
from bmil.cluster.association import associate, draw_subsets, features_read, global_input
from bmil.config import ClusterConfig
from bmil.records import INFRARED, VISIBLE
from helpers import clustered_features


def _features(n_visible: int, n_infrared: int, ids: int = 5, seed: int = 0):
    """Unit features of ``ids`` people in both modalities (a modality offset), visible first
    interleaved with infrared so that the modality order is not sorted."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, 16))
    modality = np.r_[np.zeros(n_visible, np.int64), np.ones(n_infrared, np.int64)]
    order = rng.permutation(len(modality))
    modality = modality[order]
    pids = np.arange(len(modality)) % ids
    x = centres[pids] + 0.1 * rng.normal(size=(len(modality), 16)) + 0.2 * modality[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), modality


def test_visible_subsets_are_the_first_two_slices_of_a_permutation():
    # The release: shuffled = randperm(n); subset i = shuffled[i*int(r*n):(i+1)*int(r*n)].
    for n, ratio in ((11, 0.5), (10, 0.5), (9, 0.3), (7, 1.0)):
        order = np.random.default_rng(4).permutation(n)
        size = int(ratio * n)
        first, second = visible_subsets(n, ratio, np.random.default_rng(4))
        assert np.array_equal(first, np.sort(order[:size]))
        assert np.array_equal(second, np.sort(order[size: 2 * size]))
        assert not set(first) & set(second)
    first, second = visible_subsets(11, 0.5, np.random.default_rng(0))
    assert len(first) == len(second) == 5  # int(5.5): one image in neither, as in the release


@pytest.mark.parametrize("global_visible", ["left_out", "all"])
def test_global_clustering_sees_the_left_out_visible_half_and_all_infrared(global_visible):
    x, modality = _features(41, 30)
    cfg = ClusterConfig(k1=8, k2=3, eps=0.6, subset_ratio=0.5, global_visible=global_visible)
    assoc = associate(x, modality, cfg, np.random.default_rng(7), global_association=True, split=True)

    # Independent re-computation: the same generator draws the visible permutation first.
    visible = np.flatnonzero(modality == VISIBLE)
    order = np.random.default_rng(7).permutation(len(visible))
    clustered, left_out = np.sort(order[:20]), np.sort(order[20:40])
    if global_visible == "left_out":
        expected = np.sort(np.r_[visible[left_out], np.flatnonzero(modality == INFRARED)])
    else:
        expected = np.arange(len(modality))
    assert np.array_equal(assoc.global_index, expected)

    # Intra labels exist only on subset 0; global labels only on the images the global step saw.
    assert np.all(assoc.intra[VISIBLE][np.setdiff1d(np.arange(41), clustered)] == -1)
    unseen = np.setdiff1d(np.arange(len(modality)), expected)
    assert np.all(assoc.global_labels[unseen] == -1)
    # Its labels are DBSCAN on the modality-aware Jaccard distance of exactly those images.
    direct = dbscan_labels(jaccard_distance(x[expected], k1=8, k2=3, modality=modality[expected]), 0.6, 4)
    got = assoc.global_labels[expected]
    assert np.array_equal(got < 0, direct < 0)
    pairs = {(a, b) for a, b in zip(got[got >= 0], direct[direct >= 0], strict=True)}
    assert len(pairs) == len(set(got[got >= 0])) == len(set(direct[direct >= 0]))  # same partition
    assert np.any(got >= 0)
    # The split prototypes carry -1 for every unseen image too.
    assert np.all(assoc.sub.sub_labels[unseen] == -1)


def test_global_input_without_a_subset_is_every_image():
    modality = np.array([0, 1, 0, 1, 1])
    cfg = ClusterConfig(subset_ratio=1.0)
    assert np.array_equal(global_input(modality, cfg, None), np.arange(5))
    assert np.array_equal(global_input(modality, cfg, np.array([], np.int64)), np.arange(5))
    assert np.array_equal(global_input(modality, replace(cfg, global_visible="left_out"), np.array([1])),
                          np.array([1, 2, 3, 4]))


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


@pytest.mark.e2e
def test_metrics_log_the_images_the_global_clustering_saw(synthetic_root, tmp_path, make_config):
    from bmil.data import sysu_train
    from bmil.engine.trainer import Trainer

    records = sysu_train(synthetic_root)
    n_visible = sum(r.modality == VISIBLE for r in records)
    n_infrared = len(records) - n_visible
    for name, setting, visible in (("half", "left_out", int(0.5 * n_visible)), ("all", "all", n_visible)):
        out = tmp_path / name
        cfg = make_config(synthetic_root, out, "train.stage1_epochs=1", "train.stage2_epochs=1",
                          "train.iterations=1", "train.eval_every=5", f"cluster.global_visible={setting}")
        Trainer(cfg, progress=False).fit()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        stage2 = [r for r in rows if r["stage"] == 2]
        assert stage2 and all("global/images" not in r for r in rows if r["stage"] == 1)
        assert stage2[0]["global/images"] == visible + n_infrared
        assert stage2[0]["global/visible_images"] == visible


@pytest.mark.parametrize("global_association", [False, True])
def test_association_reads_only_the_features_features_read_names(global_association):
    """Rows outside ``features_read`` replaced by unrelated features change no label, and
    stage 1's rows are visible subset 0 (the same draw associate makes) plus every infrared."""
    x, modality = _features(41, 30)
    cfg = ClusterConfig(k1=8, k2=3, eps=0.6, subset_ratio=0.5)
    reference = associate(x, modality, cfg, np.random.default_rng(3), global_association=global_association,
                          split=True)
    rng = np.random.default_rng(3)
    subsets = draw_subsets(modality, cfg, rng)
    read = features_read(modality, subsets, global_association=global_association)
    if global_association:
        assert read is None  # intra and global clustering together read every image
        return
    first, _ = visible_subsets(41, 0.5, np.random.default_rng(3))
    expected = np.sort(np.r_[np.flatnonzero(modality == VISIBLE)[first], np.flatnonzero(modality == INFRARED)])
    assert np.array_equal(read, expected)
    other = _features(41, 30, ids=7, seed=9)[0]  # another population in the unread rows
    mixed = other.copy()
    mixed[read] = x[read]
    assoc = associate(mixed, modality, cfg, rng, global_association=False, split=True, subsets=subsets)
    for m in (VISIBLE, INFRARED):
        assert np.array_equal(assoc.intra[m], reference.intra[m])
    assert assoc.global_labels is None and reference.global_labels is None
