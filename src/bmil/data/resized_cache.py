"""Training images resized once, kept as uint8 in shared memory for every loader worker.

The release's training views resize an image (bicubic, to H × W) before any random step,
so the resized pixels of an image are the same every epoch. :class:`ResizedCache` holds
them as one uint8 tensor [N, H, W, 3] in shared memory (3·H·W bytes an image: 124 KiB at
288×144, 3.96 GiB for SYSU-MM01's 34,167 training images) plus a "filled" flag per image.
The first read of an image decodes and resizes it and writes its slot; every later read,
in any DataLoader worker (forked or spawned: torch passes shared tensors by handle) and in
any later epoch, starts from the slot. The views' random steps then run exactly as on a
fresh decode, so the tensors are the same for the same random draws.

Opt-in by size: :func:`resized_cache` returns a cache only when it fits the budget
(``data.resized_cache_gib``) and the free shared memory, and otherwise says why in one
sentence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch

SHARED_MEMORY = "/dev/shm"


def cache_bytes(count: int, height: int, width: int) -> int:
    """Bytes of the cache of ``count`` RGB images of ``height`` × ``width`` (flags included)."""
    return count * (3 * height * width + 1)


def _free_shared_bytes(folder: str = SHARED_MEMORY) -> int | None:
    """Free bytes of the shared-memory file system, None where there is none to ask."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory; its pages are taken as they are
    written (``share_memory_`` on an ordinary tensor would copy all of it first)."""
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
    except (AttributeError, RuntimeError):  # a torch without it: allocate, then share
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class ResizedCache:
    """uint8 pixels [count, height, width, 3] in shared memory, filled on first read."""

    def __init__(self, count: int, height: int, width: int) -> None:
        self.shape = (count, height, width, 3)
        self.pixels = _shared_uint8(self.shape)
        self.filled = torch.zeros(count, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, index: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The pixels [H, W, 3] of image ``index``; ``make()`` (uint8 [H, W, 3]) fills its slot
        the first time. Two workers filling one slot at once write the same bytes."""
        if not bool(self.filled[index]):
            self.pixels[index] = make()
            self.filled[index] = True
        return self.pixels[index]


def resized_cache(count: int, height: int, width: int, budget_gib: float) -> tuple[ResizedCache | None, str]:
    """(the cache, "") when ``count`` images of ``height`` × ``width`` fit in ``budget_gib``
    GiB and in the free shared memory; else (None, the reason in one sentence). A budget of
    0 turns the cache off (None, "")."""
    if budget_gib <= 0:
        return None, ""
    fits, reason = _fits(count, height, width, budget_gib)
    return (ResizedCache(count, height, width), "") if fits else (None, reason)


def _fits(count: int, height: int, width: int, budget_gib: float) -> tuple[bool, str]:
    need = cache_bytes(count, height, width)
    gib = math.ceil(need / 2**30 * 100) / 100
    if need > budget_gib * 2**30:
        return False, (f"data.resized_cache_gib={budget_gib:g} is below the {gib:.2f} GiB that {count:,} training "
                      f"images take at {height}×{width}: training without the resized-image cache "
                      f"(set it to at least {gib:.2f} to use it)")
    free = _free_shared_bytes()
    if free is not None and need > free:
        return False, (f"the resized-image cache needs {gib:.2f} GiB of shared memory ({SHARED_MEMORY}) but "
                      f"{free / 2**30:.2f} GiB are free: training without it (enlarge {SHARED_MEMORY}, e.g. "
                      f"docker run --shm-size, or set data.resized_cache_gib=0)")
    return True, ""


def resized_caches(
    counts: Mapping[int, int], height: int, width: int, budget_gib: float
) -> tuple[dict[int, ResizedCache], str]:
    """One cache per key of ``counts`` (e.g. per modality: its number of images) when all of
    them together fit (see :func:`resized_cache`); else ({}, the reason)."""
    if budget_gib <= 0:
        return {}, ""
    total = sum(counts.values())
    probe, reason = _fits(total, height, width, budget_gib)
    if not probe:
        return {}, reason
    return {key: ResizedCache(count, height, width) for key, count in counts.items()}, ""
