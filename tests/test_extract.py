"""The two features extraction computes, re-computed by hand from the model's raw outputs.

The release's network L2-normalises its eval-mode output (the BN neck); its clustering
extractor averages an image's and its mirror's normalised outputs without normalising again,
(n(f) + n(f')) / 2, and its query and gallery extractors normalise that mean once more,
n(n(f) + n(f')). bmil's model returns the raw BN-neck output f, so extraction applies both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bmil.commands.export import FlipAveragedFeature
from bmil.data import sysu_train
from bmil.data.transforms import test_transform
from bmil.inference import combine_views, extract_features
from bmil.memory import PrototypeMemory
from bmil.model import build_model
from bmil.records import INFRARED, VISIBLE
from helpers import record_keyword

COMMON = dict(height=64, width=32, batch_size=4, device="cpu", workers=0, amp=False, progress=False)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model_and_records(synthetic_root):
    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none").eval()
    records = sysu_train(synthetic_root)
    picked = [r for r in records if r.modality == VISIBLE][:5] + [r for r in records if r.modality == INFRARED][:5]
    return model, picked


def _raw_outputs(model, records) -> tuple[np.ndarray, np.ndarray]:
    """float64 BN-neck outputs [N, D] of the images and of their mirror images (eval mode)."""
    transform = test_transform(64, 32, "bicubic")
    images = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in records])
    modality = torch.tensor([r.modality for r in records])
    with torch.no_grad():
        plain = model(images, modality).double().numpy()
        mirrored = model(torch.flip(images, dims=[3]), modality).double().numpy()
    return plain, mirrored


def test_clustering_and_test_feature_formulas_are_the_release_s(model_and_records):
    model, records = model_and_records
    f, f_flip = _raw_outputs(model, records)
    clustering = (_unit(f) + _unit(f_flip)) / 2  # evaluators.extract_features
    test = _unit(clustering)  # extract_query_feat / extract_gall_feat

    got_clustering = extract_features(model, records, feature="clustering", **COMMON)
    got_test = extract_features(model, records, feature="test", **COMMON)
    np.testing.assert_allclose(got_clustering, clustering, atol=2e-6)
    np.testing.assert_allclose(got_test, test, atol=2e-6)
    norms = np.linalg.norm(got_clustering, axis=1)
    assert np.all(norms < 1 - 1e-4)  # the two views differ, so their mean is shorter than unit
    np.testing.assert_allclose(np.linalg.norm(got_test, axis=1), 1, atol=1e-6)
    # Sensitive to the order of the operations: normalising the sum of the raw outputs is not it.
    assert np.abs(_unit(f + f_flip) - test).max() > 1e-5

    # Without flip both features are the normalised output.
    for feature in ("clustering", "test"):
        np.testing.assert_allclose(extract_features(model, records, flip=False, feature=feature, **COMMON),
                                   _unit(f), atol=2e-6)

    # The ONNX export's model computes the test feature.
    transform = test_transform(64, 32, "bicubic")
    visible = [i for i, r in enumerate(records) if r.modality == VISIBLE]
    images = torch.stack([transform(Image.open(records[i].path).convert("RGB")) for i in visible])
    with torch.no_grad():
        exported = FlipAveragedFeature(model, VISIBLE)(images).numpy()
    np.testing.assert_allclose(exported, test[visible], atol=2e-6)


def test_combine_views_rejects_an_unknown_feature():
    with pytest.raises(ValueError, match="feature must be one of"):
        combine_views(torch.ones(2, 3), None, "gallery")


def test_memory_starts_from_the_normalised_mean_of_clustering_features():
    """The release initialises each prototype to F.normalize of its cluster's mean of the
    (not unit-length) clustering features."""
    rng = np.random.default_rng(0)
    a, b = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    feats = ((a + b) / 2).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1, -1])
    memory = PrototypeMemory.from_features(torch.from_numpy(feats), torch.from_numpy(labels), hybrid=True)
    expected = _unit(np.array([feats[:2].mean(0), feats[2:5].mean(0)], dtype=np.float64))
    for name in memory.bank_names:
        np.testing.assert_allclose(getattr(memory, name).numpy(), expected, atol=1e-6)


@pytest.mark.e2e
def test_training_clusters_clustering_features_and_scores_test_features(synthetic_root, tmp_path, make_config,
                                                                       monkeypatch):
    """One extraction path: the trainer's clustering extraction and train_set_features ask for
    the clustering feature, evaluation for the test feature."""
    from bmil import inference
    from bmil.engine.trainer import Trainer

    seen = record_keyword(monkeypatch, inference, "extract_features", "feature")
    trainer = Trainer(make_config(synthetic_root, tmp_path), progress=False)
    trainer.epoch_features(0, np.arange(8))
    assert seen == ["clustering"]
    trainer.evaluate(trials=1)
    assert set(seen[1:]) == {"test"}
    seen.clear()
    feats, _ = inference.train_set_features(trainer.run.model, trainer.cfg, "cpu", progress=False)
    assert seen == ["clustering"] and np.all(np.linalg.norm(feats, axis=1) <= 1 + 1e-6)
