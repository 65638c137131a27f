"""Plain helpers shared by several test files (the fixtures are in conftest.py): the repository
root, the CLI with captured output, a call-through spy, clustered unit features, the smallest two-stage run, a
checkpoint as bmil train writes it, flip-averaged features by hand, the ImageNet
normalisation, and the steps of the dense Jaccard references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bmil import cli
from bmil.config import config_to_dict
from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.run_log import read_metrics
from bmil.model import model_signature

REPO = Path(__file__).resolve().parents[1]

# One epoch per stage, one step, 2 × 4 images per modality: the smallest run that crosses
# the stage boundary.
SHORT = ("train.stage1_epochs=1", "train.stage2_epochs=1", "train.iterations=1", "train.eval_every=5",
         "train.num_ids=2", "train.num_instances=4")


def record_keyword(monkeypatch, owner, name: str, keyword: str) -> list:
    """Replace ``owner.name`` (a module's function) by one that calls it unchanged and appends
    the value of its ``keyword`` argument to the returned list, call by call."""
    seen: list = []
    real = getattr(owner, name)

    def recording(*args, **kwargs):
        seen.append(kwargs[keyword])
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


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


def finite_losses(out: Path) -> list[float]:
    """Every ``loss/…`` value of ``out``/metrics.jsonl, each asserted finite."""
    values = []
    for record in read_metrics(out / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith("loss/"):
                assert math.isfinite(value), (record["epoch"], key, value)
                values.append(value)
    return values


def save_model_checkpoint(cfg, model: torch.nn.Module, path: Path) -> Path:
    """``model`` saved at ``path`` as bmil train writes a checkpoint: config, signature, weights."""
    save_checkpoint({"config": config_to_dict(cfg), "signature": model_signature(model),
                     "model": model.state_dict()}, path)
    return path


def flip_averaged_features(model: torch.nn.Module, paths, modality: int, transform) -> np.ndarray:
    """Test features of the images at ``paths``, computed directly from the model on
    ``transform``-ed images: n(n(f) + n(f_flip)), n = L2-normalise."""
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    normalise = torch.nn.functional.normalize
    with torch.no_grad():
        mirrored = model(torch.flip(images, dims=[3]), modality)
        feats = normalise(model(images, modality), dim=1) + normalise(mirrored, dim=1)
    return normalise(feats, dim=1).numpy()


# ImageNet normalisation, as the test-time and training transforms apply it.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def imagenet_normalised(rgb) -> np.ndarray:
    """8-bit RGB values (any shape ending in 3) scaled to [0, 1] and ImageNet-normalised."""
    return (np.asarray(rgb, dtype=np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


# ---------------------------------------------------------------- dense Jaccard references
# Shared by test_jaccard.py and test_camera_jaccard.py: the Jaccard steps of docs/method.md that do not
# depend on how the rank lists are drawn, with plain loops over i.


def noisy_blobs(n: int, seed: int, noise: float = 1.2, d: int = 24, ids: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """float32 features [n, d] and modality [n]: unit identity centres plus noise (1.2: weakly
    separated, many pairs share Jaccard support and few are close; 0.4: well separated),
    35 % infrared, shifted along the first centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pid = rng.integers(0, ids, n)
    modality = (rng.random(n) < 0.35).astype(np.int64)
    x = centres[pid] + noise * rng.normal(size=(n, d)) / np.sqrt(d) + 0.3 * modality[:, None] * centres[0]
    return x.astype(np.float32), modality


def ordered_by_similarity(sim: np.ndarray, i: int, cands) -> np.ndarray:
    """``cands`` sorted by similarity to i descending, i itself first, ties by lower index."""
    cands = np.asarray(cands, dtype=np.int64)
    key = -sim[i, cands]
    key[cands == i] = -np.inf
    return cands[np.lexsort((cands, key))]


def unit_similarity(feats: np.ndarray) -> np.ndarray:
    """Cosine similarity N×N in float64."""
    f = feats.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def reciprocal_weights(sim: np.ndarray, rank, k1: int) -> np.ndarray:
    """Steps 2 to 4 from the rank lists ``rank`` (N arrays, i first): k-reciprocal neighbours,
    their expansion by the half-size sets, and the Gaussian weights; an N×N matrix."""
    n = len(sim)

    def reciprocal(i, k):  # step 2
        return [j for j in rank[i][: k + 1] if i in rank[j][: k + 1]]

    kh = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):  # steps 3 and 4
        r_i = reciprocal(i, k1)
        members = set(r_i)
        for c in r_i:
            r_c = reciprocal(c, kh)
            if len(set(r_c) & set(r_i)) > 2 / 3 * len(r_c):
                members |= set(r_c)
        e = np.array(sorted(members))
        w = np.exp(-(2 - 2 * sim[i, e]))
        v[i, e] = w / w.sum()
    return v


def jaccard_from_weights(v_qe: np.ndarray) -> np.ndarray:
    """Step 6: the dense Jaccard distance of the (query-expanded) weights."""
    dist = np.zeros((len(v_qe), len(v_qe)))
    for i in range(len(v_qe)):
        s = np.minimum(v_qe[i][None, :], v_qe).sum(axis=1)
        dist[i] = np.maximum(1 - s / (2 - s), 0)
    return dist
