"""The user's own images, unlabelled or labelled by folder.

Unlabelled layout under ROOT (``data.ids_from_folders: false``)::

    visible/<camera>/**/*.jpg|jpeg|png|bmp      (extensions in any case, any sub-folders)
    infrared/<camera>/**/*

Every record has pid -1 (unknown). Images lying directly in ``visible/`` or ``infrared/``
belong to a camera with the empty name "" (camid 0 when present).

Labelled layout (``data.ids_from_folders: true``)::

    visible/<camera>/<person id>/**/<image>
    infrared/<camera>/<person id>/**/<image>
    train.txt, test.txt                         optional: one person id per line

A person-id folder name may be any string; the same name in both modalities is the same
person. pid is the index of the name in the sorted list of every id name of the folder, so
it does not depend on the split. With split files the training records are the ids of
``train.txt`` (or every id not in ``test.txt``) and the test records those of ``test.txt``
(or every id not in ``train.txt``); without them both are every image, and the log says
that training and test images overlap.

In both layouts camid is the index of the camera folder's name in the sorted list of camera
names of both modalities together, so a name used under both ``visible/`` and
``infrared/`` (a dual-sensor camera) is one camera. Dot-prefixed files and folders are
skipped.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

from bmil.data.images import is_image_name
from bmil.errors import DatasetError
from bmil.records import MODALITIES, MODALITY_NAMES, OTHER_MODALITY, Record

log = logging.getLogger(__name__)

SPLIT_FILES = ("train.txt", "test.txt")
SHOWN = 5  # ids named in a message before "…"


def _images_below(folder: str) -> list[str]:
    """Relative paths of every image below ``folder``, sorted."""
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.relpath(os.path.join(current, f), folder) for f in files if is_image_name(f))
    return sorted(found)


def _entries(folder: str) -> tuple[list[str], list[os.DirEntry]]:
    """(sorted image paths directly in ``folder``, sorted visible sub-folders)."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    images = [e.path for e in entries if e.is_file() and is_image_name(e.name)]
    folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    return images, folders


def _modality_top(root: str, modality: int) -> str:
    name = MODALITY_NAMES[modality]
    top = os.path.join(root, name)
    if not os.path.isdir(top):
        raise DatasetError(f"{top} not found: put the {name} images in {top}/<camera>/.")
    return top


def _root(root: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(root))
    if not os.path.isdir(path):
        raise DatasetError(f"{path} is not a folder: expected {path}/visible/<camera>/ and {path}/infrared/<camera>/.")
    return path


def _images_by_camera(top: str) -> dict[str, list[str]]:
    """{camera name: sorted absolute image paths} for one modality folder (unlabelled)."""
    loose, folders = _entries(top)
    cameras: dict[str, list[str]] = {"": loose} if loose else {}
    for entry in folders:
        images = [os.path.join(entry.path, p) for p in _images_below(entry.path)]
        if images:
            cameras[entry.name] = images
    return cameras


def _camera_ids(names) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(set(names)))}


def _unlabelled(root: str) -> list[Record]:
    by_modality = {}
    for modality in MODALITIES:
        top = _modality_top(root, modality)
        by_modality[modality] = _images_by_camera(top)
        if not by_modality[modality]:
            raise DatasetError(f"no images (.jpg, .jpeg, .png, .bmp) found under {top}.")
    camid = _camera_ids(name for cameras in by_modality.values() for name in cameras)
    return [
        Record(path, -1, camid[name], modality)
        for modality, cameras in by_modality.items()
        for name, paths in cameras.items()
        for path in paths
    ]


# ---------------------------------------------------------------- labelled folders


@dataclass
class LabelledFolder:
    """One pass over a labelled folder.

    images: {(modality, camera name, id name): sorted absolute image paths}.
    id_names: every id name with images, sorted (pid = index in this list).
    layout_errors: one sentence per misplaced image group (images outside a person-id
    folder) or modality without images; the readers raise the first one.
    empty_folders: person-id folders without any image (the readers log and skip them).
    split: {"train.txt" | "test.txt": id names listed} for the split files present.
    """

    root: str
    images: dict[tuple[int, str, str], list[str]] = field(default_factory=dict)
    id_names: list[str] = field(default_factory=list)
    layout_errors: list[str] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)

    def ids_of(self, modality: int) -> set[str]:
        return {name for (m, _, name) in self.images if m == modality}

    def one_modality_ids(self) -> dict[int, list[str]]:
        """{modality: sorted id names with images in that modality only}."""
        ids = {m: self.ids_of(m) for m in MODALITIES}
        return {m: sorted(ids[m] - ids[OTHER_MODALITY[m]]) for m in MODALITIES}

    def records(self, ids: set[str] | None = None) -> list[Record]:
        """Records of ``ids`` (default: all), ordered by modality, camera, id, path."""
        pid = {name: i for i, name in enumerate(self.id_names)}
        camid = _camera_ids(camera for (_, camera, _) in self.images)
        return [
            Record(path, pid[name], camid[camera], modality)
            for (modality, camera, name), paths in sorted(self.images.items())
            if ids is None or name in ids
            for path in paths
        ]


