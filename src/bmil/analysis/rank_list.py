"""The ``bmil search`` figure: a query image and its ranked gallery matches in one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bmil.data.images import load_image

# Rank-list layout, in pixels.
CELL_HEIGHT, CELL_WIDTH = 128, 64
BORDER = 4
GAP = 6
CAPTION = 30  # two text lines below each cell
LINE = 13
COLOURS = {"query": (40, 90, 200), "match": (0, 170, 0), "wrong": (220, 0, 0), "unknown": (150, 150, 150)}


def rank_list_size(matches: int) -> tuple[int, int]:
    """(width, height) in pixels of a rank list with the query and ``matches`` images:
    cells of CELL_WIDTH×CELL_HEIGHT framed by BORDER on each side, GAP between cells,
    CAPTION below for two lines of text."""
    cells = matches + 1
    width = cells * (CELL_WIDTH + 2 * BORDER) + (cells - 1) * GAP
    return width, CELL_HEIGHT + 2 * BORDER + CAPTION


def draw_rank_list(
    query_path: str,
    match_paths: list[str],
    scores: np.ndarray,
    correct: list[bool | None] | None = None,
    out: str | Path = "rank_list.png",
    *,
    query_id: str | None = None,
    match_ids: list[str] | None = None,
) -> Path:
    """Draw the query (blue frame), then the matches; a match's frame is green when
    ``correct[i]`` is True, red when False, grey when unknown (None or no ``correct``).

    Captions: under the query ``query`` and ``id <query_id>`` (when given); under match i
    ``#<rank> <score>`` and ``id <match_ids[i]>`` (when given). Returns the PNG path;
    size: :func:`rank_list_size`."""
    width, height = rank_list_size(len(match_paths))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    flags = correct if correct is not None else [None] * len(match_paths)
    ids = match_ids if match_ids is not None else [None] * len(match_paths)
    entries = [(query_path, ("query", _id_line(query_id)), COLOURS["query"])]
    for rank, (path, score, flag, pid) in enumerate(zip(match_paths, scores, flags, ids, strict=True), 1):
        colour = COLOURS["unknown"] if flag is None else COLOURS["match"] if flag else COLOURS["wrong"]
        entries.append((path, (f"#{rank} {float(score):.3f}", _id_line(pid)), colour))
    for slot, (path, caption, colour) in enumerate(entries):
        x0 = slot * (CELL_WIDTH + 2 * BORDER + GAP)
        draw.rectangle([x0, 0, x0 + CELL_WIDTH + 2 * BORDER - 1, CELL_HEIGHT + 2 * BORDER - 1], fill=colour)
        image = load_image(path).resize((CELL_WIDTH, CELL_HEIGHT), Image.BILINEAR)
        canvas.paste(image, (x0 + BORDER, BORDER))
        for line_no, text in enumerate(caption):
            draw.text((x0 + BORDER, CELL_HEIGHT + 2 * BORDER + 2 + line_no * LINE), text, fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _id_line(pid: str | None) -> str:
    """``id <pid>`` cut to the cell's width (about 10 characters), empty when unknown."""
    if pid is None:
        return ""
    text = f"id {pid}"
    return text if len(text) <= 10 else text[:8] + ".."
