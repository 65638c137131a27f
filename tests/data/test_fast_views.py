"""The training views' fast path: TrainView (random steps on uint8/float tensors after one
resize), the resized-image cache shared by loader workers, and the tensor colour jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as F

from bmil.data import INFRARED, VISIBLE, Record, TrainDataset, infrared_views, train_transform, visible_views
from bmil.data.jitter import (
    TensorColorJitter,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
)
from bmil.data.resized_cache import ResizedCache, cache_bytes, resized_cache, resized_caches
from bmil.data.transforms import VIEWS, TrainView

H, W = 32, 16


def photo(seed: int, size: tuple[int, int] = (23, 57), gray: bool = False) -> Image.Image:
    """A smooth random RGB image (width, height) = ``size``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
    if gray:
        small[..., 1:] = small[..., :1]
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def hard_tensor(seed: int = 0) -> torch.Tensor:
    """Float [3, 40, 24] in [0, 1] with gray pixels, ties between channels, saturated pixels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 40, 24, generator=gen)
    x[:, :4] = 0.5                      # gray: no hue
    x[0, 4:8] = x[1, 4:8]               # R = G ties
    x[2, 8:12] = x[1, 8:12]             # G = B ties
    x[:, 12:16] = x[:, 12:16].sort(0).values
    x[:, 16:20] = x[:, 16:20].sort(0, descending=True).values
    x[0, 20:24], x[1, 20:24] = 1.0, 0.0  # saturated
    return x


# ------------------------------------------------------------------ TrainView
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("pad", [3, 0])
def test_train_view_equals_compose_of_its_steps(view, pad):
    """The fast path draws the same random numbers as running its listed steps with T.Compose
    (the pipeline before it), and gives the same tensor bit for bit."""
    fast = train_transform(H, W, view, pad=pad)
    assert isinstance(fast, TrainView)
    slow = T.Compose(fast.transforms)
    for seed in range(12):
        image = photo(seed, size=(10 + seed, 30 + 2 * seed), gray=view.startswith("infrared"))
        torch.manual_seed(seed)
        a, after_a = fast(image), torch.rand(4)
        torch.manual_seed(seed)
        b, after_b = slow(image), torch.rand(4)
        assert torch.equal(a, b), (view, pad, seed)
        assert torch.equal(after_a, after_b)  # the same number of draws


def test_train_view_rejects_pixels_of_another_size():
    with pytest.raises(ValueError, match="uint8 pixels of shape"):
        train_transform(H, W).from_resized(torch.zeros(H + 1, W, 3, dtype=torch.uint8))


# ------------------------------------------------------------------ the resized-image cache
def _records(tmp_path, count: int = 4) -> list[Record]:
    records = []
    for i in range(count):
        modality = VISIBLE if i % 2 == 0 else INFRARED
        path = tmp_path / f"{i}.png"
        photo(i, size=(12 + i, 40 + 3 * i), gray=modality == INFRARED).save(path)
        records.append(Record(str(path), i, 1 if modality == VISIBLE else 3, modality))
    return records


def _views(jitter: str = "pil") -> dict[int, list]:
    return {VISIBLE: visible_views(H, W, pad=2, jitter=jitter), INFRARED: infrared_views(H, W, pad=2, jitter=jitter)}


def test_cached_dataset_gives_the_uncached_tensors(tmp_path):
    """Same seed, same tensors: with the cache (filled, then read back after the files are
    gone), without it, and each view run on the decoded image as T.Compose of its steps."""
    records = _records(tmp_path)
    views = _views()
    cache = ResizedCache(len(records), H, W)
    cached, plain = TrainDataset(records, views, resized=cache), TrainDataset(records, views)

    def reads(dataset):
        torch.manual_seed(7)
        return [dataset[i][0] for i in range(len(records))]

    expected = reads(plain)
    torch.manual_seed(7)
    composed = [torch.stack([T.Compose(v.transforms)(Image.open(r.path).convert("RGB")) for v in views[r.modality]])
                for r in records]
    first = reads(cached)
    assert bool(cache.filled.all())
    for r in records:
        (tmp_path / r.path).unlink()
    again = reads(cached)  # from the cache only
    for e, c, f, a in zip(expected, composed, first, again, strict=True):
        assert torch.equal(e, c) and torch.equal(e, f) and torch.equal(e, a)


def test_cache_is_shared_with_loader_workers(tmp_path):
    """Worker processes fill the one shared array: the parent sees their pixels."""
    records = _records(tmp_path, 6)
    cache = ResizedCache(len(records), H, W)
    dataset = TrainDataset(records, _views(), resized=cache)
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    seen = sorted(int(index) for _, index in loader)
    assert seen == list(range(len(records)))
    assert bool(cache.filled.all())
    view = visible_views(H, W)[0]
    for i, record in enumerate(records):
        assert torch.equal(cache.pixels[i], view.resize(Image.open(record.path).convert("RGB")))


@pytest.mark.e2e
def test_cache_travels_by_handle_to_spawned_workers():
    """Spawned workers receive the dataset through multiprocessing's ForkingPickler, for which
    torch passes shared tensors by handle: a write through the copy reaches the original."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions

    cache = ResizedCache(2, H, W)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump((cache, train_transform(H, W, "channel")))
    copy, view = pickle.loads(buffer.getvalue())
    copy.get(1, lambda: torch.full((H, W, 3), 9, dtype=torch.uint8))
    assert bool(cache.filled[1]) and int(cache.pixels[1].max()) == 9 and not bool(cache.filled[0])
    assert isinstance(view, TrainView) and view(photo(0)).shape == (3, H, W)


