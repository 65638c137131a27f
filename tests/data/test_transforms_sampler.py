"""Transforms, image datasets and the pseudo-identity sampler."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bmil.data import (
    INFRARED,
    VISIBLE,
    ChannelExchange,
    ChannelRandomErasing,
    ImageDataset,
    PseudoIdentitySampler,
    RandomChannelOrGray,
    Record,
    TrainDataset,
    infrared_views,
    load_image,
    train_transform,
    visible_views,
)
from bmil.data import transforms as bmil_transforms
from bmil.errors import DatasetError
from helpers import imagenet_normalised

H, W = 16, 8


def colourful_image(height=20, width=10, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("augmentation", ["release", "legacy"])
@pytest.mark.parametrize("view", ["standard", "channel", "infrared", "infrared_stage2"])
def test_train_transform_output_shape(view, augmentation):
    torch.manual_seed(0)
    out = train_transform(H, W, view, augmentation=augmentation)(colourful_image())
    assert out.shape == (3, H, W) and out.dtype == torch.float32


def test_test_transform_resizes_and_normalises():
    image = Image.new("RGB", (7, 30), (255, 128, 0))
    out = bmil_transforms.test_transform(H, W)(image)
    assert out.shape == (3, H, W)
    expected = imagenet_normalised([255, 128, 0])
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out.std(dim=(1, 2)).numpy(), 0, atol=1e-5)


def test_view_lists():
    assert len(visible_views(H, W)) == 2
    assert len(visible_views(H, W, channel_aug=False)) == 1
    assert len(infrared_views(H, W)) == 1
    with pytest.raises(ValueError, match="view must be one of"):
        train_transform(H, W, "thermal")


@pytest.mark.parametrize(("with_gray", "outcomes"), [(True, {0, 1, 2, 3}), (False, {0, 1, 2})])
def test_channel_exchange_replicates_one_channel_or_grayscale_on_pil(with_gray, outcomes):
    image = colourful_image()
    rgb = np.asarray(image).astype(int)
    candidates = [rgb[..., 0], rgb[..., 1], rgb[..., 2], np.asarray(image.convert("L")).astype(int)]
    torch.manual_seed(1)
    seen = set()
    for _ in range(60):
        out = np.asarray(ChannelExchange(with_gray=with_gray)(image)).astype(int)
        assert out.shape == rgb.shape
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
        matches = [i for i, c in enumerate(candidates) if np.array_equal(out[..., 0], c)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == outcomes


def test_channel_exchange_on_tensor_uses_itu_gray_weights():
    tensor = torch.rand(3, 5, 4)
    gray = 0.2989 * tensor[0] + 0.5870 * tensor[1] + 0.1140 * tensor[2]
    torch.manual_seed(2)
    seen = set()
    for _ in range(60):
        out = ChannelExchange(with_gray=True)(tensor)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        choices = [tensor[0], tensor[1], tensor[2], gray]
        seen.update(i for i, c in enumerate(choices) if torch.allclose(out[0], c, atol=1e-6))
    assert seen == {0, 1, 2, 3}


def test_random_channel_or_gray_probability_extremes():
    image = colourful_image()
    assert RandomChannelOrGray(p=0.0)(image) is image
    torch.manual_seed(3)
    out = np.asarray(RandomChannelOrGray(p=1.0)(image))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    changed = sum(RandomChannelOrGray(p=0.5)(image) is not image for _ in range(200))
    assert 60 < changed < 140


def test_channel_random_erasing_fills_one_rectangle_per_channel():
    torch.manual_seed(4)
    image = torch.full((3, 32, 16), 7.0)
    out = ChannelRandomErasing(p=1.0)(image)
    assert torch.equal(image, torch.full((3, 32, 16), 7.0))  # input untouched
    for channel, fill in enumerate((0.4914, 0.4822, 0.4465)):
        erased = torch.isclose(out[channel], torch.tensor(fill))
        rows, cols = torch.nonzero(erased, as_tuple=True)
        assert len(rows) > 0
        box = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert bool(box.all())  # a full rectangle
        assert bool((out[channel][~erased] == 7.0).all())
    assert torch.equal(ChannelRandomErasing(p=0.0)(image), image)
    random_fill = ChannelRandomErasing(p=1.0, fill="random")(image)
    assert bool((random_fill != 7.0).any())


# ---------------------------------------------------------------- datasets


def test_datasets_return_views_and_indices(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        colourful_image(seed=i).save(paths[-1])
    records = [Record(paths[0], 0, 1, VISIBLE), Record(paths[1], 0, 3, INFRARED), Record(paths[2], 1, 2, VISIBLE)]
    dataset = ImageDataset(records, bmil_transforms.test_transform(H, W))
    tensor, index = dataset[2]
    assert tensor.shape == (3, H, W) and index == 2
    train = TrainDataset(records, {VISIBLE: visible_views(H, W), INFRARED: infrared_views(H, W)})
    views, index = train[0]
    assert views.shape == (2, 3, H, W) and index == 0
    views, index = train[1]
    assert views.shape == (1, 3, H, W) and index == 1
    with pytest.raises(ValueError, match="no transforms"):
        TrainDataset(records, {VISIBLE: visible_views(H, W)})


def test_cache_decodes_each_image_once(tmp_path):
    path = str(tmp_path / "a.png")
    colourful_image().save(path)
    dataset = ImageDataset([Record(path, 0, 1, VISIBLE)], cache=True)
    first, _ = dataset[0]
    os.remove(path)
    again, _ = dataset[0]
    assert torch.equal(first, again)
    with pytest.raises(DatasetError):
        ImageDataset([Record(path, 0, 1, VISIBLE)])[0]


def test_unreadable_images_are_named(tmp_path):
    corrupt = str(tmp_path / "broken.jpg")
    with open(corrupt, "wb") as handle:
        handle.write(b"this is no jpeg")
    with pytest.raises(DatasetError) as error:
        ImageDataset([Record(corrupt, 0, 1, VISIBLE)])[0]
    assert str(error.value) == f"cannot read image {corrupt}: not a recognised image format"
    truncated = str(tmp_path / "cut.jpg")
    colourful_image(64, 32).save(truncated, format="JPEG")
    with open(truncated, "rb") as handle:
        data = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"^cannot read image {truncated}: image file is truncated"):
        load_image(truncated)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(DatasetError) as error:
        TrainDataset([Record(missing, 0, 1, INFRARED)], {INFRARED: infrared_views(H, W)})[0]
    assert str(error.value) == f"cannot read image {missing}: no such file or directory"


# ---------------------------------------------------------------- sampler

# cluster sizes: 0 -> 20, 1 -> 3, 2 -> 16, 3 -> 5, 4 -> 9, 5 -> 1; plus 7 outliers
SIZES = {0: 20, 1: 3, 2: 16, 3: 5, 4: 9, 5: 1}


def make_labels(seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in SIZES.items()] + [np.full(7, -1)])
    return np.random.default_rng(seed).permutation(labels)


def batches(sampler, num_ids, num_instances):
    flat = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(flat) == len(sampler)
    return flat.reshape(-1, num_ids, num_instances)


def test_sampler_batches_hold_distinct_identities_with_k_instances():
    labels = make_labels()
    sampler = PseudoIdentitySampler(labels, num_ids=4, num_instances=8, iterations=30, seed=0)
    assert len(sampler) == 30 * 4 * 8
    seen_clusters = set()
    for batch in batches(sampler, 4, 8):
        cluster_of_chunk = []
        for chunk in batch:
            chunk_labels = labels[chunk]
            assert (chunk_labels >= 0).all()  # never an outlier
            assert len(set(chunk_labels.tolist())) == 1  # one identity per chunk of K
            cluster = int(chunk_labels[0])
            cluster_of_chunk.append(cluster)
            unique = np.unique(chunk)
            if SIZES[cluster] >= 8:
                assert len(unique) == 8  # without replacement when big enough
            else:
                # small cluster: every member, repeats only to fill
                assert set(unique.tolist()) == set(np.flatnonzero(labels == cluster).tolist())
        assert len(set(cluster_of_chunk)) == 4
        seen_clusters.update(cluster_of_chunk)
    assert seen_clusters == set(SIZES)


def test_sampler_is_deterministic_per_seed_and_epoch():
    labels = make_labels()

    def order(seed, epoch):
        sampler = PseudoIdentitySampler(labels, num_ids=3, num_instances=4, iterations=10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 3) == order(0, 3)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)
    state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state()
    order(5, 2)
    assert np.array_equal(np.random.get_state()[1], state)  # no global RNG touched
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_sampler_with_fewer_clusters_than_ids_repeats_and_warns_once(caplog):
    labels = np.array([0, 0, 0, 1, 1, -1, -1])
    with caplog.at_level(logging.WARNING, logger="bmil.data.sampler"):
        sampler = PseudoIdentitySampler(labels, num_ids=5, num_instances=2, iterations=4)
        for batch in batches(sampler, 5, 2):
            clusters = [int(labels[chunk[0]]) for chunk in batch]
            assert set(clusters) == {0, 1}
            assert all((labels[chunk] == c).all() for chunk, c in zip(batch, clusters, strict=True))
        list(sampler)
    assert len([r for r in caplog.records if "repeat" in r.getMessage()]) == 1


def test_sampler_without_clusters_raises():
    with pytest.raises(ValueError, match="no cluster"):
        PseudoIdentitySampler(np.full(5, -1))
    with pytest.raises(ValueError, match="no cluster"):
        PseudoIdentitySampler([])
