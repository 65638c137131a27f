"""Data: dataset readers returning plain records, image datasets, transforms, the sampler.

Readers: ``sysu_train/sysu_query/sysu_gallery``, ``regdb_train/regdb_test``,
``llcm_train/llcm_query/llcm_gallery``, ``folder_train/folder_test``; ``bmil.data.check``
inspects a root of each layout. Which reader, protocol and published counts belong to each
``data.dataset`` name is said by the registry, ``bmil.datasets`` (with ``check_dataset``).
"""

from bmil.data.folder import folder_test, folder_train
from bmil.data.images import IMAGE_EXTENSIONS, ImageDataset, TrainDataset, load_image
from bmil.data.llcm import llcm_gallery, llcm_query, llcm_train
from bmil.data.regdb import regdb_test, regdb_train
from bmil.data.sampler import PseudoIdentitySampler
from bmil.data.synthetic import make_synthetic
from bmil.data.sysu import sysu_gallery, sysu_query, sysu_train
from bmil.data.transforms import (
    ChannelAdaptiveGray,
    ChannelExchange,
    ChannelRandomErasing,
    RandomChannelOrGray,
    infrared_views,
    test_transform,
    train_transform,
    visible_views,
)
from bmil.records import (
    INFRARED,
    MODALITIES,
    MODALITY_INDEX,
    MODALITY_NAMES,
    OTHER_MODALITY,
    VISIBLE,
    Record,
    record_arrays,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "INFRARED",
    "MODALITIES",
    "MODALITY_INDEX",
    "MODALITY_NAMES",
    "OTHER_MODALITY",
    "VISIBLE",
    "ChannelAdaptiveGray",
    "ChannelExchange",
    "ChannelRandomErasing",
    "ImageDataset",
    "PseudoIdentitySampler",
    "RandomChannelOrGray",
    "Record",
    "TrainDataset",
    "folder_test",
    "folder_train",
    "infrared_views",
    "llcm_gallery",
    "llcm_query",
    "llcm_train",
    "load_image",
    "make_synthetic",
    "record_arrays",
    "regdb_test",
    "regdb_train",
    "sysu_gallery",
    "sysu_query",
    "sysu_train",
    "test_transform",
    "train_transform",
    "visible_views",
]

