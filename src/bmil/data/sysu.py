"""SYSU-MM01 reader and its published single-/multi-shot test protocol.

Layout under ROOT::

    cam1/ … cam6/        one 4-digit folder per person id (0001 …), JPEG images inside
    exp/train_id.txt     comma-separated ids (one line; a trailing newline/spaces are fine)
    exp/val_id.txt
    exp/test_id.txt

cam1, cam2, cam4, cam5 are visible, cam3 and cam6 infrared. Training uses the ids of
train_id.txt + val_id.txt (395 people). Test queries are all infrared images (cam3, cam6) of
the test ids; the gallery of trial t is drawn exactly as the dataset authors' code does:
``random.seed(t)``, ids in sorted order, cameras in the order 1, 2, 4, 5 (all-search) or
1, 2 (indoor-search), a missing camera folder skipped, then ``random.choice`` over the sorted
file names of the folder. A private ``random.Random(t)`` yields the same stream as the
seeded module functions, so the global generator is left alone.

Only image files (.jpg/.jpeg/.png/.bmp, not dot-prefixed) are listed; the real data set holds
nothing else, so this changes no pick.
"""

from __future__ import annotations

import os
import random

from bmil.data.images import list_image_names
from bmil.errors import DatasetError
from bmil.records import INFRARED, VISIBLE, Record

DATASET = "SYSU-MM01"
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
MULTI_SHOT = 10


def camera_modality(camid: int) -> int:
    """VISIBLE for cameras 1, 2, 4, 5; INFRARED for 3, 6."""
    return INFRARED if camid in INFRARED_CAMERAS else VISIBLE


def read_id_file(path: str, root: str, dataset: str) -> list[int]:
    """Integer ids of a comma-separated id file, in file order.

    The published files hold one line; further lines are read too. Raises DatasetError when
    the file is missing, holds a non-integer or no id at all.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found: is {root} the {dataset} root?")
    with open(path, encoding="utf-8") as handle:
        tokens = [t.strip() for t in handle.read().replace("\n", ",").split(",")]
    tokens = [t for t in tokens if t]
    try:
        ids = [int(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise DatasetError(f"{path} must hold comma-separated integer ids, found {bad!r}.") from None
    if not ids:
        raise DatasetError(f"{path} holds no ids: expected comma-separated integers such as 1,2,4.")
    return ids


def id_folder(root: str, camid: int, pid: int) -> str:
    """ROOT/cam<camid>/<pid as 4 digits>."""
    return os.path.join(root, f"cam{camid}", f"{pid:04d}")


def id_records(root: str, pids: list[int], cameras: tuple[int, ...]) -> list[Record]:
    """All images of ``pids`` (in the order given) × ``cameras``, file names sorted."""
    records = []
    for pid in pids:
        for camid in cameras:
            folder = id_folder(root, camid, pid)
            modality = camera_modality(camid)
            records.extend(Record(os.path.join(folder, n), pid, camid, modality) for n in list_image_names(folder))
    return records


def split_ids(root: str, name: str) -> list[int]:
    """Ids of ROOT/exp/<name> (e.g. "train_id.txt"), in file order."""
    return read_id_file(os.path.join(root, "exp", name), root, DATASET)


def _root(root: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(root))
    if not os.path.isdir(path):
        raise DatasetError(f"{DATASET} root {path} is not a folder.")
    return path


def sysu_train(root: str | os.PathLike) -> list[Record]:
    """Training records: ids of exp/train_id.txt + exp/val_id.txt, all six cameras.

    Sorted by (pid, camera, file name); pid = the dataset id, camid = 1..6.
    """
    root = _root(root)
    pids = sorted(set(split_ids(root, "train_id.txt")) | set(split_ids(root, "val_id.txt")))
    records = id_records(root, pids, (1, 2, 3, 4, 5, 6))
    if not records:
        raise DatasetError(f"no images found under {root}/cam1 … cam6 for the ids of exp/train_id.txt and val_id.txt.")
    return records


def sysu_query(root: str | os.PathLike) -> list[Record]:
    """Test queries: every infrared image (cam3, cam6) of the ids in exp/test_id.txt.

    Ordered as the published code: ids sorted, cam3 before cam6, file names sorted.
    """
    root = _root(root)
    return id_records(root, sorted(split_ids(root, "test_id.txt")), INFRARED_CAMERAS)


def sysu_gallery(root: str | os.PathLike, mode: str = "all", trial: int = 0, shots: int = 1) -> list[Record]:
    """Gallery of one test trial: visible images of the test ids, picked per (id, camera).

    mode: "all" (cameras 1, 2, 4, 5) or "indoor" (cameras 1, 2).
    shots=1: ``random.choice`` of one image per (id, camera) — the published protocol.
    shots=10 (multi-shot): ``random.sample`` of min(10, n) of the folder's sorted names from
    the same stream (the published code draws these with numpy; this reader keeps one
    generator so a trial stays reproducible from ``trial`` alone).
    """
    if mode not in GALLERY_CAMERAS:
        raise ValueError(f"SYSU-MM01 gallery mode must be 'all' or 'indoor', got {mode!r}.")
    if shots not in (1, MULTI_SHOT):
        raise ValueError(f"SYSU-MM01 gallery shots must be 1 or {MULTI_SHOT}, got {shots!r}.")
    root = _root(root)
    rng = random.Random(trial)
    records = []
    for pid in sorted(split_ids(root, "test_id.txt")):
        for camid in GALLERY_CAMERAS[mode]:
            folder = id_folder(root, camid, pid)
            names = list_image_names(folder)
            if not names:
                continue
            picked = [rng.choice(names)] if shots == 1 else rng.sample(names, min(MULTI_SHOT, len(names)))
            records.extend(Record(os.path.join(folder, n), pid, camid, VISIBLE) for n in picked)
    return records
