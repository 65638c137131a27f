"""Test protocols of SYSU-MM01, RegDB, LLCM and a labelled user folder: query / gallery
sets, trials, mean scores.

A runner reads the test records of every trial it needs, calls ``extract`` ONCE on their
union (deduplicated by path) and scores each trial on rows of that one feature matrix, so
any model (or a cache of features) plugs in as ``extract(records) -> [N, d] array``.

Distance: cosine distance ``1 - q·g`` between L2-normalised features (the features are
re-normalised here, so the ranking equals that of the Euclidean distance on unit vectors).

``bmil.data`` is imported only inside the functions that need it: importing the package loads
torchvision (its transforms), and this module must stay usable on plain numpy features.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bmil.evaluation.metrics import evaluate

if TYPE_CHECKING:
    from bmil.records import Record

logger = logging.getLogger(__name__)

Extract = Callable[[list["Record"]], np.ndarray]

DEFAULT_FEATURE = "BN-neck, flip-averaged, L2-normalised"
DISTANCE = "cosine distance 1 - q.g on L2-normalised features"
RANKS = (1, 5, 10, 20)
SCORE_KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")

SYSU_SETTINGS = {"all": "all-search", "indoor": "indoor-search"}
REGDB_DIRECTIONS = {
    "v2t": ("visible", "thermal"),
    "t2v": ("thermal", "visible"),
}
LLCM_DIRECTIONS = {
    "v2i": ("visible", "infrared"),
    "i2v": ("infrared", "visible"),
}
FOLDER_DIRECTIONS = {
    "i2v": ("infrared", "visible"),
    "v2i": ("visible", "infrared"),
}


@dataclass
class ProtocolResult:
    """The scores of one test setting, with everything needed to read them correctly.

    num_gallery: gallery images of one trial (if trials differ, their rounded mean; the
    exact size of each trial is in ``per_trial``). per_trial: one dict per trial with
    ``trial``, ``rank1/5/10/20``, ``mAP``, ``mINP`` (fractions), ``num_valid_queries``,
    ``num_query``, ``num_gallery``. mean: the mean of the per-trial scores (fractions).
    """

    dataset: str
    setting: str
    protocol: str
    mode: str
    num_trials: int
    num_query: int
    num_gallery: int
    feature: str = DEFAULT_FEATURE
    per_trial: list[dict] = field(default_factory=list)
    mean: dict = field(default_factory=dict)
    distance: str = DISTANCE

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        return _plain(dataclasses.asdict(self))


def evaluate_sysu(
    extract: Extract,
    root: str,
    mode: str = "all",
    trials: int = 10,
    shots: int = 1,
    *,
    feature: str = DEFAULT_FEATURE,
    query_reader: Callable[..., list[Record]] | None = None,
    gallery_reader: Callable[..., list[Record]] | None = None,
) -> ProtocolResult:
    """SYSU-MM01 test: infrared queries (cameras 3, 6) against visible gallery trials.

    mode: "all" (gallery cameras 1, 2, 4, 5) or "indoor" (cameras 1, 2); trials: galleries
    0 … trials-1 as drawn by ``bmil.data.sysu_gallery``; shots: gallery images per (person,
    camera), 1 = single-shot. Scored with the ``"sysu"`` rule (camera-3 queries ignore the
    camera-2 gallery; Rank-k over distinct identities). The readers default to
    ``bmil.data.sysu_query`` / ``bmil.data.sysu_gallery``; pass others to test or adapt.
    """
    if mode not in SYSU_SETTINGS:
        raise ValueError(f"SYSU-MM01 mode must be one of {sorted(SYSU_SETTINGS)}, got {mode!r}.")
    _check_positive("trials", trials)
    _check_positive("shots", shots)
    if query_reader is None or gallery_reader is None:
        from bmil import data

        query_reader = query_reader or data.sysu_query
        gallery_reader = gallery_reader or data.sysu_gallery

    queries = query_reader(root)
    galleries = [gallery_reader(root, mode=mode, trial=t, shots=shots) for t in range(trials)]
    features = _FeatureTable(extract, [queries, *galleries])
    per_trial = [_score_trial(features, queries, gallery, "sysu", trial=t) for t, gallery in enumerate(galleries)]
    return _result(
        dataset="SYSU-MM01",
        setting=SYSU_SETTINGS[mode],
        protocol="sysu",
        mode="single-shot" if shots == 1 else f"multi-shot ({shots} images per person and camera)",
        per_trial=per_trial,
        feature=feature,
    )


def evaluate_regdb(
    extract: Extract,
    root: str,
    trial: int,
    direction: str = "both",
    *,
    feature: str = DEFAULT_FEATURE,
    test_reader: Callable[..., tuple[list[Record], list[Record]]] | None = None,
) -> list[ProtocolResult]:
    """RegDB test of one split ``trial`` (1 … 10): every test image, plain CMC.

    direction: "v2t" (visible queries, thermal gallery), "t2v" (the reverse) or "both"
    (v2t then t2v, one ``extract`` call for both). The reader defaults to
    ``bmil.data.regdb_test(root, trial) -> (visible, thermal)``.
    """
    directions = _directions(direction, REGDB_DIRECTIONS, "RegDB")
    if test_reader is None:
        from bmil import data

        test_reader = data.regdb_test
    visible, thermal = test_reader(root, trial)
    sets = {"visible": visible, "thermal": thermal}
    return _every_image_directions(
        extract, sets, [REGDB_DIRECTIONS[name] for name in directions], "RegDB", f"split {trial}", feature, trial
    )


def _every_image_directions(
    extract: Extract,
    sets: dict[str, list[Record]],
    directions: list[tuple[str, str]],
    dataset: str,
    which: str,
    feature: str,
    trial: int,
) -> list[ProtocolResult]:
    """One ``"regdb"``-rule result per (query set, gallery set) name pair of ``sets``,
    every image of one set against every image of the other; one ``extract`` call."""
    features = _FeatureTable(extract, list(sets.values()))
    results = []
    for query_name, gallery_name in directions:
        scores = _score_trial(features, sets[query_name], sets[gallery_name], "regdb", trial)
        results.append(
            _result(
                dataset=dataset,
                setting=f"{query_name}→{gallery_name}",
                protocol="regdb",
                mode=f"{query_name} queries → {gallery_name} gallery, {which}",
                per_trial=[scores],
                feature=feature,
            )
        )
    return results


def evaluate_llcm(
    extract: Extract,
    root: str,
    direction: str = "both",
    trials: int = 10,
    *,
    feature: str = DEFAULT_FEATURE,
    query_reader: Callable[..., list[Record]] | None = None,
    gallery_reader: Callable[..., list[Record]] | None = None,
) -> list[ProtocolResult]:
    """LLCM test: "v2i" (visible queries, infrared galleries), "i2v" or "both".

    Galleries 0 … trials-1 come from ``bmil.data.llcm_gallery(root, modality, trial)``,
    queries from ``bmil.data.llcm_query(root, modality)``. Scored with the ``"llcm"`` rule of
    the LLCM authors' release (gallery images of the query's identity and camera removed —
    LLCM cameras record both modalities — and Rank-k over distinct identities).
    """
    from bmil.records import MODALITY_INDEX

    directions = _directions(direction, LLCM_DIRECTIONS, "LLCM")
    _check_positive("trials", trials)
    if query_reader is None or gallery_reader is None:
        from bmil import data

        query_reader = query_reader or data.llcm_query
        gallery_reader = gallery_reader or data.llcm_gallery

    plans = {}
    for name in directions:
        query_mod, gallery_mod = (MODALITY_INDEX[m] for m in LLCM_DIRECTIONS[name])
        galleries = [gallery_reader(root, gallery_mod, trial=t) for t in range(trials)]
        plans[name] = (query_reader(root, query_mod), galleries)
    features = _FeatureTable(extract, [s for queries, galleries in plans.values() for s in (queries, *galleries)])
    results = []
    for name, (queries, galleries) in plans.items():
        q_name, g_name = LLCM_DIRECTIONS[name]
        per_trial = [_score_trial(features, queries, gallery, "llcm", trial=t) for t, gallery in enumerate(galleries)]
        results.append(
            _result(
                dataset="LLCM",
                setting=f"{q_name}→{g_name}",
                protocol="llcm",
                mode=f"{q_name} queries → {g_name} gallery",
                per_trial=per_trial,
                feature=feature,
            )
        )
    return results


def evaluate_folder(
    extract: Extract,
    root: str,
    direction: str = "both",
    *,
    feature: str = DEFAULT_FEATURE,
    test_reader: Callable[..., list[Record]] | None = None,
) -> list[ProtocolResult]:
    """A labelled user folder (``ROOT/{visible,infrared}/<camera>/<person id>/``): every
    test image of one modality as a query against every test image of the other as the
    gallery, plain CMC / mAP / mINP (the ``"regdb"`` rule: nothing removed), one trial.

    direction: "i2v" (infrared queries, visible gallery), "v2i" or "both" (i2v then v2i,
    one ``extract`` call). The reader defaults to ``bmil.data.folder_test(root)`` (the
    test split of ``ROOT/test.txt`` / ``ROOT/train.txt``, every labelled image without them).
    """
    from bmil.records import MODALITIES, MODALITY_NAMES

    directions = _directions(direction, FOLDER_DIRECTIONS, "folder")
    if test_reader is None:
        from bmil import data

        test_reader = data.folder_test
    records = test_reader(root)
    sets = {MODALITY_NAMES[m]: [r for r in records if r.modality == m] for m in MODALITIES}
    return _every_image_directions(
        extract, sets, [FOLDER_DIRECTIONS[name] for name in directions], "folder", "every labelled test image",
        feature, trial=0,
    )


def evaluate_cross_modality(
    features: np.ndarray,
    pids: np.ndarray,
    camids: np.ndarray,
    modality: np.ndarray,
) -> dict:
    """Quick score of a labelled feature set: infrared queries vs all visible images.

    features: [N, d] (re-normalised here); pids, camids, modality: [N] (0 visible,
    1 infrared). Plain CMC (``"regdb"`` rule, nothing removed — camids are not used),
    cosine distance. Returns ``rank1/5/10/20``, ``mAP``, ``mINP`` (fractions),
    ``num_valid_queries``, ``num_query``, ``num_gallery``.
    """
    from bmil.records import INFRARED, VISIBLE

    feats = _unit_rows(np.asarray(features, dtype=np.float32))
    pids = np.asarray(pids).reshape(-1)
    modality = np.asarray(modality).reshape(-1)
    if not (feats.shape[0] == pids.size == modality.size == np.asarray(camids).size):
        raise ValueError(
            f"features has {feats.shape[0]} rows but pids / camids / modality have "
            f"{pids.size} / {np.asarray(camids).size} / {modality.size} entries."
        )
    is_query = modality == INFRARED
    is_gallery = modality == VISIBLE
    if not is_query.any() or not is_gallery.any():
        raise ValueError(
            "Cross-modality evaluation needs both infrared (query) and visible (gallery) "
            f"images, got {int(is_query.sum())} infrared and {int(is_gallery.sum())} visible."
        )
    distmat = _cosine_distance(feats[is_query], feats[is_gallery])
    metrics = evaluate(distmat, pids[is_query], pids[is_gallery], protocol="regdb")
    return {
        **_scores(metrics),
        "num_query": int(is_query.sum()),
        "num_gallery": int(is_gallery.sum()),
    }


class _FeatureTable:
    """Features of the union of several record lists, extracted in one call."""

    def __init__(self, extract: Extract, record_sets: Sequence[Sequence[Record]]):
        unique: dict[str, Record] = {}
        for records in record_sets:
            for record in records:
                unique.setdefault(record.path, record)
        self.row_of = {path: row for row, path in enumerate(unique)}
        records = list(unique.values())
        logger.info("extracting features of %d test images", len(records))
        feats = np.asarray(extract(records), dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != len(records):
            raise ValueError(
                f"extract returned an array of shape {feats.shape} for {len(records)} "
                "records; expected [num_records, feature_dim]."
            )
        self.features = _unit_rows(feats)

    def of(self, records: Sequence[Record]) -> np.ndarray:
        rows = np.fromiter((self.row_of[r.path] for r in records), np.int64, len(records))
        return self.features[rows]


def _score_trial(
    features: _FeatureTable,
    queries: Sequence[Record],
    gallery: Sequence[Record],
    protocol: str,
    trial: int,
) -> dict:
    from bmil.records import record_arrays

    q_pids, q_camids, _ = record_arrays(queries)
    g_pids, g_camids, _ = record_arrays(gallery)
    distmat = _cosine_distance(features.of(queries), features.of(gallery))
    metrics = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, protocol=protocol)
    return {
        "trial": int(trial),
        **_scores(metrics),
        "num_query": len(queries),
        "num_gallery": len(gallery),
    }


def _scores(metrics: dict) -> dict:
    cmc = metrics["cmc"]
    return {
        **{f"rank{k}": float(cmc[k - 1]) for k in RANKS},
        "mAP": float(metrics["mAP"]),
        "mINP": float(metrics["mINP"]),
        "num_valid_queries": int(metrics["num_valid_queries"]),
    }


def _result(*, dataset, setting, protocol, mode, per_trial, feature) -> ProtocolResult:
    gallery_sizes = [t["num_gallery"] for t in per_trial]
    return ProtocolResult(
        dataset=dataset,
        setting=setting,
        protocol=protocol,
        mode=mode,
        num_trials=len(per_trial),
        num_query=int(per_trial[0]["num_query"]),
        num_gallery=int(round(float(np.mean(gallery_sizes)))),
        feature=feature,
        per_trial=per_trial,
        mean={key: float(np.mean([t[key] for t in per_trial])) for key in SCORE_KEYS},
    )


def _cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """[Q, G] float32 ``1 - q·g`` of unit-norm rows."""
    return 1.0 - query @ gallery.T


def _unit_rows(feats: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, np.finfo(np.float32).tiny)


def _directions(direction: str, known: dict, dataset: str) -> list[str]:
    if direction == "both":
        return list(known)
    if direction not in known:
        raise ValueError(f"{dataset} direction must be one of {[*known, 'both']}, got {direction!r}.")
    return [direction]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _plain(value):
    """Numpy scalars / arrays inside nested containers -> Python numbers / lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
