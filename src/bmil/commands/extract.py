"""``bmil extract``: features of every image under a folder, written to a features file
that ``bmil search`` ranks (:mod:`bmil.commands.search`).

The features file is a plain NumPy ``.npz`` (``numpy.load`` reads it without bmil):
``features`` float32 [N, D] (L2-normalised), ``paths`` str [N], ``modality`` int64 [N]
(0 visible, 1 infrared), ``pids`` str [N] when ids are known (the person-id folder names,
``""`` for unknown), and ``bmil_features`` = 1 (the format version). Person ids are strings
everywhere, as in a folder data set (``anna``, ``0007``); a file with integer ids (-1 for
unknown) is read as their decimal text.

A folder given to :func:`extract_folder` that holds ``visible/`` and ``infrared/``
sub-folders (a data-set root) is split by them: each image takes the modality of the
folder it lies under.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.config import Config
from bmil.data.images import is_image_name
from bmil.errors import ConfigError, DatasetError
from bmil.inference import feature_extractor, load_model, resolve_device
from bmil.records import MODALITY_NAMES, Record

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODALITIES = {name: index for index, name in MODALITY_NAMES.items()}  # the --modality choices
UNKNOWN_ID = ""  # the person id of an image whose id is not known

@dataclass
class FeatureSet:
    """Features of a list of images: features [N, D] float32, paths [N], modality [N]
    int64, pids [N] str (``UNKNOWN_ID`` where unknown) or None when no id is known."""

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


def id_from_folder(path: str) -> str:
    """The person id a folder layout gives an image: the name of the folder it lies in
    (``.../<person id>/<image>``), any string."""
    return Path(path).parent.name


def modality_folders(folder: str | Path) -> dict[int, Path]:
    """{modality: FOLDER/visible | FOLDER/infrared} for those sub-folders that exist."""
    folder = Path(folder)
    return {m: folder / name for m, name in MODALITY_NAMES.items() if (folder / name).is_dir()}


def images_by_modality(folder: str | Path, modality: int | None) -> dict[int, list[str]]:
    """{modality: sorted image paths} to extract from ``folder``.

    A folder with ``visible/`` / ``infrared/`` sub-folders is split by them (``modality``
    None: both; else that one only, the other logged as skipped). Any other folder holds
    one modality: ``modality``, or the folder's own name when it is ``visible`` or
    ``infrared``. ConfigError when the modality cannot be known or contradicts the
    folder's name; DatasetError when there are no images.
    """
    folder = Path(folder)
    split = modality_folders(folder)
    if split:
        wanted = sorted(split) if modality is None else [modality]
        if modality is not None and modality not in split:
            raise DatasetError(f"{folder} has no {MODALITY_NAMES[modality]}/ folder (it holds "
                               f"{', '.join(MODALITY_NAMES[m] + '/' for m in split)})")
        for m in sorted(set(split) - set(wanted)):
            log.info("%s: only the %s images are read, the %s images under %s are left out",
                     folder, MODALITY_NAMES[wanted[0]], MODALITY_NAMES[m], split[m])
        return {m: folder_images(split[m]) for m in wanted}
    named = MODALITIES.get(folder.name)
    if modality is None and named is None:
        raise ConfigError(f"{folder} has no visible/ or infrared/ folder: give the images' modality "
                          "with --modality visible or --modality infrared")
    if modality is not None and named is not None and named != modality:
        raise ConfigError(f"{folder} is named {folder.name} but --modality is {MODALITY_NAMES[modality]}: "
                          "give the folder of the modality you mean")
    return {named if modality is None else modality: folder_images(folder)}


def extract_folder(
    model: nn.Module,
    cfg: Config,
    folder: str | Path,
    modality: int | None,
    *,
    ids_from_folders: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FeatureSet:
    """Test features (flip-averaged, L2-normalised) of every image under ``folder``, in
    the order of :func:`images_by_modality` (visible first, then paths sorted).

    cfg: the checkpoint's configuration (input size, batch size).
    modality: 0, 1 or None (from the folder names, :func:`images_by_modality`).
    ids_from_folders: person id = the image's folder name (:func:`id_from_folder`).
    """
    groups = images_by_modality(folder, modality)
    paths = [p for m in sorted(groups) for p in groups[m]]
    modalities = np.concatenate([np.full(len(groups[m]), m, np.int64) for m in sorted(groups)])
    pids = np.array([id_from_folder(p) for p in paths], dtype=str) if ids_from_folders else None
    records = [Record(p, -1, -1, int(m)) for p, m in zip(paths, modalities, strict=True)]
    feats = feature_extractor(model, cfg, device, progress=progress, desc="features")(records)
    return FeatureSet(feats, paths, modalities, pids)


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
        arrays["pids"] = np.asarray(features.pids, dtype=str)
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
    if pids is not None:
        pids = _id_strings(pids)
    return FeatureSet(feats.astype(np.float32), [str(p) for p in arrays["paths"]], arrays["modality"], pids)


def _id_strings(pids: np.ndarray) -> np.ndarray:
    """Person ids as str [N]; integer ids (older files) as decimal text, -1 as unknown."""
    if pids.dtype.kind in "iu":
        return np.where(pids < 0, UNKNOWN_ID, pids.astype(str))
    return pids.astype(str)


def run(args: argparse.Namespace) -> int:
    """Extract ``--images`` with ``--checkpoint``'s model into ``--out`` and say what was written."""
    modality = None if args.modality in (None, "both") else parse_modality(args.modality)
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    if cfg.train.channels_last:  # the layout extraction gives the images
        model = model.to(memory_format=torch.channels_last)
    feats = extract_folder(
        model, cfg, args.images, modality, ids_from_folders=args.ids_from_folders, device=device,
        progress=not args.quiet,
    )
    path = save_features(feats, args.out)
    counts = ", ".join(f"{int((feats.modality == m).sum())} {name}" for m, name in MODALITY_NAMES.items()
                       if (feats.modality == m).any())
    print(f"{counts} images, {feats.features.shape[1]}-d features written to {path}")
    return 0
