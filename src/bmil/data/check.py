"""Dataset check: what a root of each known layout holds, plus broken files.

``inspect_<layout>(root)`` counts what the root holds and lists the problems it finds (ids
named in split files without images, empty id folders, listed images that are missing);
:func:`inspection_report` compares such an inspection with expected counts, one line
``"<what>: found X, expected Y"`` per difference, and decodes every image. A wrong root or
a missing/malformed split file raises DatasetError instead (one sentence, as the readers
do). Which layout and counts belong to a dataset name is the registry's business:
``bmil.datasets.check_report`` / ``check_dataset`` look them up and call these.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from bmil.data import folder as user_folder
from bmil.data import llcm, regdb, sysu
from bmil.data.images import image_error, list_image_names
from bmil.errors import DatasetError
from bmil.records import INFRARED, MODALITIES, MODALITY_NAMES, VISIBLE, Record, record_arrays

PER_ID_KEY = "images per id in each list"


@dataclass
class _Inspection:
    """What one pass over a dataset root found."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth knowing, not an error
    images: list[str] = field(default_factory=list)  # existing files to decode-check
    notes: list[str] = field(default_factory=list)  # how the root was read


def _existing_root(root: str | os.PathLike, dataset: str) -> str:
    path = os.path.abspath(os.fspath(root))
    if not os.path.isdir(path):
        raise DatasetError(f"{dataset} root {path} is not a folder.")
    return path


def _modality_counts(records: list[Record]) -> tuple[int, int]:
    _, _, modality = record_arrays(records)
    return int(np.sum(modality == VISIBLE)), int(np.sum(modality == INFRARED))


def _distinct_ids(records: Iterable[Record]) -> int:
    return len({r.pid for r in records})


def _train_counts(train: list[Record], test: list[Record]) -> dict[str, int]:
    """train ids, train visible / infrared images, test ids."""
    visible, infrared = _modality_counts(train)
    return {"train ids": _distinct_ids(train), "train visible images": visible, "train infrared images": infrared,
            "test ids": _distinct_ids(test)}


def _empty_id_folders(camera_folders: Iterable[str]) -> list[str]:
    """"empty id folder <path>" for every sub-folder of the camera folders without images."""
    lines = []
    for camera in camera_folders:
        if not os.path.isdir(camera):
            continue
        with os.scandir(camera) as entries:
            folders = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
        lines.extend(f"empty id folder {f}" for f in folders if not list_image_names(f))
    return lines


def _ids_without_images(dataset: str, split_file: str, ids: Iterable[int], with_images: set[int]) -> list[str]:
    return [f"{dataset} id {pid} named in {split_file} has no images" for pid in ids if pid not in with_images]


def inspect_sysu(root: str | os.PathLike) -> _Inspection:
    root = _existing_root(root, "SYSU-MM01")
    split_files = {name: sysu.split_ids(root, name) for name in ("train_id.txt", "val_id.txt", "test_id.txt")}
    train_ids = sorted(set(split_files["train_id.txt"]) | set(split_files["val_id.txt"]))
    test_ids = sorted(set(split_files["test_id.txt"]))
    train = sysu.id_records(root, train_ids, (1, 2, 3, 4, 5, 6))
    query = sysu.id_records(root, test_ids, sysu.INFRARED_CAMERAS)
    test_visible = sysu.id_records(root, test_ids, sysu.VISIBLE_CAMERAS)
    found = _Inspection()
    found.counts = {**_train_counts(train, query + test_visible), "query images": len(query)}
    with_images = {r.pid for r in train + query + test_visible}
    for name, ids in split_files.items():
        found.problems += _ids_without_images("SYSU-MM01", f"exp/{name}", ids, with_images)
    found.problems += _empty_id_folders(os.path.join(root, f"cam{c}") for c in range(1, 7))
    found.images = [r.path for r in train + query + test_visible]
    return found


def inspect_regdb(root: str | os.PathLike, per_id: int | None) -> _Inspection:
    root = _existing_root(root, "RegDB")
    if not os.path.isdir(os.path.join(root, "idx")):
        raise DatasetError(f"{os.path.join(root, 'idx')} not found: is {root} the RegDB root?")
    found = _Inspection()
    listed: dict[str, str] = {}  # image path -> first list naming it
    for trial in regdb.TRIALS:
        for split in ("train", "test"):
            ids: set[int] = set()
            for modality_name in regdb.LIST_MODALITY:
                list_file = regdb.list_path(root, split, modality_name, trial)
                pairs = regdb.read_labelled_list(list_file, root, "RegDB")
                labels = np.array([label for _, label in pairs], dtype=np.int64)
                ids.update(labels.tolist())
                found.counts[f"trial {trial} {split} {modality_name} images"] = len(pairs)
                for path, _ in pairs:
                    listed.setdefault(path, list_file)
                if per_id is not None:
                    pids, counts = np.unique(labels, return_counts=True)
                    found.problems += [
                        f"RegDB trial {trial} {split} {modality_name} images of id {pid}: found {n}, expected {per_id}"
                        for pid, n in zip(pids.tolist(), counts.tolist(), strict=True) if n != per_id
                    ]
            found.counts[f"trial {trial} {split} ids"] = len(ids)
    for path, list_file in listed.items():
        if os.path.isfile(path):
            found.images.append(path)
        else:
            found.problems.append(f"missing image {path} listed in {list_file}")
    return found


