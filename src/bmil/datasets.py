"""The dataset registry: the one place that says, for each ``data.dataset`` name, how its
training records are read, how it is scored, what the published counts are, whether a
model is trained per split trial, and which eval directions it knows.

This layer composes the two below it: the readers of ``bmil.data`` make records, the
protocols of ``bmil.evaluation`` score records (neither imports the other). ``config.py``,
``engine/``, ``commands/`` and ``cli.py`` look every dataset up here; none of them names one.

Adding a dataset = writing its reader (records: path, person id or -1, camera, modality)
and, from your own code, one call::

    register_dataset(Dataset("mine", "my dataset", train=my_train, test=my_test))

after which ``data.dataset: mine`` works in a configuration, in ``bmil train`` / ``eval``
run from that code, and :func:`dataset_names` lists it. ``train(root, cfg)`` returns the
training records; ``test(extract, root, cfg, trials)`` reads the test records and hands
them to a protocol (e.g. :func:`bmil.evaluation.evaluate_folder`).

Functions stored in an entry receive ``cfg`` (a :class:`bmil.config.Config`; only its
``data`` and ``eval`` sections are read). The built-in entries import their readers and
protocols when called, so this module imports neither torch nor the evaluation package.

Direction names: RegDB calls the infrared modality "thermal", so its directions are
``v2t`` / ``t2v``; LLCM's and the folder's are ``v2i`` / ``i2v``. :func:`eval_direction`
maps one spelling onto the other (``v2t`` ≡ ``v2i``, ``t2v`` ≡ ``i2v``) for the dataset at
hand and rejects a direction the dataset does not have.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from bmil.errors import ConfigError, DatasetError
from bmil.records import MODALITY_INDEX, Record

if TYPE_CHECKING:
    import numpy as np

    Extract = Callable[[list[Record]], np.ndarray]

log = logging.getLogger(__name__)

BOTH = "both"
# The two spellings of each cross-modality direction ("t" = thermal, RegDB's infrared).
DIRECTION_ALIASES = {"v2t": "v2i", "t2v": "i2v", "v2i": "v2t", "i2v": "t2v"}
DIRECTIONS = (BOTH, *DIRECTION_ALIASES)


@dataclass(frozen=True)
class Dataset:
    """One registered dataset.

    name: the ``data.dataset`` value. title: how messages and results name it.
    train: ``(root, cfg) -> records`` of the training set.
    test: ``(extract, root, cfg, trials) -> [ProtocolResult, …]`` — reads the test records
    and scores them with a protocol of ``bmil.evaluation`` (trials: galleries to draw, for
    datasets that draw them; the direction to pass is :func:`eval_direction` ``(cfg)``);
    None when never scorable.
    scorable: ``cfg -> bool``, whether ``test`` applies to this configuration.
    published_counts: what ``bmil check-data`` and the start of training compare with.
    per_trial: a model is trained on one split (``data.trial`` in ``trials``) and only
    scored on that split's test set (RegDB).
    trials: the valid ``data.trial`` values when per_trial.
    directions: the eval direction names, in result order ("both" runs them all).
    generate: ``(root, cfg) -> None`` makes the data at ``root`` when absent (synthetic).
    inspect: ``(root, per_id=…, ids_from_folders=…) -> inspection`` for ``bmil check-data``
    (``bmil.data.check``); None when check-data does not know the layout.
    """

    name: str
    title: str
    train: Callable[[Path, Any], list[Record]]
    test: Callable[..., list] | None = None
    scorable: Callable[[Any], bool] = lambda cfg: True
    published_counts: Mapping[str, int] = field(default_factory=dict)
    per_trial: bool = False
    trials: range | None = None
    directions: tuple[str, ...] = ()
    generate: Callable[[Path, Any], None] | None = None
    inspect: Callable[..., Any] | None = None

    @property
    def checkable(self) -> bool:
        return self.inspect is not None


# ---------------------------------------------------------------- the entries' functions


def _sysu_train(root: Path, cfg) -> list[Record]:
    from bmil.data.sysu import sysu_train

    return sysu_train(root)


def _sysu_test(extract: Extract, root: Path, cfg, trials: int) -> list:
    from bmil.data.sysu import sysu_gallery, sysu_query
    from bmil.evaluation import evaluate_sysu

    mode, shots = cfg.eval.mode, cfg.eval.shots
    galleries = [sysu_gallery(root, mode=mode, trial=t, shots=shots) for t in range(trials)]
    return [evaluate_sysu(extract, query=sysu_query(root), galleries=galleries, mode=mode, shots=shots)]


def _regdb_train(root: Path, cfg) -> list[Record]:
    from bmil.data.regdb import regdb_train

    return regdb_train(root, cfg.data.trial)


def _regdb_test(extract: Extract, root: Path, cfg, trials: int) -> list:
    from bmil.data.regdb import regdb_test
    from bmil.evaluation import evaluate_regdb

    visible, thermal = regdb_test(root, cfg.data.trial)
    return evaluate_regdb(extract, visible=visible, thermal=thermal, trial=cfg.data.trial,
                          direction=_logged_direction(cfg))


def _llcm_train(root: Path, cfg) -> list[Record]:
    from bmil.data.llcm import llcm_train

    return llcm_train(root)


def _llcm_test(extract: Extract, root: Path, cfg, trials: int) -> list:
    from bmil.data.llcm import llcm_gallery, llcm_query
    from bmil.evaluation import evaluate_llcm
    from bmil.evaluation.protocols import LLCM_DIRECTIONS

    direction = _logged_direction(cfg)
    pairs = [[MODALITY_INDEX[m] for m in LLCM_DIRECTIONS[name]]
             for name in (LLCM_DIRECTIONS if direction == BOTH else (direction,))]
    queries = {q: llcm_query(root, q) for q, _ in pairs}
    galleries = {g: [llcm_gallery(root, g, trial=t) for t in range(trials)] for _, g in pairs}
    return evaluate_llcm(extract, queries=queries, galleries=galleries, direction=direction)


def _folder_train(root: Path, cfg) -> list[Record]:
    from bmil.data.folder import folder_train

    return folder_train(root, ids_from_folders=cfg.data.ids_from_folders)


def _folder_test(extract: Extract, root: Path, cfg, trials: int) -> list:
    from bmil.data.folder import folder_test
    from bmil.evaluation import evaluate_folder

    return evaluate_folder(extract, folder_test(root), direction=_logged_direction(cfg))


def _sysu_inspect(root: Path, **options):
    from bmil.data.check import inspect_sysu

    return inspect_sysu(root)


def _regdb_inspect(root: Path, *, per_id: int | None = None, **options):
    from bmil.data.check import inspect_regdb

    return inspect_regdb(root, per_id)


def _llcm_inspect(root: Path, **options):
    from bmil.data.check import inspect_llcm

    return inspect_llcm(root)


def _folder_inspect(root: Path, *, ids_from_folders: bool | None = None, **options):
    from bmil.data.check import inspect_folder

    return inspect_folder(root, ids_from_folders)


def _make_synthetic(root: Path, cfg) -> None:
    from bmil.data.synthetic import make_synthetic

    s = cfg.data.synthetic
    make_synthetic(
        root, num_ids=s.num_ids, num_train_ids=s.num_train_ids, images_per_camera=s.images_per_camera,
        height=s.height, width=s.width, seed=s.seed,
    )


SYSU_COUNTS = MappingProxyType({
    "train ids": 395,
    "train visible images": 22258,
    "train infrared images": 11909,
    "test ids": 96,
    "query images": 3803,
})
# RegDB's "train ids" / "test ids" apply to every trial; "images per id in each list" to
# every id of each of the 40 trial lists.
REGDB_COUNTS = MappingProxyType({"train ids": 206, "test ids": 206, "images per id in each list": 10})
LLCM_COUNTS = MappingProxyType({"train ids": 713, "test ids": 351})

_REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    Dataset("synthetic", "synthetic (SYSU-MM01 layout)", _sysu_train, _sysu_test, generate=_make_synthetic),
    Dataset("sysu", "SYSU-MM01", _sysu_train, _sysu_test, published_counts=SYSU_COUNTS, inspect=_sysu_inspect),
    Dataset("regdb", "RegDB", _regdb_train, _regdb_test, published_counts=REGDB_COUNTS, per_trial=True,
            trials=range(1, 11), directions=("v2t", "t2v"), inspect=_regdb_inspect),
    Dataset("llcm", "LLCM", _llcm_train, _llcm_test, published_counts=LLCM_COUNTS, directions=("v2i", "i2v"),
            inspect=_llcm_inspect),
    Dataset("folder", "folder dataset", _folder_train, _folder_test, scorable=lambda cfg: cfg.data.ids_from_folders,
            directions=("i2v", "v2i"), inspect=_folder_inspect),
)}
DATASETS: Mapping[str, Dataset] = MappingProxyType(_REGISTRY)
"""Read-only view of the registry, name → :class:`Dataset` (registered ones included)."""


class _PublishedCounts(Mapping):
    """Read-only view name → published counts of every dataset ``bmil check-data`` knows."""

    def __getitem__(self, name: str) -> Mapping[str, int]:
        entry = _REGISTRY.get(name)
        if entry is None or not entry.checkable:
            raise KeyError(name)
        return entry.published_counts

    def __iter__(self):
        return iter(dataset_names(checkable=True))

    def __len__(self) -> int:
        return len(dataset_names(checkable=True))


PUBLISHED_COUNTS: Mapping[str, Mapping[str, int]] = _PublishedCounts()


def register_dataset(dataset: Dataset, *, replace: bool = False) -> Dataset:
    """Add ``dataset`` to the registry under ``dataset.name`` and return it; from then on
    ``data.dataset: <name>`` is valid in a configuration of this process.

    replace: allow a name that is already registered (a built-in one too) to be replaced;
    without it such a name is refused with a :class:`DatasetError`. Also refused: a name
    that is not a non-empty string, a per-trial dataset without ``trials``, and direction
    names other than ``v2i`` / ``i2v`` / ``v2t`` / ``t2v``.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"register_dataset expects a bmil.datasets.Dataset, got {type(dataset).__name__}.")
    name = dataset.name
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"a dataset's name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and not replace:
        raise DatasetError(
            f"dataset {name!r} is already registered ({_REGISTRY[name].title}): pass replace=True to replace it."
        )
    if dataset.per_trial and not dataset.trials:
        raise DatasetError(f"dataset {name!r} is trained per trial (per_trial=True) but names no trials.")
    unknown = [d for d in dataset.directions if d not in DIRECTION_ALIASES]
    if unknown:
        raise DatasetError(
            f"dataset {name!r} has direction(s) {', '.join(unknown)}: expected some of {', '.join(DIRECTION_ALIASES)}."
        )
    _REGISTRY[name] = dataset
    return dataset


