"""The synthetic visible-infrared dataset: layout, determinism, idempotence, modality properties."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmil.data import synthetic
from bmil.data.synthetic import (
    CAMERAS,
    INFRARED_CAMERAS,
    VISIBLE_CAMERAS,
    make_scene,
    make_synthetic,
    render_image,
    render_sample,
    sample_cameras,
    sample_identities,
)
from bmil.errors import ConfigError, DatasetError

SMALL = {"num_ids": 12, "num_train_ids": 8, "images_per_camera": 2, "height": 64, "width": 32}
IDS = range(1, SMALL["num_ids"] + 1)
INDICES = range(1, SMALL["images_per_camera"] + 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "data", seed=3, **SMALL)


@pytest.fixture(scope="module")
def scene() -> synthetic.Scene:
    return make_scene(SMALL["num_ids"], SMALL["height"], SMALL["width"], seed=3)


def load(root: Path, pid: int, camid: int, index: int) -> np.ndarray:
    """The image on disk as float [H, W, 3] in 0..255."""
    path = root / f"cam{camid}" / f"{pid:04d}" / f"{index:04d}.jpg"
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_ids(path: Path) -> list[int]:
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    return [int(x) for x in lines[0].split(",")]


# ----------------------------------------------------------------------------- layout


def test_layout_follows_sysu(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == sorted([f"cam{c}" for c in CAMERAS] + ["exp", "synthetic.json"])
    for camid in CAMERAS:
        assert sorted(p.name for p in (root / f"cam{camid}").iterdir()) == [f"{i:04d}" for i in IDS]
        for pid in IDS:
            files = sorted(p.name for p in (root / f"cam{camid}" / f"{pid:04d}").iterdir())
            assert files == [f"{n:04d}.jpg" for n in INDICES]
    images = list(root.glob("cam*/*/*.jpg"))
    assert len(images) == SMALL["num_ids"] * 6 * SMALL["images_per_camera"]
    for path in images[::7]:
        with Image.open(path) as image:
            assert image.size == (SMALL["width"], SMALL["height"])
            assert image.mode == "RGB"


def test_split_files_partition_the_ids(root: Path) -> None:
    train = read_ids(root / "exp" / "train_id.txt")
    val = read_ids(root / "exp" / "val_id.txt")
    test = read_ids(root / "exp" / "test_id.txt")
    assert sorted(train + val + test) == list(IDS)
    assert sorted(train + val) == list(range(1, SMALL["num_train_ids"] + 1))
    assert len(val) >= 1 and len(train) >= 1
    assert max(train) < min(val)


def test_camera_modalities(root: Path) -> None:
    """SYSU-MM01's layout on disk: the images of cameras 3 and 6 are grey (infrared), the others colour."""
    assert sorted(VISIBLE_CAMERAS + INFRARED_CAMERAS) == list(range(1, 7))
    for camid in range(1, 7):
        spread = max(np.abs(np.diff(load(root, pid, camid, 1), axis=2)).max() for pid in IDS)
        if camid in (3, 6):
            assert spread <= 4, camid  # JPEG rounding only
        else:
            assert spread > 20, camid


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(root: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", seed=3, **SMALL)
    assert digest(again) == digest(root)


def test_files_are_the_rendered_samples(root: Path, scene: synthetic.Scene) -> None:
    # The on-disk image is the render (up to JPEG loss), so render labels can serve as masks.
    for pid, camid in [(1, 1), (5, 3), (12, 6)]:
        on_disk = load(root, pid, camid, 2)
        error = np.abs(on_disk - render_sample(scene, pid, camid, 2).pixels).mean()
        assert error < 12.0
        assert np.abs(on_disk - render_sample(scene, pid % 12 + 1, camid, 2).pixels).mean() > 2 * error


def test_different_seed_gives_different_images(root: Path, tmp_path: Path) -> None:
    other = make_synthetic(tmp_path / "other", seed=4, **SMALL)
    first, second = digest(root), digest(other)
    images = [name for name in first if name.endswith(".jpg")]
    assert sum(first[name] != second[name] for name in images) == len(images)
    assert abs(load(root, 1, 1, 1) - load(other, 1, 1, 1)).mean() > 5.0


def test_render_does_not_touch_global_rng(scene: synthetic.Scene) -> None:
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    render_sample(scene, 1, 1, 1)
    assert np.random.random() == expected


# ----------------------------------------------------------------------------- idempotence


def test_same_parameters_return_without_rewriting(tmp_path: Path) -> None:
    target = make_synthetic(tmp_path / "d", seed=1, **SMALL)
    probe = target / "cam1" / "0001" / "0001.jpg"
    probe.write_bytes(b"marker")  # a regeneration would overwrite it
    assert make_synthetic(tmp_path / "d", seed=1, **SMALL) == target
    assert probe.read_bytes() == b"marker"


def test_different_parameters_raise_unless_overwrite(tmp_path: Path) -> None:
    target = make_synthetic(tmp_path / "d", seed=1, **SMALL)
    with pytest.raises(DatasetError, match="different parameters"):
        make_synthetic(target, seed=2, **SMALL)
    smaller = dict(SMALL, num_ids=10)
    make_synthetic(target, seed=1, overwrite=True, **smaller)
    assert sorted(p.name for p in (target / "cam3").iterdir()) == [f"{i:04d}" for i in range(1, 11)]
    assert read_ids(target / "exp" / "test_id.txt") == [9, 10]


def test_an_older_generator_version_is_rendered_again(tmp_path: Path) -> None:
    target = make_synthetic(tmp_path / "d", seed=1, **SMALL)
    manifest_path = target / synthetic.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    fresh = (target / "cam3" / "0001" / "0001.jpg").read_bytes()
    (target / "cam3" / "0001" / "0001.jpg").write_bytes(b"stale")
    manifest_path.write_text(json.dumps(dict(manifest, version=manifest["version"] - 1)))
    make_synthetic(target, seed=1, **SMALL)
    assert json.loads(manifest_path.read_text()) == manifest
    assert (target / "cam3" / "0001" / "0001.jpg").read_bytes() == fresh
    # A newer version than this generator knows is not ours to replace.
    manifest_path.write_text(json.dumps(dict(manifest, version=manifest["version"] + 1)))
    with pytest.raises(DatasetError, match="different parameters"):
        make_synthetic(target, seed=1, **SMALL)


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty"):
        make_synthetic(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bad_parameters_raise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_train_ids"):
        make_synthetic(tmp_path / "d", num_ids=5, num_train_ids=5)
    with pytest.raises(ConfigError, match="32x16"):
        make_synthetic(tmp_path / "d", height=16, width=8)


# ----------------------------------------------------------------------------- modality properties


def test_infrared_is_grey_and_visible_is_not(root: Path) -> None:
    for camid in CAMERAS:
        spreads = np.array([np.abs(np.diff(load(root, pid, camid, n), axis=2)).mean() for pid in IDS for n in INDICES])
        if camid in INFRARED_CAMERAS:
            assert spreads.max() < 1.0
        else:
            assert spreads.min() > 5.0


def _mean_colour(root: Path, scene: synthetic.Scene, pid: int, camid: int, index: int) -> np.ndarray | None:
    """Mean RGB of the upper garment's base colour (stripes excluded), None if barely visible."""
    rendered = render_sample(scene, pid, camid, index)
    mask = (rendered.labels == synthetic.UPPER) & ~rendered.stripes
    return load(root, pid, camid, index)[mask].mean(axis=0) if mask.sum() >= 10 else None


def test_visible_clothing_colour_is_an_identity_cue(root: Path, scene: synthetic.Scene) -> None:
    # Chromaticity (r, g share) of the upper garment: stable for a person across the four
    # visible cameras, spread widely across persons.
    per_id = []
    for pid in IDS:
        colours = [_mean_colour(root, scene, pid, c, n) for c in VISIBLE_CAMERAS for n in INDICES]
        colours = np.array([c for c in colours if c is not None])
        per_id.append(colours[:, :2] / colours.sum(axis=1, keepdims=True))
    within = np.mean([c.std(axis=0).mean() for c in per_id])
    across = np.stack([c.mean(axis=0) for c in per_id]).std(axis=0).mean()
    assert across > 3.5 * within
    assert across > 0.05


def _infrared_means(root: Path, scene: synthetic.Scene, labels: tuple[int, ...]) -> np.ndarray:
    """Mean infrared intensity over pixels with ``labels``: [ids, images in cam3 and cam6]."""
    means = []
    for pid in IDS:
        row = []
        for camid in INFRARED_CAMERAS:
            for n in INDICES:
                mask = np.isin(render_sample(scene, pid, camid, n).labels, labels)
                row.append(load(root, pid, camid, n)[..., 0][mask].mean())
        means.append(row)
    return np.array(means)


@pytest.mark.parametrize(
    ("labels", "ratio"),
    [((synthetic.UPPER,), 0.3),
     ((synthetic.SKIN, synthetic.HAIR, synthetic.HAT, synthetic.UPPER, synthetic.LOWER, synthetic.SHOES,
       synthetic.BAG, synthetic.BACKPACK), 0.6)],
    ids=["upper-garment", "person"],
)
def test_infrared_intensity_is_consistent_within_identity(
    root: Path, scene: synthetic.Scene, labels: tuple[int, ...], ratio: float
) -> None:
    means = _infrared_means(root, scene, labels)  # [12, 4]: 2 images in cam3, 2 in cam6
    k = means.shape[1]
    within = np.abs(means[:, :, None] - means[:, None, :]).sum() / (len(means) * k * (k - 1))
    id_means = means.mean(axis=1)
    across = np.abs(id_means[:, None] - id_means[None, :]).sum() / (len(means) * (len(means) - 1))
    assert within < ratio * across


def _luma(colour: tuple[float, float, float]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def test_infrared_material_follows_luminance_for_most_garments() -> None:
    identities = sample_identities(576, np.random.default_rng(0))
    luma = np.array([_luma(p.upper.colour) for p in identities])
    material = np.array([p.upper.material for p in identities])
    close = np.abs(material - luma) < 0.12  # within 3 sigma of the luminance
    # 75 % follow; of the independent 25 %, some land near the luminance by chance.
    assert 0.75 <= close.mean() <= 0.9
    assert np.abs(material - luma)[close].mean() < 0.05
    # Stripes of a following garment keep the visible polarity.
    follows = close & (np.array([p.upper.pattern for p in identities]) != "plain")
    stripe_luma = np.array([_luma(p.upper.stripe_colour) for p in identities])
    stripe_material = np.array([p.upper.stripe_material for p in identities])
    same_sign = np.sign(stripe_material - material) == np.sign(stripe_luma - luma)
    assert same_sign[follows].mean() > 0.95
    # Skin is brighter in infrared than its luminance; hair and shoes follow their luminance.
    skin = np.array([p.skin_material - _luma(p.skin_colour) for p in identities])
    assert skin.mean() == pytest.approx(synthetic.SKIN_INFRARED_GAIN, abs=0.01)
    for part in ("hair", "shoe"):
        pairs = np.array([(_luma(getattr(p, f"{part}_colour")), getattr(p, f"{part}_material")) for p in identities])
        assert np.corrcoef(pairs.T)[0, 1] > 0.8


def test_stripes_survive_in_infrared() -> None:
    rng = np.random.default_rng(5)
    identities = [p for p in sample_identities(60, rng) if p.upper.pattern != "plain"][:6]
    cameras = sample_cameras(128, 64, rng)
    for index, identity in enumerate(identities):
        rendered = render_image(identity, cameras[3], np.random.default_rng(index), 128, 64)
        upper = rendered.labels == synthetic.UPPER
        grey = rendered.pixels[..., 0].astype(np.float64)
        stripe, base = grey[upper & rendered.stripes], grey[upper & ~rendered.stripes]
        assert len(stripe) > 20 and len(base) > 20
        expected = np.sign(identity.upper.stripe_material - identity.upper.material)
        assert expected * (stripe.mean() - base.mean()) > 12.0


def test_identities_have_distinct_layouts() -> None:
    identities = sample_identities(120, np.random.default_rng(0))
    layouts = {(p.upper.pattern, p.upper_style, p.sleeves, p.lower_style, p.headwear, p.carried) for p in identities}
    assert len(layouts) == 120
    assert {p.upper.pattern for p in identities} == set(synthetic.PATTERNS)
    assert {p.carried for p in identities} == set(synthetic.CARRIED)


def test_persons_are_whole_and_occlusion_is_occasional() -> None:
    scene = make_scene(40, 64, 32, seed=0)
    renders = [render_sample(scene, pid, camid, 1) for pid in range(1, 41) for camid in CAMERAS]
    occluded = [(r.labels == synthetic.OCCLUDER).any() for r in renders]
    assert 0.04 <= np.mean(occluded) <= 0.2
    for r, is_occluded in zip(renders, occluded, strict=True):
        person = (r.labels != synthetic.BACKGROUND) & (r.labels != synthetic.OCCLUDER)
        rows = np.flatnonzero(person.any(axis=1))
        assert rows[0] > 0  # the head is not cut off
        if not is_occluded:
            assert rows[-1] - rows[0] >= 0.6 * 64  # a standing person, most of the image tall
            assert 0.1 < person.mean() < 0.6
