"""The camera-aware P×K sampler (the release's RandomMultipleGallerySampler with its loader),
checked against a hand-worked label/camera set where every rule can be enumerated."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from bmil.data import PseudoIdentitySampler

K = 4  # num_instances
# index: label, camera. Identity 0: cameras 1, 1, 2 — a cam-1 anchor's companions can only be
# image 2 (one image: drawn with replacement), a cam-2 anchor's come from images 0 and 1.
# Identity 1: five images of camera 3 only — companions from its other 4 images, 4 >= K so
# without replacement. Identity 2: six images on six cameras — 5 others >= K, without
# replacement. Identity 3: four images of camera 4 — 3 others < K, with replacement (the
# release's threshold is num_instances, not num_instances - 1). Identity 4: 2 images, cameras
# 5 and 6. Identity 5: one image, repeated. Outliers (-1) on every camera.
LABELS = np.array(
    [0, 0, 0] + [1] * 5 + [2] * 6 + [3] * 4 + [4, 4] + [5] + [-1] * 6
)
CAMERAS = np.array(
    [1, 1, 2] + [3] * 5 + [1, 2, 3, 4, 5, 6] + [4] * 4 + [5, 6] + [2] + [1, 2, 3, 4, 5, 6]
)
NUM_IDS = 3  # 6 identities: a pass is exactly 2 batches


def _chunks(sampler: PseudoIdentitySampler) -> np.ndarray:
    flat = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(flat) == len(sampler) == sampler.iterations * sampler.num_ids * K
    return flat.reshape(-1, K)  # one row per identity visit: anchor first


def _members(label: int) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.equal(LABELS, label))}


@pytest.fixture(scope="module")
def visits() -> np.ndarray:
    sampler = PseudoIdentitySampler(LABELS, NUM_IDS, K, iterations=3000, seed=0, cameras=CAMERAS)
    return _chunks(sampler)


def test_every_identity_once_per_pass_in_random_order(visits):
    passes = visits.reshape(-1, 6, K)  # 2 batches of 3 identities
    firsts = Counter()
    for visit_rows in passes:
        identities = [int(LABELS[row[0]]) for row in visit_rows]
        assert sorted(identities) == [0, 1, 2, 3, 4, 5]
        firsts[identities[0]] += 1
    n = len(passes)
    for identity in range(6):  # random order: each identity leads a pass 1/6 of the time
        assert abs(firsts[identity] - n / 6) < 4 * (n * (1 / 6) * (5 / 6)) ** 0.5, firsts


def test_companions_come_from_other_cameras_than_the_anchor(visits):
    for row in visits:
        label = int(LABELS[row[0]])
        assert (LABELS[row] == label).all()  # one identity per chunk, outliers never sampled
        anchor, companions = int(row[0]), row[1:]
        others = {i for i in _members(label) if CAMERAS[i] != CAMERAS[anchor]}
        if others:
            assert set(companions.tolist()) <= others
        elif len(_members(label)) > 1:  # single-camera identity: any other image
            assert set(companions.tolist()) <= _members(label) - {anchor}
        else:
            assert (companions == anchor).all()
    assert not np.isin(visits, np.flatnonzero(LABELS < 0)).any()


def test_anchor_is_uniform_and_draws_follow_the_release_replacement_rule(visits):
    by_identity: dict[int, list[np.ndarray]] = {i: [] for i in range(6)}
    for row in visits:
        by_identity[int(LABELS[row[0]])].append(row)
    n = len(by_identity[0])  # every identity has the same number of visits
    assert all(len(rows) == n for rows in by_identity.values())

    def near(count: int, p: float) -> bool:
        return abs(count - n * p) < 4 * (n * p * (1 - p)) ** 0.5 + 1

    anchors0 = Counter(int(r[0]) for r in by_identity[0])
    assert all(near(anchors0[i], 1 / 3) for i in (0, 1, 2)), anchors0
    for row in by_identity[0]:
        if CAMERAS[row[0]] == 1:  # the only other-camera image, repeated
            assert (row[1:] == 2).all()
    cam2 = [r for r in by_identity[0] if r[0] == 2]
    # Two candidates, three draws with replacement: all three equal with probability 1/4.
    same = sum(len(set(r[1:].tolist())) == 1 for r in cam2)
    assert abs(same - len(cam2) / 4) < 4 * (len(cam2) * 3 / 16) ** 0.5

    for label in (1, 2):  # pools of 4 and 5 >= K: without replacement, each candidate 3/pool
        rows = by_identity[label]
        assert all(len(set(r[1:].tolist())) == K - 1 for r in rows)
        pool = len(_members(label)) - 1
        appearances = Counter(i for r in rows for i in r[1:].tolist() if i != r[0])
        assert sum(appearances.values()) == 3 * n
        anchor_of = {int(r[0]) for r in rows}
        assert anchor_of == _members(label)
        # each image: anchor with p 1/|members|, else a companion with p 3/pool
        members = len(_members(label))
        for i in _members(label):
            assert near(appearances[i], (1 - 1 / members) * 3 / pool), (label, appearances)

    # Identity 3: 3 other images < K: with replacement, all distinct with probability 3!/3^3.
    distinct = sum(len(set(r[1:].tolist())) == 3 for r in by_identity[3])
    assert near(distinct, 6 / 27)
    for row in by_identity[4]:  # two images on two cameras: the companions are the other one
        assert (row[1:] == ({18, 19} - {int(row[0])}).pop()).all()
    assert all((r == 20).all() for r in by_identity[5])  # a single image repeats


def test_incomplete_last_batch_of_a_pass_is_dropped():
    # 6 identities, 4 per batch: each pass gives one batch of 4 distinct identities (2 dropped).
    sampler = PseudoIdentitySampler(LABELS, 4, K, iterations=1500, seed=1, cameras=CAMERAS)
    batches = _chunks(sampler).reshape(-1, 4, K)
    dropped = Counter()
    for batch in batches:
        identities = {int(LABELS[row[0]]) for row in batch}
        assert len(identities) == 4
        dropped.update(set(range(6)) - identities)
    n = len(batches)
    for identity in range(6):  # each identity is dropped from a pass with probability 2/6
        assert abs(dropped[identity] - n / 3) < 4 * (n * (1 / 3) * (2 / 3)) ** 0.5


def test_fewer_identities_than_a_batch_repeat_whole_passes(caplog):
    labels, cameras = np.array([0, 0, 1, 1, -1]), np.array([1, 2, 1, 2, 1])
    with caplog.at_level(logging.WARNING, logger="bmil.data.sampler"):
        sampler = PseudoIdentitySampler(labels, 5, 2, iterations=4, seed=0, cameras=cameras)
    assert any("repeat" in r.getMessage() for r in caplog.records)
    rows = np.fromiter(iter(sampler), dtype=np.int64).reshape(-1, 2)
    identities = [int(labels[r[0]]) for r in rows]
    for start in range(0, len(identities) - 1, 2):  # passes of both identities
        assert sorted(identities[start : start + 2]) == [0, 1]
    for row in rows:  # the companion is the identity's other-camera image
        assert cameras[row[1]] != cameras[row[0]] and labels[row[1]] == labels[row[0]]


def test_deterministic_per_seed_and_epoch_without_touching_global_rngs():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = PseudoIdentitySampler(LABELS, NUM_IDS, K, iterations=10, seed=seed, cameras=CAMERAS)
        sampler.set_epoch(epoch)
        return list(sampler)

    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    assert order(0, 0) == order(0, 0) and order(0, 2) == order(0, 2)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    # A longer epoch starts with the same batches (the distributed test relies on it).
    longer = PseudoIdentitySampler(LABELS, NUM_IDS, K, iterations=25, seed=0, cameras=CAMERAS)
    assert list(longer)[: 10 * NUM_IDS * K] == order(0, 0)


def test_cameras_must_match_labels():
    with pytest.raises(ValueError, match="cameras"):
        PseudoIdentitySampler(LABELS, NUM_IDS, K, cameras=CAMERAS[:-1])


@pytest.mark.e2e
def test_trainer_loader_passes_each_images_camera(synthetic_root, tmp_path, make_config):
    from bmil.data import INFRARED
    from bmil.engine.trainer import Trainer

    trainer = Trainer(make_config(synthetic_root, tmp_path), progress=False)
    count = len(trainer.run.index[INFRARED])
    labels = np.arange(count) % 3  # three pseudo identities over the infrared images
    sampler = trainer.run.loader(INFRARED, labels, seed=0).sampler
    cameras = trainer.run.camids[trainer.run.index[INFRARED]]
    assert sampler.member_cameras is not None
    for members, member_cameras in zip(sampler.members, sampler.member_cameras, strict=True):
        assert np.array_equal(member_cameras, cameras[members])
    trainer.cfg.train.sampler = "uniform"  # the earlier draw, cameras ignored
    assert trainer.run.loader(INFRARED, labels, seed=0).sampler.member_cameras is None