def dataset_names(*, checkable: bool = False) -> tuple[str, ...]:
    """The registered names, in registration order (only those ``bmil check-data`` knows
    when ``checkable``)."""
    return tuple(d.name for d in _REGISTRY.values() if d.checkable or not checkable)


def get_dataset(name: str, *, checkable: bool = False) -> Dataset:
    """The entry called ``name``; DatasetError naming the known ones otherwise."""
    entry = _REGISTRY.get(name)
    if entry is None or (checkable and not entry.checkable):
        known = ", ".join(dataset_names(checkable=checkable))
        raise DatasetError(f"unknown dataset {name!r}: expected one of {known}.")
    return entry


# ---------------------------------------------------------------- bmil check-data


def _inspect(name: str, root: str | os.PathLike, per_id: int | None = None, ids_from_folders: bool | None = None):
    return get_dataset(name, checkable=True).inspect(root, per_id=per_id, ids_from_folders=ids_from_folders)


def dataset_counts(name: str, root: str | os.PathLike) -> dict[str, int]:
    """What ``root`` holds, e.g. {"train ids": 395, "train visible images": 22258, …}.

    Keys per dataset: sysu — train ids, train visible/infrared images, test ids, query
    images; regdb — "trial t train|test ids" and "trial t train|test visible|thermal
    images" for t = 1..10; llcm — train ids, train visible/infrared images, test ids, test
    visible/infrared images; folder — visible images, infrared images, cameras.
    """
    return _inspect(name, root).counts


