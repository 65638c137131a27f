"""Test protocols of SYSU-MM01, RegDB, LLCM and a labelled user folder: query / gallery
sets, trials, mean scores.

A runner takes the test records of every trial as arguments (the dataset readers of
``bmil.data`` make them; ``bmil.datasets`` composes reader and runner for each
``data.dataset``), calls ``extract`` ONCE on their union (deduplicated by path) and scores
each trial on rows of that one feature matrix, so any model (or a cache of features) plugs
in as ``extract(records) -> [N, d] array``.

Distance: cosine distance ``1 - q·g`` between L2-normalised features (the features are
re-normalised here, so the ranking equals that of the Euclidean distance on unit vectors).

Nothing here reads a dataset or imports ``bmil.data``: this module stays usable on plain
numpy features and records (``bmil.records``) from anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bmil.evaluation.metrics import evaluate
from bmil.records import INFRARED, MODALITIES, MODALITY_INDEX, MODALITY_NAMES, VISIBLE, Record, record_arrays

logger = logging.getLogger(__name__)

Extract = Callable[[list[Record]], np.ndarray]

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
    *,
    query: Sequence[Record],
    galleries: Sequence[Sequence[Record]],
    mode: str = "all",
    shots: int = 1,
    feature: str = DEFAULT_FEATURE,
) -> ProtocolResult:
    """SYSU-MM01 test: the infrared ``query`` records (cameras 3, 6) against each visible
    gallery of ``galleries`` (one record list per trial), one ``extract`` call in all.

    With the dataset's readers (``bmil.data``): ``query=sysu_query(root)``,
    ``galleries=[sysu_gallery(root, mode=mode, trial=t, shots=shots) for t in range(10)]``.
    mode ("all": gallery cameras 1, 2, 4, 5; "indoor": 1, 2) and shots (gallery images per
    person and camera, 1 = single-shot) say how the galleries were drawn; they name the
    result. Scored with the ``"sysu"`` rule (camera-3 queries ignore the camera-2 gallery;
    Rank-k over distinct identities).
    """
    if mode not in SYSU_SETTINGS:
        raise ValueError(f"SYSU-MM01 mode must be one of {sorted(SYSU_SETTINGS)}, got {mode!r}.")
    _check_positive("trials (len(galleries))", len(galleries))
    _check_positive("shots", shots)
    features = _FeatureTable(extract, [query, *galleries])
    per_trial = [_score_trial(features, query, gallery, "sysu", trial=t) for t, gallery in enumerate(galleries)]
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
    *,
    visible: Sequence[Record],
    thermal: Sequence[Record],
    trial: int,
    direction: str = "both",
    feature: str = DEFAULT_FEATURE,
) -> list[ProtocolResult]:
    """RegDB test of one split ``trial`` (1 … 10): every test image, plain CMC.

    visible, thermal: the split's test records, ``regdb_test(root, trial)`` (``bmil.data``).
    direction: "v2t" (visible queries, thermal gallery), "t2v" (the reverse) or "both"
    (v2t then t2v, one ``extract`` call for both).
    """
    directions = _directions(direction, REGDB_DIRECTIONS, "RegDB")
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
    *,
    queries: Mapping[int, Sequence[Record]],
    galleries: Mapping[int, Sequence[Sequence[Record]]],
    direction: str = "both",
    feature: str = DEFAULT_FEATURE,
) -> list[ProtocolResult]:
    """LLCM test: "v2i" (visible queries, infrared galleries), "i2v" or "both" (v2i then i2v).

    queries: modality (``VISIBLE`` / ``INFRARED``) → that modality's query records,
    ``llcm_query(root, modality)``; galleries: modality → one gallery per trial,
    ``[llcm_gallery(root, modality, trial=t) for t in range(10)]`` (``bmil.data``). Only the
    modalities the directions use are needed. Scored with the ``"llcm"`` rule of the LLCM
    authors' release (gallery images of the query's identity and camera removed — LLCM
    cameras record both modalities — and Rank-k over distinct identities).
    """
    directions = _directions(direction, LLCM_DIRECTIONS, "LLCM")
    plans = {}
    for name in directions:
        query_mod, gallery_mod = (MODALITY_INDEX[m] for m in LLCM_DIRECTIONS[name])
        for given, mod, what in ((queries, query_mod, "queries"), (galleries, gallery_mod, "galleries")):
            if mod not in given:
                raise ValueError(f"LLCM direction {name} needs {MODALITY_NAMES[mod]} {what}, got none.")
        _check_positive(f"trials (len(galleries[{MODALITY_NAMES[gallery_mod]}]))", len(galleries[gallery_mod]))
        plans[name] = (queries[query_mod], galleries[gallery_mod])
    features = _FeatureTable(extract, [s for query, trials in plans.values() for s in (query, *trials)])
    results = []
    for name, (query, trials) in plans.items():
        q_name, g_name = LLCM_DIRECTIONS[name]
        per_trial = [_score_trial(features, query, gallery, "llcm", trial=t) for t, gallery in enumerate(trials)]
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
    records: Sequence[Record],
    direction: str = "both",
    *,
    feature: str = DEFAULT_FEATURE,
) -> list[ProtocolResult]:
    """A labelled user folder: every test record of one modality as a query against every
    test record of the other as the gallery, plain CMC / mAP / mINP (the ``"regdb"`` rule:
    nothing removed), one trial.

    records: the labelled test records of both modalities, ``folder_test(root)``
    (``bmil.data``: ``ROOT/{visible,infrared}/<camera>/<person id>/``, the test split of
    ``ROOT/test.txt`` / ``ROOT/train.txt``, every labelled image without them).
    direction: "i2v" (infrared queries, visible gallery), "v2i" or "both" (i2v then v2i,
    one ``extract`` call).
    """
    directions = _directions(direction, FOLDER_DIRECTIONS, "folder")
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