def inspect_llcm(root: str | os.PathLike) -> _Inspection:
    root = _existing_root(root, "LLCM")
    train = llcm.llcm_train(root)
    test_ids = llcm.llcm_test_ids(root)
    query = {m: llcm.llcm_query(root, m) for m in MODALITIES}
    test = query[VISIBLE] + query[INFRARED]
    found = _Inspection()
    found.counts = {
        **_train_counts(train, test),
        "test visible images": len(query[VISIBLE]),
        "test infrared images": len(query[INFRARED]),
    }
    for modality, name in llcm.TRAIN_LISTS.items():
        list_file = os.path.join(root, "idx", name)
        found.problems += [
            f"missing image {r.path} listed in {list_file}"
            for r in train if r.modality == modality and not os.path.isfile(r.path)
        ]
    found.problems += _ids_without_images("LLCM", "idx/test_id.txt", test_ids, {r.pid for r in test})
    for folder in llcm.TEST_FOLDER.values():
        top = os.path.join(root, folder)
        if os.path.isdir(top):
            with os.scandir(top) as entries:
                cameras = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
            found.problems += _empty_id_folders(cameras)
    found.images = [r.path for r in train if os.path.isfile(r.path)] + [r.path for r in test]
    return found


def looks_labelled(root: str | os.PathLike) -> bool:
    """True when ROOT has a split file, or every image of both modalities lies exactly in
    ROOT/<modality>/<camera>/<folder>/ (what ``data.ids_from_folders`` reads as person ids)."""
    root = os.path.abspath(os.fspath(root))
    if any(os.path.isfile(os.path.join(root, name)) for name in user_folder.SPLIT_FILES):
        return True
    depths = set()
    for modality in MODALITIES:
        top = os.path.join(root, MODALITY_NAMES[modality])
        if os.path.isdir(top):
            depths.update(path.count(os.sep) for path in user_folder._images_below(top))
    return depths == {2}


MAX_CAMERAS = 12  # more camera folders than this in one modality look like person folders


def camera_level_mistakes(root: str | os.PathLike) -> list[str]:
    """One sentence per sign that an unlabelled reading of ROOT takes person folders for
    cameras (``visible/<person>/<image>``, the camera level missing): a modality with more
    than MAX_CAMERAS camera folders, or camera folders of which some hold images directly
    and others only sub-folders (a mix of the two layouts)."""
    root = os.path.abspath(os.fspath(root))
    lines = []
    for modality in MODALITIES:
        top = os.path.join(root, MODALITY_NAMES[modality])
        if not os.path.isdir(top):
            continue
        _, cameras = user_folder._entries(top)
        direct = [c.name for c in cameras if user_folder._entries(c.path)[0]]
        nested = [c.name for c in cameras if not user_folder._entries(c.path)[0] and user_folder._images_below(c.path)]
        if len(cameras) > MAX_CAMERAS and direct:
            lines.append(
                f"{top} holds {len(cameras)} camera folders ({user_folder.named([c.name for c in cameras], 3)}) "
                f"with images directly in them: they look like person-id folders without a camera folder above "
                f"them; the layout is {top}/<camera>/<person id>/<image> (or, without ids, {top}/<camera>/<image>: "
                "then pass --no-ids-from-folders)"
            )
        elif direct and nested:
            lines.append(
                f"{top}: camera folder(s) {user_folder.named(direct, 3)} hold images directly but "
                f"{user_folder.named(nested, 3)} hold only sub-folders: is a camera level missing above some person "
                f"folders? The layout is {top}/<camera>/<person id>/<image> (or, without ids, {top}/<camera>/<image>: "
                "then pass --no-ids-from-folders)"
            )
    return lines


def inspect_folder(root: str | os.PathLike, ids_from_folders: bool | None = None) -> _Inspection:
    """Counts and problems of a user folder; ``ids_from_folders`` None = :func:`looks_labelled`.

    Read without ids, the layout's likely mistakes (:func:`camera_level_mistakes`) are
    problems when the layout was detected and warnings when ``ids_from_folders`` is False
    (the user said the folders are cameras)."""
    labelled = looks_labelled(root) if ids_from_folders is None else ids_from_folders
    if not labelled:
        records = user_folder.folder_train(root)
        visible, infrared = _modality_counts(records)
        counts = {"visible images": visible, "infrared images": infrared, "cameras": len({r.camid for r in records})}
        found = _Inspection(counts=counts, images=[r.path for r in records])
        found.notes.append(f"read without person ids ({os.path.abspath(os.fspath(root))}/<modality>/<camera>/"
                           f"<image>, layout {'given' if ids_from_folders is False else 'detected'})")
        mistakes = camera_level_mistakes(root)
        if ids_from_folders is None:
            found.problems += mistakes
        else:
            found.warnings += mistakes
        return found
    return _inspect_labelled_folder(root, how="given" if ids_from_folders else "detected")


