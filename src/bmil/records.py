"""Plain image records: the one currency between readers, loaders and protocols.

The modality vocabulary lives here and nowhere else: the two constants ``VISIBLE`` /
``INFRARED`` (the integers the model's stream switch, the records and every modality
array use), ``MODALITIES`` (both, visible first), ``MODALITY_NAMES`` (index → name) and
``MODALITY_INDEX`` (name → index; RegDB's "thermal" is the infrared modality) and
``OTHER_MODALITY`` (the cross-modality counterpart of each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VISIBLE = 0
INFRARED = 1
MODALITIES = (VISIBLE, INFRARED)
MODALITY_NAMES = {VISIBLE: "visible", INFRARED: "infrared"}
MODALITY_INDEX = {"visible": VISIBLE, "infrared": INFRARED, "thermal": INFRARED}
OTHER_MODALITY = {VISIBLE: INFRARED, INFRARED: VISIBLE}


@dataclass(frozen=True)
class Record:
    """One image.

    path: absolute or root-relative file path.
    pid: person id (dataset's own number), -1 when unknown.
    camid: camera id (dataset's own number, e.g. 1..6 for SYSU-MM01).
    modality: VISIBLE (0) or INFRARED (1).
    """

    path: str
    pid: int
    camid: int
    modality: int


def record_arrays(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pids, camids, modalities) of ``records`` as int64 arrays of shape [N]."""
    pids = np.fromiter((r.pid for r in records), dtype=np.int64, count=len(records))
    camids = np.fromiter((r.camid for r in records), dtype=np.int64, count=len(records))
    mods = np.fromiter((r.modality for r in records), dtype=np.int64, count=len(records))
    return pids, camids, mods
