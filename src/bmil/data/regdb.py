"""RegDB reader: the ten published train/test trial lists.

Layout under ROOT::

    Visible/ …, Thermal/ …                   the images (any sub-folders)
    idx/train_visible_{t}.txt, idx/train_thermal_{t}.txt
    idx/test_visible_{t}.txt,  idx/test_thermal_{t}.txt      t = 1 … 10

Each list line reads ``relative/path label`` with the path relative to ROOT. Records keep
the list's order; pid = the label, camid 1 for visible, 2 for thermal.
"""

from __future__ import annotations

import os

from bmil.errors import DatasetError
from bmil.records import INFRARED, MODALITY_INDEX, VISIBLE, Record

DATASET = "RegDB"
TRIALS = range(1, 11)
CAMERA = {VISIBLE: 1, INFRARED: 2}
LIST_MODALITY = {name: MODALITY_INDEX[name] for name in ("visible", "thermal")}  # list-file names


def read_labelled_list(path: str, root: str, dataset: str) -> list[tuple[str, int]]:
    """``(absolute image path, label)`` pairs of a "relative/path label" list, in file order.

    Blank lines are skipped. Raises DatasetError for a missing file or a malformed line.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found: is {root} the {dataset} root?")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{path} line {line_no} must read 'relative/path label', found {line.strip()!r}.")
            pairs.append((os.path.normpath(os.path.join(root, parts[0])), int(parts[1])))
    return pairs


def list_path(root: str, split: str, modality_name: str, trial: int) -> str:
    """ROOT/idx/{split}_{modality_name}_{trial}.txt, e.g. idx/train_visible_1.txt."""
    return os.path.join(root, "idx", f"{split}_{modality_name}_{trial}.txt")


def _check(root: str | os.PathLike, trial: int) -> str:
    if isinstance(trial, bool) or not isinstance(trial, int) or trial not in TRIALS:
        raise DatasetError(f"RegDB trial must be an integer from 1 to 10, got {trial!r}.")
    path = os.path.abspath(os.fspath(root))
    if not os.path.isdir(path):
        raise DatasetError(f"{DATASET} root {path} is not a folder.")
    return path


def _read(root: str, split: str, modality_name: str, trial: int) -> list[Record]:
    modality = LIST_MODALITY[modality_name]
    pairs = read_labelled_list(list_path(root, split, modality_name, trial), root, DATASET)
    return [Record(path, label, CAMERA[modality], modality) for path, label in pairs]


def regdb_train(root: str | os.PathLike, trial: int) -> list[Record]:
    """Training records of ``trial`` (1..10): the visible list, then the thermal list."""
    root = _check(root, trial)
    return _read(root, "train", "visible", trial) + _read(root, "train", "thermal", trial)


def regdb_test(root: str | os.PathLike, trial: int) -> tuple[list[Record], list[Record]]:
    """(visible, thermal) test records of ``trial`` (1..10)."""
    root = _check(root, trial)
    return _read(root, "test", "visible", trial), _read(root, "test", "thermal", trial)