def test_cache_budget_is_opt_in_with_a_clear_sentence():
    assert cache_bytes(34_167, 288, 144) == 34_167 * (3 * 288 * 144 + 1)  # 4,250,955,639 B = 3.959 GiB
    assert resized_cache(10, H, W, 0) == (None, "")
    cache, reason = resized_cache(34_167, 288, 144, 2.0)
    assert cache is None
    assert "data.resized_cache_gib=2 is below the 3.96 GiB that 34,167 training images take at 288×144" in reason
    caches, reason = resized_caches({VISIBLE: 3, INFRARED: 2}, H, W, 1.0)
    assert reason == "" and {m: len(c) for m, c in caches.items()} == {VISIBLE: 3, INFRARED: 2}
    assert resized_caches({VISIBLE: 3}, H, W, 1e-9)[0] == {}


def test_dataset_rejects_a_cache_of_another_length(tmp_path):
    with pytest.raises(ValueError, match="resized-image cache of 3 slots for 4 records"):
        TrainDataset(_records(tmp_path), _views(), resized=ResizedCache(3, H, W))


# ------------------------------------------------------------------ tensor colour jitter
@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0, 1.27, 1.5])
def test_brightness_contrast_saturation_equal_torchvision_tensor_ops(factor):
    x = hard_tensor()
    for ours, theirs in ((adjust_brightness, F.adjust_brightness), (adjust_contrast, F.adjust_contrast),
                         (adjust_saturation, F.adjust_saturation)):
        torch.testing.assert_close(ours(x.clone(), factor), theirs(x.clone(), factor), atol=1e-6, rtol=0)


@pytest.mark.parametrize("factor", [-0.5, -0.31, -0.05, 0.0, 0.12, 1 / 6, 0.37, 0.4999, 0.5])
def test_hue_equals_torchvision_tensor_hue_within_float_rounding(factor):
    x = hard_tensor(1)
    torch.testing.assert_close(adjust_hue(x, factor), F.adjust_hue(x, factor), atol=1e-5, rtol=0)
    gray = x[:1].expand(3, -1, -1).contiguous()
    torch.testing.assert_close(adjust_hue(gray, factor), gray, atol=0, rtol=0)


@pytest.mark.parametrize("gray", [False, True])
def test_tensor_jitter_draws_like_torchvision_color_jitter(gray):
    """Same seed: the same factors in the same order (torchvision's ColorJitter on the same
    float tensor gives the same image within float rounding) and the same draws consumed."""
    x = F.to_tensor(photo(3, gray=gray))
    ours, theirs = TensorColorJitter(0.5, 0.5, 0.5, 0.5), T.ColorJitter(0.5, 0.5, 0.5, 0.5)
    for seed in range(40):
        torch.manual_seed(seed)
        a, after_a = ours(x), torch.rand(3)
        torch.manual_seed(seed)
        b, after_b = theirs(x), torch.rand(3)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
        assert torch.equal(after_a, after_b)


