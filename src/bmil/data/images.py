"""Image files: listing, decoding, and the torch Datasets that feed the loaders.

Datasets return the record's *index* next to the image so that the training loop can look
up the pseudo label the clustering step assigned to that record this epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from bmil.data.resized_cache import ResizedCache
from bmil.data.transforms import TrainView
from bmil.errors import DatasetError
from bmil.records import Record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

Transform = Callable[[Image.Image], torch.Tensor]


def is_image_name(name: str) -> bool:
    """True for a visible (not dot-prefixed) file name with an image extension, any case."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_image_names(folder: str) -> list[str]:
    """Sorted image file names directly inside ``folder``; ``[]`` when it does not exist."""
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if is_image_name(e.name) and e.is_file())


def _failure_reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


# PIL raises all three for missing, truncated or malformed files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def load_image(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image.

    Raises DatasetError("cannot read image <path>: <reason>") for a missing, truncated or
    otherwise undecodable file.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes the whole file
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot read image {path}: {_failure_reason(error)}") from error


def image_error(path: str) -> str | None:
    """Why ``path`` cannot be decoded (e.g. "no such file or directory"), or None when it can."""
    try:
        with Image.open(path) as image:
            image.load()
    except _DECODE_ERRORS as error:
        return _failure_reason(error)
    return None


class _ImageSource:
    """Decoded images of ``records``, optionally kept in memory after the first read.

    With DataLoader workers each worker process fills its own copy of the cache, so the
    cache pays off from the second epoch on (or with ``num_workers=0``).
    """

    def __init__(self, records: Sequence[Record], cache: bool) -> None:
        self.records = list(records)
        self.cache = cache
        self._decoded: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> Image.Image:
        if not self.cache:
            return load_image(self.records[index].path)
        if index not in self._decoded:
            self._decoded[index] = load_image(self.records[index].path)
        # Transforms must not modify the PIL image in place (torchvision's do not).
        return self._decoded[index]


class ImageDataset(Dataset):
    """``(image tensor [3, H, W], index)`` for every record, for feature extraction.

    transform: PIL image -> tensor; None gives the unnormalised [0, 1] tensor.
    cache: keep decoded images in memory (small data sets, e.g. the demo).
    tensors: path -> the transformed tensor, read before decoding and filled after; share
        one dict between datasets only when their transforms are the same deterministic one
        (e.g. the clustering features' resize, epoch after epoch). Each DataLoader worker
        fills its own copy, so it pays only with ``num_workers=0``.
    """

    def __init__(
        self, records: Sequence[Record], transform: Transform | None = None, cache: bool = False,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._source = _ImageSource(records, cache)
        self.records = self._source.records
        self.transform = transform
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.records[index].path
        if self.tensors is not None and path in self.tensors:
            return self.tensors[path], index
        image = self._source.image(index)
        tensor = self.transform(image) if self.transform is not None else TF.to_tensor(image)
        if self.tensors is not None:
            self.tensors[path] = tensor
        return tensor, index


class TrainDataset(Dataset):
    """``(views [V, 3, H, W], index)``: V augmented views of one training image.

    transforms_by_modality: {modality: [transform, ...]}; V is the length of the list for the
    record's modality (by default 2 for visible: standard + channel view, 1 for infrared).
    All transforms of one modality must produce tensors of the same shape.
    When every view of the record's modality is a :class:`~bmil.data.transforms.TrainView`
    of one size, the image is resized once for all of them, and ``resized`` (a
    :class:`~bmil.data.resized_cache.ResizedCache` with one slot per record) keeps the
    resized pixels for later reads and epochs; both give the same tensors as running each
    view on the decoded image.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transforms_by_modality: Mapping[int, Sequence[Transform]],
        cache: bool = False,
        resized: ResizedCache | None = None,
    ) -> None:
        self._source = _ImageSource(records, cache)
        self.records = self._source.records
        if resized is not None and len(resized) != len(self.records):
            raise ValueError(f"TrainDataset got a resized-image cache of {len(resized)} slots "
                             f"for {len(self.records)} records; they must match.")
        self.resized = resized
        self.set_transforms(transforms_by_modality)

    def set_transforms(self, transforms_by_modality: Mapping[int, Sequence[Transform]]) -> None:
        """Replace the views (e.g. stage 2's infrared view without jitter), keeping the image
        cache. Loaders created afterwards use them (workers receive a copy of the dataset)."""
        transforms = {m: list(ts) for m, ts in transforms_by_modality.items()}
        needed = {r.modality for r in self.records}
        lacking = sorted(m for m in needed if not transforms.get(m))
        if lacking:
            raise ValueError(f"TrainDataset has records of modality {lacking} but no transforms for it.")
        self.transforms_by_modality = transforms

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        transforms = self.transforms_by_modality[self.records[index].modality]
        if not _one_resize(transforms):
            image = self._source.image(index)
            return torch.stack([transform(image) for transform in transforms]), index
        first = transforms[0]
        if self.resized is not None and self.resized.shape[1:3] == (first.height, first.width):
            pixels = self.resized.get(index, lambda: first.resize(self._source.image(index)))
        else:
            pixels = first.resize(self._source.image(index))
        return torch.stack([transform.from_resized(pixels) for transform in transforms]), index


def _one_resize(transforms: Sequence[Transform]) -> bool:
    """True when every transform is a TrainView resizing to the same size."""
    sizes = {(t.height, t.width) if isinstance(t, TrainView) else None for t in transforms}
    return len(sizes) == 1 and None not in sizes
