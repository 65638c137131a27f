"""The user's own unlabelled images.

Layout under ROOT::

    visible/<camera>/**/*.jpg|jpeg|png|bmp      (extensions in any case, any sub-folders)
    infrared/<camera>/**/*

Every record has pid -1 (unknown). camid is the index of the camera folder's name in the
sorted list of camera names of both modalities together, so a name used under both
``visible/`` and ``infrared/`` (a dual-sensor camera) is one camera. Images lying directly
in ``visible/`` or ``infrared/`` belong to a camera with the empty name "" (camid 0 when
present). Dot-prefixed files and folders are skipped.
"""

from __future__ import annotations

import os

from bmil.data.images import is_image_name
from bmil.data.records import INFRARED, MODALITY_NAMES, VISIBLE, Record
from bmil.errors import DatasetError


def _images_below(folder: str) -> list[str]:
    """Relative paths of every image below ``folder``, sorted."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.relpath(os.path.join(current, f), folder) for f in files if is_image_name(f))
    return sorted(found)


def _images_by_camera(top: str) -> dict[str, list[str]]:
    """{camera name: sorted absolute image paths} for one modality folder."""
    cameras: dict[str, list[str]] = {}
    with os.scandir(top) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    loose = [os.path.join(top, e.name) for e in entries if e.is_file() and is_image_name(e.name)]
    if loose:
        cameras[""] = loose
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            images = [os.path.join(entry.path, p) for p in _images_below(entry.path)]
            if images:
                cameras[entry.name] = images
    return cameras


def folder_train(root: str | os.PathLike) -> list[Record]:
    """Records of every image under ROOT/visible and ROOT/infrared, pid -1.

    Ordered by modality (visible first), camera name, then relative path.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root} is not a folder: expected {root}/visible/<camera>/ and {root}/infrared/<camera>/.")
    by_modality = {}
    for modality in (VISIBLE, INFRARED):
        top = os.path.join(root, MODALITY_NAMES[modality])
        if not os.path.isdir(top):
            raise DatasetError(f"{top} not found: put the {MODALITY_NAMES[modality]} images in {top}/<camera>/.")
        by_modality[modality] = _images_by_camera(top)
        if not by_modality[modality]:
            raise DatasetError(f"no images (.jpg, .jpeg, .png, .bmp) found under {top}.")
    names = sorted({name for cameras in by_modality.values() for name in cameras})
    camid = {name: i for i, name in enumerate(names)}
    return [
        Record(path, -1, camid[name], modality)
        for modality, cameras in by_modality.items()
        for name, paths in cameras.items()
        for path in paths
    ]
