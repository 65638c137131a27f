"""``bmil search``: rank a features file written by ``bmil extract``
(:mod:`bmil.commands.extract`, which also describes the file) for one query image, and draw
the rank list (:mod:`bmil.analysis.rank_list`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.commands.extract import UNKNOWN_ID, FeatureSet, load_features, parse_modality
from bmil.config import Config
from bmil.errors import ConfigError, DatasetError
from bmil.inference import feature_extractor, load_model, resolve_device
from bmil.records import MODALITY_NAMES, OTHER_MODALITY, Record

log = logging.getLogger(__name__)


def rank_gallery(query: np.ndarray, gallery: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` gallery rows most similar to ``query`` [D] by cosine similarity.

    gallery: [N, D]. Returns (indices [k] int64, similarities [k] float32), k = min(top, N),
    most similar first; equal similarities by lower index.
    """
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sims = (g @ q).astype(np.float32)
    order = np.lexsort((np.arange(len(sims)), -sims))[:top]
    return order.astype(np.int64), sims[order]


def embed_image(
    model: nn.Module, cfg: Config, path: str | Path, modality: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """The test feature [D] of one image (DatasetError when it cannot be read)."""
    if Path(path).is_dir():
        raise DatasetError(f"query {path} is a folder, not an image file: give one image with --query")
    if not Path(path).is_file():
        raise DatasetError(f"query image {path} not found")
    record = Record(str(path), -1, -1, modality)
    return feature_extractor(model, cfg, device, progress=False)([record])[0]


def query_modality(gallery: FeatureSet, name: str | None, source: str | Path) -> int:
    """The query's modality: ``name`` when given, else the other modality than the
    gallery's (cross-modality search); ConfigError for a mixed gallery without ``name``."""
    if name is not None:
        return parse_modality(name)
    present = np.unique(gallery.modality)
    if present.size != 1:
        raise ConfigError(f"gallery {source} mixes modalities: give the query's with --query-modality")
    return OTHER_MODALITY[int(present[0])]


def cross_modality_rows(gallery: FeatureSet, modality: int) -> np.ndarray:
    """Row indices of ``gallery`` to rank for a query of ``modality``: those of the other
    modality when the gallery holds both (a cross-modality search), else every row."""
    if np.unique(gallery.modality).size > 1:
        return np.flatnonzero(gallery.modality != modality)
    return np.arange(len(gallery.paths))


def match_flags(gallery: FeatureSet, order: np.ndarray, query_id: str | None) -> list[bool | None] | None:
    """Per ranked match: True same id as ``query_id``, False another id, None unknown id;
    None when the query's or the gallery's ids are not known at all."""
    if query_id is None or gallery.pids is None:
        return None
    pids = gallery.pids[order]
    return [None if pid == UNKNOWN_ID else bool(pid == str(query_id)) for pid in pids]


def run(args: argparse.Namespace) -> int:
    """Rank ``--gallery`` for ``--query``, print the ``--top`` matches and draw them to ``--out``."""
    from bmil.analysis.rank_list import draw_rank_list

    gallery = load_features(args.gallery)
    modality = query_modality(gallery, args.query_modality, args.gallery)
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    query = embed_image(model, cfg, args.query, modality, device)
    if query.shape[0] != gallery.features.shape[1]:
        raise DatasetError(f"gallery {args.gallery} holds {gallery.features.shape[1]}-d features, "
                           f"but this checkpoint gives {query.shape[0]}-d ones")
    rows = cross_modality_rows(gallery, modality)
    if len(rows) < len(gallery.paths):
        log.info("the gallery holds both modalities: ranking its %d %s images", len(rows),
                 MODALITY_NAMES[int(gallery.modality[rows[0]])] if len(rows) else "other-modality")
    picked, scores = rank_gallery(query, gallery.features[rows], args.top)
    order = rows[picked]
    flags = match_flags(gallery, order, args.query_id)
    ids = None if gallery.pids is None else [gallery.pids[i] or "?" for i in order]
    print(f"query {args.query} ({MODALITY_NAMES[modality]}"
          f"{f', id {args.query_id}' if args.query_id is not None else ''})")
    for rank, (i, score) in enumerate(zip(order, scores, strict=True)):
        pid = f"  id {ids[rank]}" if ids is not None else ""
        mark = {True: "  match", False: "  wrong", None: ""}[flags[rank]] if flags else ""
        print(f"{rank + 1:3d}  {score:.4f}{pid}  {gallery.paths[i]}{mark}")
    out = draw_rank_list(args.query, [gallery.paths[i] for i in order], scores, flags, args.out,
                         query_id=args.query_id, match_ids=ids)
    print(f"\nrank list written to {out}")
    return 0