@functools.lru_cache(maxsize=256)
def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only (test sets are read at every evaluation)."""
    log.warning("%s", message)


def _layout_error(root: str, where: str, what: str) -> str:
    modality = os.path.relpath(where, root).split(os.sep)[0]
    return (
        f"{where} holds images directly{what}: with data.ids_from_folders every image lies in "
        f"{root}/{modality}/<camera>/<person id>/"
    )


def read_split_file(path: str) -> list[str]:
    """Person-id names of a split file, one per line (blank lines and surrounding spaces
    ignored), in file order without repeats."""
    try:
        with open(path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"split file {path} cannot be read as text ({type(err).__name__})") from err
    return list(dict.fromkeys(name for name in names if name))


def scan_labelled(root: str | os.PathLike) -> LabelledFolder:
    """Walk ROOT/{visible,infrared}/<camera>/<person id>/ once; raises DatasetError only
    for a missing root or modality folder (every other problem is collected)."""
    root = _root(root)
    found = LabelledFolder(root)
    for modality in MODALITIES:
        top = _modality_top(root, modality)
        loose, cameras = _entries(top)
        if loose:
            found.layout_errors.append(_layout_error(root, top, " (no camera and person-id folders)"))
        for camera in cameras:
            loose, people = _entries(camera.path)
            if loose:
                found.layout_errors.append(_layout_error(
                    root, camera.path, f" (is {camera.name} a person folder without a camera folder above it?)"
                ))
            for person in people:
                images = [os.path.join(person.path, p) for p in _images_below(person.path)]
                if images:
                    found.images[(modality, camera.name, person.name)] = images
                else:
                    found.empty_folders.append(person.path)
    for modality in MODALITIES:
        if not found.ids_of(modality) and not found.layout_errors:
            top = os.path.join(root, MODALITY_NAMES[modality])
            found.layout_errors.append(
                f"no images found under {top}/<camera>/<person id>/ (.jpg, .jpeg, .png, .bmp)"
            )
    found.id_names = sorted({name for (_, _, name) in found.images})
    for name in SPLIT_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            found.split[name] = read_split_file(path)
    return found


def split_ids(found: LabelledFolder) -> dict[str, set[str]]:
    """{"train": ids, "test": ids} as the split files say (module docstring)."""
    every = set(found.id_names)
    train, test = found.split.get("train.txt"), found.split.get("test.txt")
    if train is None and test is None:
        return {"train": every, "test": every}
    train_ids = set(train) & every if train is not None else every - set(test)
    test_ids = set(test) & every if test is not None else every - set(train)
    return {"train": train_ids, "test": test_ids}


def named(names, shown: int = SHOWN) -> str:
    """"a, b, c" — at most ``shown`` names, then "… (N in all)"."""
    names = list(names)
    text = ", ".join(names[:shown])
    return text + (f", … ({len(names)} in all)" if len(names) > shown else "")


def _checked_labelled(root: str | os.PathLike) -> LabelledFolder:
    found = scan_labelled(root)
    if found.layout_errors:
        raise DatasetError(found.layout_errors[0])
    for path in found.empty_folders:
        _warn_once(f"empty id folder {path}: it holds no image and is ignored")
    for name, ids in found.split.items():
        missing = [i for i in ids if i not in set(found.id_names)]
        if missing:
            _warn_once(f"{len(missing)} id(s) named in {os.path.join(found.root, name)} have no images: "
                       f"{named(missing)}")
    return found


def _split_records(root: str | os.PathLike, part: str) -> tuple[LabelledFolder, list[Record]]:
    found = _checked_labelled(root)
    ids = split_ids(found)
    if not found.split:
        _warn_once(f"{found.root} has no train.txt / test.txt: training and test images overlap (the same "
                   f"{len(found.id_names)} people; scores are optimistic)")
    elif part == "train" and ids["train"] & ids["test"]:
        both = sorted(ids["train"] & ids["test"])
        _warn_once(f"{len(both)} id(s) are in both the training and the test split: {named(both)}")
    records = found.records(ids[part])
    for modality in MODALITIES:
        if not any(r.modality == modality for r in records):
            raise DatasetError(f"the {part} split of {found.root} has no {MODALITY_NAMES[modality]} image")
    return found, records


def folder_train(root: str | os.PathLike, ids_from_folders: bool = False) -> list[Record]:
    """Training records of ROOT, ordered by modality (visible first), camera, then path.

    ids_from_folders: False — every image, pid -1; True — the labelled layout's training
    split, pid from the person-id folder (module docstring).
    """
    if ids_from_folders:
        return _split_records(root, "train")[1]
    return _unlabelled(_root(root))


def folder_test(root: str | os.PathLike) -> list[Record]:
    """Test records of a labelled ROOT (its test split, every image without split files);
    the ids present in one modality only are named in a warning (they cannot be matched)."""
    found, records = _split_records(root, "test")
    names = found.id_names
    by_modality = {m: {names[r.pid] for r in records if r.modality == m} for m in MODALITIES}
    for modality in MODALITIES:
        alone = sorted(by_modality[modality] - by_modality[OTHER_MODALITY[modality]])
        if alone:
            _warn_once(f"{len(alone)} test id(s) of {found.root} have {MODALITY_NAMES[modality]} images only, "
                       f"so their queries have no match: {named(alone)}")
    return records