def compare_counts(name: str, counts: Mapping[str, int], expected: Mapping[str, int] | None = None) -> list[str]:
    """"<dataset> <what>: found X, expected Y" for every count that differs from ``expected``.

    expected: defaults to PUBLISHED_COUNTS[name]. A count key "trial t <what>" is compared
    with the expected key "<what>" (RegDB's per-trial counts).
    """
    from bmil.data.check import count_differences

    expected = PUBLISHED_COUNTS.get(name, {}) if expected is None else expected
    return count_differences(counts, expected, get_dataset(name).title if name in PUBLISHED_COUNTS else name)


def check_report(
    name: str,
    root: str | os.PathLike,
    expected: Mapping[str, int] | None = None,
    verify_images: bool = True,
    workers: int = 8,
    ids_from_folders: bool | None = None,
):
    """Everything :func:`check_dataset` finds (a ``bmil.data.check.CheckReport``), with the
    counts, notes and warnings.

    ids_from_folders: for ``folder`` — True reads person-id folders, False does not, None
    (default) decides from the layout (``bmil.data.check.looks_labelled``).
    """
    from bmil.data.check import PER_ID_KEY, inspection_report

    expected = PUBLISHED_COUNTS.get(name, {}) if expected is None else expected
    found = _inspect(name, root, expected.get(PER_ID_KEY), ids_from_folders)
    title = get_dataset(name).title if name in PUBLISHED_COUNTS else name
    return inspection_report(found, expected, title, verify_images, workers)