def test_tensor_jitter_matches_the_pil_pipeline_in_distribution():
    """Over 400 seeded draws against torchvision's ColorJitter on PIL images (the pipeline
    before): the same draws give images within PIL's 8-bit rounding. PIL truncates after each
    blend, so its images are darker by about 1.3/255 on average (measured 1.25); the spread
    over draws is the same. Per step, for the same factor, PIL's op and ours differ by under
    0.6/255 on average (hue: under 1/255; PIL quantises the hue to 1/256 turn)."""
    image = photo(5, size=(32, 64))
    x = F.to_tensor(image)
    pil, ours = T.ColorJitter(0.5, 0.5, 0.5, 0.5), TensorColorJitter(0.5, 0.5, 0.5, 0.5)
    paired, means_pil, means_ours = [], [], []
    for seed in range(400):
        torch.manual_seed(seed)
        a = F.to_tensor(pil(image))
        torch.manual_seed(seed)
        b = ours(x)
        paired.append(float((a - b).abs().mean()))
        means_pil.append(a.mean((1, 2)))
        means_ours.append(b.mean((1, 2)))
    paired = np.array(paired) * 255
    assert np.median(paired) < 2.0 and paired.max() < 3.5
    means_pil, means_ours = torch.stack(means_pil), torch.stack(means_ours)
    shift = (means_ours.mean(0) - means_pil.mean(0)) * 255
    assert bool(((shift > 0.3) & (shift < 2.5)).all()), shift  # PIL's truncation, nothing more
    torch.testing.assert_close(means_ours.std(0), means_pil.std(0), rtol=0.03, atol=0)
    steps = ((F.adjust_brightness, adjust_brightness, (0.5, 0.9, 1.4)),
             (F.adjust_contrast, adjust_contrast, (0.5, 0.9, 1.4)),
             (F.adjust_saturation, adjust_saturation, (0.5, 0.9, 1.4)),
             (F.adjust_hue, adjust_hue, (-0.45, -0.2, 0.1, 0.37)))
    for theirs, mine, factors in steps:
        limit = 1.0 if mine is adjust_hue else 0.6
        for factor in factors:
            diff = (F.to_tensor(theirs(image, factor)) - mine(x, factor)).abs().mean() * 255
            assert diff < limit, (mine.__name__, factor, float(diff))


def test_tensor_jitter_views_share_every_other_draw_with_pil_views(tmp_path):
    """data.jitter=tensor changes only the jitter's arithmetic: the crop, flip, erasing and
    channel draws are the same, so same-seed views differ only by rounding."""
    image = photo(9, size=(20, 50))
    for view in ("channel", "infrared"):
        pil_view, tensor_view = train_transform(H, W, view, pad=2), train_transform(H, W, view, pad=2, jitter="tensor")
        assert isinstance(tensor_view.jitter, TensorColorJitter)
        for seed in range(30):
            torch.manual_seed(seed)
            a = pil_view(image)
            torch.manual_seed(seed)
            b = tensor_view(image)
            # 4/255 in pixel units is about 0.07 after normalisation (std 0.225).
            assert float((a - b).abs().mean()) < 0.07, (view, seed)


# ------------------------------------------------------------------ configuration and run wiring
def test_config_keys_validate(make_config, synthetic_root, tmp_path):
    from bmil.errors import ConfigError

    with pytest.raises(ConfigError, match="'data.jitter' must be one of pil, tensor"):
        make_config(synthetic_root, tmp_path, "data.jitter=opencv")
    with pytest.raises(ConfigError, match="'data.resized_cache_gib' must be >= 0"):
        make_config(synthetic_root, tmp_path, "data.resized_cache_gib=-1")


def test_run_builds_cached_tensor_jitter_datasets(make_config, synthetic_root, tmp_path, caplog):
    from bmil.engine.run import build_run, stage_views

    cfg = make_config(synthetic_root, tmp_path, "data.resized_cache_gib=1", "data.jitter=tensor",
                      "train.stage1_epochs=1", "train.stage2_epochs=0")
    run = build_run(cfg)
    for m, dataset in run.datasets.items():
        assert isinstance(dataset.resized, ResizedCache) and len(dataset.resized) == len(run.index[m])
        assert dataset.resized.shape[1:3] == (64, 32)
    assert isinstance(stage_views(cfg, 1)[VISIBLE][1].jitter, TensorColorJitter)
    small = make_config(synthetic_root, tmp_path / "small", "data.resized_cache_gib=1e-6")
    with caplog.at_level("WARNING"):
        run = build_run(small)
    assert all(d.resized is None for d in run.datasets.values())
    assert "data.resized_cache_gib=1e-06 is below" in caplog.text
