"""LLCM reader and its test protocol, as the dataset authors' DEEN code reads them.

Layout under ROOT (checked against DEEN's ``data_loader.py`` / ``data_manager.py``)::

    idx/train_vis.txt, idx/train_nir.txt   "relative/path label" lines, paths relative to ROOT,
                                           e.g. nir/0001/0001_c01_s185535_f7010_nir.jpg
    idx/test_id.txt                        the 351 test ids, comma-separated on one line
    test_vis/cam1 … cam9/<id 4 digits>/    visible test images
    test_nir/cam1, cam2, cam4 … cam9/<id>/ near-infrared test images (no cam3 in DEEN's list)

Training (713 ids): pid = the list's label, camid parsed from the file name's ``_c<NN>_``
field (``0001_c01_…`` → camera 1). The idx/test_vis.txt / test_nir.txt lists that some
copies carry are not used: DEEN's test protocol walks the test folders.

Test (DEEN ``process_query_llcm`` / ``process_gallery_llcm``): the query is every test image
of one modality (ids sorted, cameras in the list order above, file names sorted; camid from
the ``cam<k>`` folder). The gallery of trial t is the other modality, one image per
(id, camera): ``random.seed(t)`` then ``random.choice`` over the sorted names, in the same
id/camera order — here from a private ``random.Random(t)``, which yields the same stream.
DEEN's default test mode [1, 2] is infrared → visible (gallery visible); [2, 1] the reverse.
Camera folders outside DEEN's lists (e.g. a test_nir/cam3) are ignored, as DEEN does, so
that the random picks stay identical.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator

from bmil.data.images import list_image_names
from bmil.data.regdb import read_labelled_list
from bmil.data.sysu import read_id_file
from bmil.errors import DatasetError
from bmil.records import INFRARED, VISIBLE, Record

DATASET = "LLCM"
TEST_FOLDER = {VISIBLE: "test_vis", INFRARED: "test_nir"}
TEST_CAMERAS = {VISIBLE: (1, 2, 3, 4, 5, 6, 7, 8, 9), INFRARED: (1, 2, 4, 5, 6, 7, 8, 9)}
TRAIN_LISTS = {VISIBLE: "train_vis.txt", INFRARED: "train_nir.txt"}
_CAMERA_FIELD = re.compile(r"_c(\d+)")


def _root(root: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(root))
    if not os.path.isdir(path):
        raise DatasetError(f"{DATASET} root {path} is not a folder.")
    return path


def _check_modality(modality: int) -> None:
    if modality not in (VISIBLE, INFRARED):
        raise ValueError(f"LLCM modality must be 0 (visible) or 1 (infrared), got {modality!r}.")


def camera_from_name(path: str, list_file: str) -> int:
    """The camera number of an LLCM file name (``0001_c06_s200656_f4830_nir.jpg`` → 6)."""
    match = _CAMERA_FIELD.search(os.path.basename(path))
    if match is None:
        raise DatasetError(
            f"cannot read the camera of {path} listed in {list_file}: "
            "expected a file name like 0001_c01_s185535_f7010_vis.jpg."
        )
    return int(match.group(1))


def llcm_train(root: str | os.PathLike) -> list[Record]:
    """Training records: idx/train_vis.txt, then idx/train_nir.txt, in list order."""
    root = _root(root)
    records = []
    for modality, name in TRAIN_LISTS.items():
        list_file = os.path.join(root, "idx", name)
        records.extend(
            Record(path, label, camera_from_name(path, list_file), modality)
            for path, label in read_labelled_list(list_file, root, DATASET)
        )
    return records


def llcm_test_ids(root: str) -> list[int]:
    """Ids of idx/test_id.txt in sorted order."""
    return sorted(read_id_file(os.path.join(root, "idx", "test_id.txt"), root, DATASET))


def _id_folders(root: str, modality: int) -> Iterator[tuple[int, int, str]]:
    """(pid, camid, folder) for every test id × camera of ``modality``, in DEEN's order."""
    for pid in llcm_test_ids(root):
        for camid in TEST_CAMERAS[modality]:
            yield pid, camid, os.path.join(root, TEST_FOLDER[modality], f"cam{camid}", f"{pid:04d}")


def llcm_query(root: str | os.PathLike, modality: int) -> list[Record]:
    """Every test image of ``modality`` (0 visible, 1 infrared): the query set."""
    _check_modality(modality)
    root = _root(root)
    return [
        Record(os.path.join(folder, name), pid, camid, modality)
        for pid, camid, folder in _id_folders(root, modality)
        for name in list_image_names(folder)
    ]


def llcm_gallery(root: str | os.PathLike, modality: int, trial: int = 0) -> list[Record]:
    """One random test image of ``modality`` per (id, camera) for ``trial``: the gallery."""
    _check_modality(modality)
    root = _root(root)
    rng = random.Random(trial)
    records = []
    for pid, camid, folder in _id_folders(root, modality):
        names = list_image_names(folder)
        if names:
            records.append(Record(os.path.join(folder, rng.choice(names)), pid, camid, modality))
    return records