def check_dataset(
    name: str,
    root: str | os.PathLike,
    expected: Mapping[str, int] | None = None,
    verify_images: bool = True,
    workers: int = 8,
) -> list[str]:
    """Every difference between ``root`` and the published layout; ``[]`` when all good.

    name: a checkable dataset (sysu | regdb | llcm | folder, or a registered one with an
    ``inspect``). expected: counts to hold the data to (default PUBLISHED_COUNTS[name]).
    verify_images: decode every image (slow on full data sets). One line per difference,
    ``"<what>: found X, expected Y"``, then one per problem the inspection found and one
    per image that cannot be decoded; a wrong root raises DatasetError.
    """
    return check_report(name, root, expected, verify_images, workers).problems


def _logged_direction(cfg) -> str:
    direction = eval_direction(cfg)
    if direction != cfg.eval.direction:
        log.info("eval.direction=%s is %s in %s's spelling", cfg.eval.direction, direction,
                 get_dataset(cfg.data.dataset).title)
    return direction


def eval_direction(cfg) -> str:
    """``cfg.eval.direction`` in the configured dataset's spelling ("both" stays "both").

    ConfigError when the dataset has directions but not this one; a dataset without
    directions (SYSU-MM01: infrared queries only) ignores the key and gets "both".
    """
    entry = get_dataset(cfg.data.dataset)
    direction = cfg.eval.direction
    if direction == BOTH or not entry.directions:
        return BOTH
    for name in (direction, DIRECTION_ALIASES.get(direction)):
        if name in entry.directions:
            return name
    known = ", ".join((BOTH, *entry.directions))
    raise ConfigError(f"configuration key 'eval.direction' must be one of {known} for {entry.title}, got {direction!r}")