def _inspect_labelled_folder(root: str | os.PathLike, how: str) -> _Inspection:
    found = user_folder.scan_labelled(root)
    records = found.records()
    pids, camids, modality = record_arrays(records)
    visible, infrared = _modality_counts(records)
    ids = {m: found.ids_of(m) for m in MODALITIES}
    per_id = np.bincount(pids, minlength=len(found.id_names)) if len(pids) else np.zeros(0, np.int64)
    per_id = per_id[per_id > 0]
    counts = {
        "visible images": visible,
        "infrared images": infrared,
        "visible ids": len(ids[VISIBLE]),
        "infrared ids": len(ids[INFRARED]),
        "ids in both modalities": len(ids[VISIBLE] & ids[INFRARED]),
        "fewest images per id": int(per_id.min()) if per_id.size else 0,
        "most images per id": int(per_id.max()) if per_id.size else 0,
        "visible cameras": len({c for (m, c, _) in found.images if m == VISIBLE}),
        "infrared cameras": len({c for (m, c, _) in found.images if m == INFRARED}),
    }
    inspection = _Inspection(counts=counts, images=[r.path for r in records])
    inspection.notes.append(
        f"person ids read from folder names ({found.root}/<modality>/<camera>/<person id>/, layout {how})"
    )
    inspection.problems += found.layout_errors
    inspection.problems += [f"empty id folder {path}" for path in found.empty_folders]
    for name, listed in found.split.items():
        missing = [i for i in listed if i not in set(found.id_names)]
        if missing:
            split_file = os.path.join(found.root, name)
            inspection.problems.append(
                f"{len(missing)} id(s) named in {split_file} have no images: {user_folder.named(missing)}"
            )
    for m, alone in found.one_modality_ids().items():
        if alone:
            inspection.warnings.append(
                f"{len(alone)} id(s) have {MODALITY_NAMES[m]} images only and can never be matched across "
                f"modalities: {user_folder.named(alone)}"
            )
    if found.split:
        split = user_folder.split_ids(found)
        counts["train ids"], counts["test ids"] = len(split["train"]), len(split["test"])
        both = sorted(split["train"] & split["test"])
        if both:
            inspection.warnings.append(f"{len(both)} id(s) are in both train and test: {user_folder.named(both)}")
    else:
        inspection.notes.append("no train.txt / test.txt: training and test images would overlap")
    return inspection


def count_differences(counts: Mapping[str, int], expected: Mapping[str, int], title: str) -> list[str]:
    """"<title> <what>: found X, expected Y" for every count that differs from ``expected``.

    A count key "trial t <what>" is compared with the expected key "<what>" (RegDB's
    per-trial counts).
    """
    lines = []
    for key, found in counts.items():
        generic = key.split(" ", 2)[2] if key.startswith("trial ") else key
        if generic in expected and found != expected[generic]:
            lines.append(f"{title} {key}: found {found}, expected {expected[generic]}")
    return lines


def unreadable_images(paths: Iterable[str], workers: int = 8) -> list[str]:
    """"unreadable image <path>: <reason>" for every file that does not decode, sorted by path.

    Decodes each image fully in a thread pool (PIL releases the GIL while decoding).
    """
    paths = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(tqdm(pool.map(image_error, paths), total=len(paths), desc="checking images",
                            unit="img", disable=None, leave=False))
    return [f"unreadable image {p}: {reason}" for p, reason in zip(paths, reasons, strict=True) if reason is not None]


@dataclass
class CheckReport:
    """What ``bmil check-data`` prints: counts found, notes on how the root was read,
    warnings (worth knowing, not errors) and problems (differences and broken files)."""

    counts: dict[str, int]
    notes: list[str]
    warnings: list[str]
    problems: list[str]


def inspection_report(
    found: _Inspection,
    expected: Mapping[str, int],
    title: str,
    verify_images: bool = True,
    workers: int = 8,
) -> CheckReport:
    """Everything a check finds in one inspection (``inspect_<layout>(root)``): its counts,
    notes and warnings, and as problems the differences from ``expected`` (named with
    ``title``), the inspection's problems and, with ``verify_images``, every image that does
    not decode (``workers`` threads)."""
    problems = count_differences(found.counts, expected, title) + found.problems
    if verify_images:
        problems += unreadable_images(found.images, workers)
    return CheckReport(found.counts, found.notes, found.warnings, problems)
