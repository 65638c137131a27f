"""Cross-modality search on a user's images: extract a folder into a features file, rank
a gallery file for one query image (the rank-list figure: :mod:`bmil.analysis.rank_list`).

The features file is a plain NumPy ``.npz`` (``numpy.load`` reads it without bmil):
``features`` float32 [N, D] (L2-normalised), ``paths`` str [N], ``modality`` int64 [N]
(0 visible, 1 infrared), ``pids`` int64 [N] when ids are known (-1 for unknown), and
``bmil_features`` = 1 (the format version).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.config import Config
from bmil.data.images import is_image_name
from bmil.data.records import MODALITY_NAMES, OTHER_MODALITY, Record
from bmil.engine.inference import feature_extractor
from bmil.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODALITIES = {name: index for index, name in MODALITY_NAMES.items()}  # the --modality choices

@dataclass
class FeatureSet:
    """Features of a list of images: features [N, D] float32, paths [N], modality [N]
    int64, pids [N] int64 or None when no id is known."""

    features: np.ndarray
    paths: list[str]
    modality: np.ndarray
    pids: np.ndarray | None = None


def parse_modality(name: str) -> int:
    """``"visible"`` → 0, ``"infrared"`` → 1; anything else is a ConfigError."""
    if name not in MODALITIES:
        raise ConfigError(f"modality must be 'visible' or 'infrared', got {name!r}")
    return MODALITIES[name]


def folder_images(folder: str | Path) -> list[str]:
    """Sorted paths of all images under ``folder`` (recursive); DatasetError when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} not found")
    paths = sorted(
        os.path.join(parent, name)
        for parent, _, names in os.walk(folder)
        for name in names
        if is_image_name(name)
    )
    if not paths:
        raise DatasetError(f"image folder {folder} holds no images (.jpg, .jpeg, .png, .bmp)")
    return paths


def id_from_folder(path: str) -> int:
    """The person id a SYSU-style layout gives an image (its folder's name as an integer),
    -1 when the folder name is not a number."""
    name = Path(path).parent.name
    return int(name) if name.isdigit() else -1


def extract_folder(
    model: nn.Module,
    cfg: Config,
    folder: str | Path,
    modality: int,
    *,
    ids_from_folders: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FeatureSet:
    """Test features (flip-averaged, L2-normalised) of every image under ``folder``.

    cfg: the checkpoint's configuration (input size, batch size).
    ids_from_folders: read person ids from folder names (:func:`id_from_folder`).
    """
    paths = folder_images(folder)
    pids = np.array([id_from_folder(p) for p in paths], np.int64) if ids_from_folders else None
    records = [Record(p, -1, -1, modality) for p in paths]
    feats = feature_extractor(model, cfg, device, progress=progress, desc="features")(records)
    return FeatureSet(feats, paths, np.full(len(paths), modality, np.int64), pids)


def save_features(features: FeatureSet, path: str | Path) -> Path:
    """Write ``features`` as an ``.npz`` (suffix added when missing); returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "bmil_features": np.array(FORMAT_VERSION),
        "features": features.features.astype(np.float32),
        "paths": np.array(features.paths, dtype=str),
        "modality": features.modality.astype(np.int64),
    }
    if features.pids is not None:
        arrays["pids"] = features.pids.astype(np.int64)
    np.savez(path, **arrays)
    return path


def load_features(path: str | Path) -> FeatureSet:
    """Read a file written by :func:`save_features`; DatasetError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"features file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise DatasetError(f"features file {path} is not a bmil features file (not a readable .npz)") from err
    needed = ("bmil_features", "features", "paths", "modality")
    if any(key not in arrays for key in needed):
        raise DatasetError(f"features file {path} is not a bmil features file (it lacks {', '.join(needed)})")
    feats = arrays["features"]
    n = len(arrays["paths"])
    if feats.ndim != 2 or feats.shape[0] != n or arrays["modality"].shape != (n,):
        raise DatasetError(f"features file {path} is inconsistent: features {feats.shape} for {n} paths")
    pids = arrays.get("pids")
    return FeatureSet(feats.astype(np.float32), [str(p) for p in arrays["paths"]], arrays["modality"], pids)


def rank_gallery(query: np.ndarray, gallery: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` gallery rows most similar to ``query`` [D] by cosine similarity.

    gallery: [N, D]. Returns (indices [k] int64, similarities [k] float32), k = min(top, N),
    most similar first; equal similarities by lower index.
    """
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sims = (g @ q).astype(np.float32)
    order = np.lexsort((np.arange(len(sims)), -sims))[:top]
    return order.astype(np.int64), sims[order]


def embed_image(
    model: nn.Module, cfg: Config, path: str | Path, modality: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """The test feature [D] of one image (DatasetError when it cannot be read)."""
    if not Path(path).is_file():
        raise DatasetError(f"query image {path} not found")
    record = Record(str(path), -1, -1, modality)
    return feature_extractor(model, cfg, device, progress=False)([record])[0]


def query_modality(gallery: FeatureSet, name: str | None, source: str | Path) -> int:
    """The query's modality: ``name`` when given, else the other modality than the
    gallery's (cross-modality search); ConfigError for a mixed gallery without ``name``."""
    if name is not None:
        return parse_modality(name)
    present = np.unique(gallery.modality)
    if present.size != 1:
        raise ConfigError(f"gallery {source} mixes modalities: give the query's with --query-modality")
    return OTHER_MODALITY[int(present[0])]


def match_flags(gallery: FeatureSet, order: np.ndarray, query_id: int | None) -> list[bool | None] | None:
    """Per ranked match: True same id as ``query_id``, False another id, None unknown id;
    None when the query's or the gallery's ids are not known at all."""
    if query_id is None or gallery.pids is None:
        return None
    pids = gallery.pids[order]
    return [None if pid < 0 else bool(pid == query_id) for pid in pids]
