"""The release's training views (docs/method.md, ``train_sysu.py`` and
``ChannelAug.py``): order of the steps, channel-step probabilities, erasing fill, jitter by stage.

Images whose outcome can be read back: a black image stays black under colour jitter
(brightness, contrast, saturation and hue all keep 0 at 0) and under zero padding, so after
normalisation its background is exactly ((0 - mean) / std) per channel, and an erased
rectangle holds exactly the fill values; which channel was replicated, or whether the
image went grey, can then be told from the background pixel alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from bmil.data import (
    INFRARED,
    VISIBLE,
    ChannelAdaptiveGray,
    ChannelExchange,
    ChannelRandomErasing,
    RandomChannelOrGray,
    Record,
    TrainDataset,
    infrared_views,
    train_transform,
    visible_views,
)
from helpers import imagenet_normalised

H, W = 16, 8
FILL = np.array([0.4914, 0.4822, 0.4465])
GRAY = np.array([0.2989, 0.5870, 0.1140])
BLACK = Image.new("RGB", (W, H), (0, 0, 0))
COLOUR = (200, 100, 30)


def _outcomes(pixel: np.ndarray) -> dict[str, np.ndarray]:
    """The five possible results of a channel step on one normalised pixel [3]."""
    gray = float(GRAY @ pixel)
    return {
        "R": np.full(3, pixel[0]), "G": np.full(3, pixel[1]), "B": np.full(3, pixel[2]),
        "gray": np.full(3, gray), "unchanged": pixel,
    }


def _classify(value: np.ndarray, pixel: np.ndarray) -> str | None:
    for name, candidate in _outcomes(pixel).items():
        if np.allclose(value, candidate, atol=1e-4):
            return name
    return None


def _background(out: torch.Tensor) -> np.ndarray:
    """Per-channel median: the erased rectangle covers at most 40 % of the image."""
    return out.flatten(1).median(dim=1).values.double().numpy()


def _erased_mask(out: torch.Tensor, background: np.ndarray) -> torch.Tensor:
    return ~torch.isclose(out[0].double(), torch.tensor(background[0], dtype=torch.float64), atol=1e-4)


def _draws(transform, image, count: int, seed: int):
    torch.manual_seed(seed)
    return [transform(image) for _ in range(count)]


def test_visible_second_view_replicates_r_g_b_uniformly_never_gray_after_erasing():
    view = train_transform(H, W, "channel", pad=2)
    black = imagenet_normalised((0, 0, 0))
    counts = {"R": 0, "G": 0, "B": 0, "gray": 0, "unchanged": 0, None: 0}
    erased_draws = 0
    draws = _draws(view, BLACK, 2400, seed=0)
    for out in draws:
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # last step replicates
        background = _background(out)
        outcome = _classify(background, black)
        counts[outcome] += 1
        mask = _erased_mask(out, background)
        if mask.any():
            erased_draws += 1
            # Erased with the per-channel fill on the normalised tensor, then exchanged: the
            # rectangle holds the fill value of the very channel the background was taken from.
            channel = "RGB".index(outcome)
            torch.testing.assert_close(out[0][mask], torch.full((int(mask.sum()),), FILL[channel], dtype=out.dtype))
    assert counts["gray"] == counts["unchanged"] == counts[None] == 0
    for name in "RGB":
        assert abs(counts[name] - 800) < 4 * (2400 * (1 / 3) * (2 / 3)) ** 0.5, counts
    assert abs(erased_draws - 1200) < 4 * (2400 * 0.25) ** 0.5  # erasing p = 0.5


@pytest.mark.parametrize("stage", [1, 2])
def test_infrared_channel_step_probabilities(stage):
    (view,) = infrared_views(H, W, pad=2, stage=stage)
    black = imagenet_normalised((0, 0, 0))
    counts = {"R": 0, "G": 0, "B": 0, "gray": 0, "unchanged": 0, None: 0}
    n = 3200
    for out in _draws(view, BLACK, n, seed=stage):
        background = _background(out)
        outcome = _classify(background, black)
        counts[outcome] += 1
        mask = _erased_mask(out, background)
        if mask.any():  # the channel step acts on the erased tensor
            expected = {"R": np.full(3, FILL[0]), "G": np.full(3, FILL[1]), "B": np.full(3, FILL[2]),
                        "gray": np.full(3, GRAY @ FILL), "unchanged": FILL}[outcome]
            inside = out[:, mask].double().numpy()
            np.testing.assert_allclose(inside, np.broadcast_to(expected[:, None], inside.shape), atol=1e-5)
    assert counts[None] == 0
    expected = {"R": 1 / 4, "G": 1 / 4, "B": 1 / 4, "gray": 1 / 8, "unchanged": 1 / 8}
    for name, p in expected.items():
        assert abs(counts[name] - n * p) < 4 * (n * p * (1 - p)) ** 0.5, counts


def test_infrared_colour_jitter_in_stage_one_only():
    colour = Image.new("RGB", (W, H), COLOUR)
    pixel = imagenet_normalised(COLOUR)
    (stage1,) = infrared_views(H, W, pad=0, stage=1)
    (stage2,) = infrared_views(H, W, pad=0, stage=2)
    unjittered = [_classify(_background(out), pixel) is not None for out in _draws(stage2, colour, 200, seed=3)]
    assert all(unjittered)  # stage 2: the colour reaches the channel step untouched
    jittered = [_classify(_background(out), pixel) is None for out in _draws(stage1, colour, 200, seed=4)]
    assert sum(jittered) >= 190  # stage 1: colour jitter moves it (brightness is never exactly 1)
    # Where the release puts the jitter: after the flip, before the tensor conversion.
    names = [type(t).__name__ for t in stage1.transforms]
    assert names == ["Resize", "Pad", "RandomCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor",
                     "Normalize", "ChannelRandomErasing", "ChannelAdaptiveGray"]
    assert "ColorJitter" not in [type(t).__name__ for t in stage2.transforms]


def test_standard_view_erases_with_the_fill_values_on_the_normalised_tensor():
    view = train_transform(H, W, "standard", pad=2)
    black = imagenet_normalised((0, 0, 0))
    erased = 0
    for out in _draws(view, BLACK, 200, seed=5):
        background = _background(out)
        np.testing.assert_allclose(background, black, atol=1e-5)  # no jitter, no channel step
        mask = _erased_mask(out, background)
        if mask.any():
            erased += 1
            for c in range(3):  # the fill is not normalised again: exactly 0.4914, 0.4822, 0.4465
                torch.testing.assert_close(out[c][mask], torch.full((int(mask.sum()),), FILL[c], dtype=out.dtype))
    assert 60 < erased < 140


def test_channel_steps_as_units():
    image = torch.randn(3, 5, 4)
    gray = (torch.tensor(GRAY, dtype=image.dtype)[:, None, None] * image).sum(0)
    torch.manual_seed(6)
    exchange, adaptive = ChannelExchange(), ChannelAdaptiveGray(0.5)
    n = 4000
    seen = {"exchange": np.zeros(5, int), "adaptive": np.zeros(5, int)}
    for name, step in (("exchange", exchange), ("adaptive", adaptive)):
        for _ in range(n):
            out = step(image.clone())
            candidates = [image[0].expand(3, -1, -1), image[1].expand(3, -1, -1), image[2].expand(3, -1, -1),
                          gray.expand(3, -1, -1), image]
            (index,) = [i for i, c in enumerate(candidates) if torch.allclose(out, c, atol=1e-6)]
            seen[name][index] += 1
    assert seen["exchange"][3:].sum() == 0
    assert all(abs(c - n / 3) < 4 * (n * 2 / 9) ** 0.5 for c in seen["exchange"][:3])
    for count, p in zip(seen["adaptive"], (1 / 4, 1 / 4, 1 / 4, 1 / 8, 1 / 8), strict=True):
        assert abs(count - n * p) < 4 * (n * p * (1 - p)) ** 0.5, seen


def test_legacy_augmentation_switch_keeps_the_earlier_views():
    channel = train_transform(H, W, "channel", augmentation="legacy")
    assert isinstance(channel.transforms[0], T.ColorJitter)
    assert isinstance(channel.transforms[1], ChannelExchange) and channel.transforms[1].with_gray
    assert isinstance(channel.transforms[-1], ChannelRandomErasing)
    (stage1,), (stage2,) = (infrared_views(H, W, stage=s, augmentation="legacy") for s in (1, 2))
    for view in (stage1, stage2):  # jitter and the p = 0.5 exchange before the resize, both stages
        assert isinstance(view.transforms[0], T.ColorJitter) and isinstance(view.transforms[1], RandomChannelOrGray)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        train_transform(H, W, augmentation="paper")
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        infrared_views(H, W, stage=3)


def test_train_dataset_switches_views_and_keeps_its_cache(tmp_path):
    path = str(tmp_path / "a.png")
    BLACK.save(path)
    dataset = TrainDataset([Record(path, 0, 3, INFRARED)], {INFRARED: infrared_views(H, W, stage=1)}, cache=True)
    dataset[0]
    (tmp_path / "a.png").unlink()  # served from the cache from now on
    dataset.set_transforms({INFRARED: infrared_views(H, W, stage=2), VISIBLE: visible_views(H, W)})
    views, index = dataset[0]
    assert views.shape == (1, 3, H, W) and index == 0
    assert "ColorJitter" not in [type(t).__name__ for t in dataset.transforms_by_modality[INFRARED][0].transforms]
    with pytest.raises(ValueError, match="no transforms"):
        dataset.set_transforms({VISIBLE: visible_views(H, W)})


@pytest.mark.e2e
def test_trainer_uses_the_stage_two_infrared_view_in_stage_two(synthetic_root, tmp_path, make_config):
    from bmil.engine.trainer import Trainer

    trainer = Trainer(make_config(synthetic_root, tmp_path, "train.stage1_epochs=1", "train.stage2_epochs=1"),
                      progress=False)

    def infrared_steps():
        (view,) = trainer.run.datasets[INFRARED].transforms_by_modality[INFRARED]
        return [type(t).__name__ for t in view.transforms]

    assert "ColorJitter" in infrared_steps()
    trainer.run.set_stage_views(2)
    assert "ColorJitter" not in infrared_steps()
    assert "ChannelAdaptiveGray" in infrared_steps()
    visible = trainer.run.datasets[VISIBLE].transforms_by_modality[VISIBLE]
    assert len(visible) == 2 and isinstance(visible[1].transforms[-1], ChannelExchange)


def test_test_transform_resize_choices_match_pil():
    from bmil.data.transforms import test_transform

    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, size=(37, 19, 3), dtype=np.uint8))
    for name, pil_filter in (("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)):
        expected = imagenet_normalised(image.resize((W, H), pil_filter))
        out = test_transform(H, W, resize=name)(image).double().numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(out, expected, atol=1e-5)
    lanczos = test_transform(H, W, resize="lanczos")(image)
    assert not torch.allclose(lanczos, test_transform(H, W)(image), atol=1e-3)
    with pytest.raises(ValueError, match="resize must be one of"):
        test_transform(H, W, resize="nearest")
