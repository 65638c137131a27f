"""A procedural visible-infrared person dataset written in the SYSU-MM01 layout.

:func:`make_synthetic` renders a small dataset so that the demo, the tests and the benchmarks
run the same reader and protocol code as the real SYSU-MM01:

    root/cam1..cam6/<4-digit id>/<4-digit n>.jpg     cam1, 2, 4, 5 visible; cam3, 6 infrared
    root/exp/train_id.txt, val_id.txt, test_id.txt   one line of comma-separated ids each
    root/synthetic.json                              the generator version and parameters

What the renderer models (see docs/synthetic.md):

- identity cues that survive both modalities: body height and build (shoulder and hip width,
  head size, leg length, limb thickness), garment layout (short top or long coat, sleeves,
  trousers, shorts or skirt), garment pattern (plain, horizontal or vertical stripes, checks,
  with an identity's own frequency, phase and duty cycle), hair or hat, and carried objects
  (a hand bag on one side, a backpack);
- a cue that exists only in visible: the hue and saturation of every garment, random per identity;
- near-infrared intensity from a "material" value per surface: the luminance of its colour
  (± a little; skin brighter) for skin, hair, shoes and 75 % of garments and accessories, drawn
  independently of the colour for the rest; a grey, low-contrast scene; blur and noise;
- nuisances: per-camera background, illumination gain, colour cast and framing; per-image
  position, scale, lean, limb pose, front or back view, mirror flip, and an occluding box in
  about 10 % of the images.

Everything is drawn from generators seeded by ``seed`` (identities, cameras, and one
generator per image keyed by (seed, id, camera, n)), so a seed gives identical files.
"""

from __future__ import annotations

import colorsys
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bmil.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 3
# Fraction of the camera-specific background contrast kept (1 = the full scene).
BACKGROUND_STRENGTH = 0.25
# Half-range of the per-camera colour cast and gain of visible cameras.
CAMERA_SHIFT = 0.08
# Probability that a garment's near-infrared brightness follows its visible luminance (many
# dyes reflect near-infrared roughly as their looks suggest; the others do not), and the
# spread around the luminance when it does.
MATERIAL_FOLLOWS_LUMA = 0.75
MATERIAL_NOISE = 0.04
# Skin reflects near-infrared more strongly than visible light.
SKIN_INFRARED_GAIN = 0.1
# Infrared scene brightness: wall and floor ranges and the level the scene is muted towards.
INFRARED_WALL = (0.3, 0.6)
INFRARED_FLOOR = (0.25, 0.5)
INFRARED_NEUTRAL = 0.4
MANIFEST_NAME = "synthetic.json"
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
CAMERAS = (1, 2, 3, 4, 5, 6)
IMAGE_SUFFIX = ".jpg"
JPEG_QUALITY = 95
OCCLUSION_PROBABILITY = 0.1

# Label map values: what each pixel of a rendered image shows.
BACKGROUND, SKIN, HAIR, HAT, UPPER, LOWER, SHOES, BAG, BACKPACK, OCCLUDER = range(10)
NUM_LABELS = 10

PATTERNS = ("plain", "horizontal", "vertical", "checks")
UPPER_STYLES = ("short", "long")  # top ending at the hip, coat reaching the thigh
SLEEVES = ("short", "long")
LOWER_STYLES = ("trousers", "shorts", "skirt")
HEADWEAR = ("short_hair", "long_hair", "hat")
CARRIED = ("none", "bag_left", "bag_right", "backpack")


# ----------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Garment:
    """One garment: a pattern in body coordinates, visible colours, infrared materials.

    pattern: one of PATTERNS; frequency in cycles per body height; phase in cycles;
    duty: threshold on the sine in [-0.4, 0.4] (stripe width); colour / stripe_colour: RGB in
    [0, 1]; material / stripe_material: infrared intensity in [0, 1] of base and stripes.
    """

    pattern: str
    frequency: float
    phase: float
    duty: float
    colour: tuple[float, float, float]
    stripe_colour: tuple[float, float, float]
    material: float
    stripe_material: float


@dataclass(frozen=True)
class Identity:
    """Everything that stays fixed for a person across images and cameras.

    Lengths are in body units (the person's height is 1); colours RGB in [0, 1]; materials
    near-infrared intensities in [0, 1].
    """

    height: float  # relative stature, scales the whole figure
    head_radius: float
    shoulder_half_width: float
    hip_half_width: float
    leg_length: float  # height of the hip above the ground
    limb_radius: float
    upper_style: str
    sleeves: str
    lower_style: str
    headwear: str
    carried: str
    upper: Garment
    lower: Garment
    skin_colour: tuple[float, float, float]
    skin_material: float
    hair_colour: tuple[float, float, float]
    hair_material: float
    accessory_colour: tuple[float, float, float]  # hat, bag or backpack
    accessory_material: float
    shoe_colour: tuple[float, float, float]
    shoe_material: float


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    """HSV in [0, 1]^3 → RGB in [0, 1]^3 (:func:`colorsys.hsv_to_rgb`, as Python floats)."""
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (float(r), float(g), float(b))


def _vivid_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A strong clothing colour: any hue, mostly saturated, dark to bright."""
    return _hsv_to_rgb(rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.25, 0.95))


def _luma(colour: tuple[float, float, float]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _infrared_material(rng: np.random.Generator, colour: tuple[float, float, float], follows: bool) -> float:
    """Near-infrared intensity in [0, 1] of a surface of visible ``colour``.

    ``follows``: the intensity is the colour's luminance ± MATERIAL_NOISE (so the grey image
    of a visible view resembles the infrared one); otherwise it is drawn in [0.2, 0.85]
    independently of the colour (a dye that reflects near-infrared unlike its looks).
    """
    if follows:
        return float(np.clip(_luma(colour) + rng.normal(0.0, MATERIAL_NOISE), 0.03, 0.97))
    return float(rng.uniform(0.2, 0.85))


def _sample_garment(rng: np.random.Generator, pattern: str) -> Garment:
    colour = _vivid_colour(rng)
    # Stripes in a second hue or in a lighter / darker shade, always with a clear brightness
    # step, so the pattern also survives the method's grey / single-channel augmentation.
    stripe_colour = _vivid_colour(rng)
    if rng.random() < 0.5 or abs(_luma(stripe_colour) - _luma(colour)) < 0.2:
        factor = 0.35 if _luma(colour) > 0.35 else 2.2
        stripe_colour = tuple(float(np.clip(c * factor + (0.2 if factor > 1 else 0.0), 0, 1)) for c in colour)
    follows = rng.random() < MATERIAL_FOLLOWS_LUMA
    material = _infrared_material(rng, colour, follows)
    if follows:  # the stripes follow their own luminance: same polarity and step as in visible
        stripe_material = _infrared_material(rng, stripe_colour, True)
    else:  # a clear step, so the pattern stays visible in infrared
        step = float(rng.uniform(0.2, 0.35))
        stripe_material = material + step if material + step <= 0.95 else material - step
    # Frequencies in cycles per body height: a stripe stays >= 2 px wide at 64 px image height.
    frequency = float(rng.uniform(6.0, 10.0) if pattern == "checks" else rng.uniform(7.0, 13.0))
    return Garment(
        pattern=pattern,
        frequency=frequency,
        phase=float(rng.random()),
        duty=float(rng.uniform(-0.4, 0.4)),
        colour=colour,
        stripe_colour=stripe_colour,
        material=material,
        stripe_material=float(stripe_material),
    )


def sample_identities(num_ids: int, rng: np.random.Generator) -> list[Identity]:
    """``num_ids`` identities with distinct combinations of the categorical cues.

    The combinations (upper pattern, upper style, sleeves, lower style, headwear, carried
    object) are drawn without replacement while there are enough of them (576), so no two of
    the first 576 identities share a silhouette-and-pattern layout; body proportions, the
    lower garment's pattern, colours and materials are drawn independently per identity.
    """
    combos = list(itertools.product(PATTERNS, UPPER_STYLES, SLEEVES, LOWER_STYLES, HEADWEAR, CARRIED))
    order = rng.permutation(len(combos))
    if num_ids > len(combos):
        order = np.concatenate([order, rng.integers(0, len(combos), num_ids - len(combos))])
    identities = []
    for index in order[:num_ids]:
        upper_pattern, upper_style, sleeves, lower_style, headwear, carried = combos[int(index)]
        lower_pattern = str(rng.choice(PATTERNS, p=[0.4, 0.2, 0.2, 0.2]))
        hair_value = rng.uniform(0.05, 0.55)
        skin_value = rng.uniform(0.35, 0.95)
        skin_colour = _hsv_to_rgb(rng.uniform(0.02, 0.1), rng.uniform(0.3, 0.6), skin_value)
        hair_colour = _hsv_to_rgb(rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.7), hair_value)
        shoe_colour = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.8))
        accessory_colour = _vivid_colour(rng)
        upper, lower = _sample_garment(rng, upper_pattern), _sample_garment(rng, lower_pattern)
        identities.append(
            Identity(
                height=float(rng.uniform(0.8, 1.0)),
                head_radius=float(rng.uniform(0.055, 0.078)),
                shoulder_half_width=float(rng.uniform(0.095, 0.17)),
                hip_half_width=float(rng.uniform(0.07, 0.12)),
                leg_length=float(rng.uniform(0.42, 0.54)),
                limb_radius=float(rng.uniform(0.028, 0.05)),
                upper_style=upper_style,
                sleeves=sleeves,
                lower_style=lower_style,
                headwear=headwear,
                carried=carried,
                upper=upper,
                lower=lower,
                skin_colour=skin_colour,
                skin_material=min(1.0, _infrared_material(rng, skin_colour, True) + SKIN_INFRARED_GAIN),
                hair_colour=hair_colour,
                hair_material=_infrared_material(rng, hair_colour, True),
                accessory_colour=accessory_colour,
                accessory_material=_infrared_material(rng, accessory_colour, rng.random() < MATERIAL_FOLLOWS_LUMA),
                shoe_colour=shoe_colour,
                shoe_material=_infrared_material(rng, shoe_colour, True),
            )
        )
    return identities


# ----------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class Camera:
    """One camera: modality, framing, illumination and its fixed background.

    background: float32 [H, W, 3] in [0, 1] (equal channels for infrared).
    scale: person size factor; offset_x, offset_y: framing shift as fractions of W and H;
    gain: illumination gain; cast: per-channel multipliers (ones for infrared); light_side:
    -1 / +1, the side the light comes from; noise: Gaussian noise sigma in intensity units;
    blur: Gaussian blur radius in pixels at 128 px image height (0 for visible).
    """

    camid: int
    infrared: bool
    background: np.ndarray
    scale: float
    offset_x: float
    offset_y: float
    gain: float
    cast: tuple[float, float, float]
    light_side: float
    noise: float
    blur: float


def _background(rng: np.random.Generator, height: int, width: int, infrared: bool) -> np.ndarray:
    """A static scene: a textured wall, a floor below a horizon, a few fixed objects."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yr, xr = yy / height, xx / width
    if infrared:  # near-infrared under the camera's own illuminator: grey, low contrast
        wall = np.full(3, rng.uniform(*INFRARED_WALL))
        floor = np.full(3, rng.uniform(*INFRARED_FLOOR))
    else:
        wall = np.array(_hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.35, 0.9)))
        floor = np.array(_hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.25, 0.7)))
    horizon = rng.uniform(0.55, 0.78)
    is_wall = (yr < horizon)[..., None]
    image = np.where(is_wall, wall, floor).astype(np.float32)
    # Wall texture: vertical panels or bricks; floor texture: receding tiles.
    period = rng.uniform(0.12, 0.35)
    contrast = rng.uniform(0.05, 0.15) * (0.6 if infrared else 1.0)
    if rng.random() < 0.5:
        wall_texture = (np.mod(xr / period * 2.0, 1.0) < 0.12).astype(np.float32)
    else:
        row = np.floor(yr / (period * 0.5))
        wall_texture = ((np.mod(yr / (period * 0.5), 1.0) < 0.1) | (np.mod(xr / period + 0.5 * row, 1.0) < 0.06))
        wall_texture = wall_texture.astype(np.float32)
    depth = np.clip(yr - horizon, 1e-3, None)
    floor_texture = (np.mod(0.04 / depth, 1.0) < 0.15).astype(np.float32)
    texture = np.where(is_wall[..., 0], wall_texture, floor_texture)
    image -= contrast * texture[..., None]
    # Fixed objects: doors, pillars, posters (or, in infrared, a warm lamp or radiator).
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.uniform(-0.1, 0.9), rng.uniform(0.0, horizon - 0.1)
        box = (xr >= x0) & (xr < x0 + rng.uniform(0.1, 0.35)) & (yr >= y0) & (yr < y0 + rng.uniform(0.1, 0.5))
        if infrared:
            value = np.full(3, rng.uniform(0.05, 0.55))
        else:
            value = np.array(_hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.1, 0.95)))
        image = np.where(box[..., None], value, image)
    # Vertical light fall-off.
    image *= (1.0 - rng.uniform(0.0, 0.3) * yr)[..., None]
    # Keep the scene recognisable per camera but muted: a person-sized foreground has to
    # outweigh the background in the global features of an untrained network, or
    # unsupervised training from random initialisation clusters cameras, not people.
    neutral = np.full(3, INFRARED_NEUTRAL if infrared else 0.45, dtype=np.float32)
    image = neutral + BACKGROUND_STRENGTH * (image - neutral)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def sample_cameras(height: int, width: int, rng: np.random.Generator) -> dict[int, Camera]:
    """The six cameras of the scene, keyed by camera id (1..6)."""
    cameras = {}
    for camid in CAMERAS:
        infrared = camid in INFRARED_CAMERAS
        cast = (1.0, 1.0, 1.0)
        if not infrared:
            cast = tuple(float(c) for c in rng.uniform(1 - CAMERA_SHIFT, 1 + CAMERA_SHIFT, 3))
        cameras[camid] = Camera(
            camid=camid,
            infrared=infrared,
            background=_background(rng, height, width, infrared),
            scale=float(rng.uniform(0.88, 1.0)),
            offset_x=float(rng.uniform(-0.08, 0.08)),
            offset_y=float(rng.uniform(-0.06, 0.0)),
            gain=float(rng.uniform(0.92, 1.08) if infrared else rng.uniform(1 - CAMERA_SHIFT, 1 + CAMERA_SHIFT)),
            cast=cast,
            light_side=float(rng.choice([-1.0, 1.0])),
            noise=float(rng.uniform(0.025, 0.045) if infrared else rng.uniform(0.008, 0.02)),
            blur=float(rng.uniform(0.5, 0.9) if infrared else 0.0),
        )
    return cameras


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderedImage:
    """One rendered image.

    pixels: uint8 [H, W, 3]; labels: uint8 [H, W] (BACKGROUND, SKIN, ...); stripes: bool
    [H, W], the garment pixels painted with the stripe colour / material.
    """

    pixels: np.ndarray
    labels: np.ndarray
    stripes: np.ndarray


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 < 1.0


def _box(u: np.ndarray, v: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def _limb(
    u: np.ndarray, v: np.ndarray, start: tuple[float, float], end: tuple[float, float], r0: float, r1: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tapered capsule from ``start`` (radius r0) to ``end`` (r1): (mask, position t in [0, 1])."""
    du, dv = end[0] - start[0], end[1] - start[1]
    t = np.clip(((u - start[0]) * du + (v - start[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    dist2 = (u - start[0] - t * du) ** 2 + (v - start[1] - t * dv) ** 2
    return dist2 < (r0 + (r1 - r0) * t) ** 2, t


def _pattern(garment: Garment, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean stripe mask of a garment in body coordinates."""
    if garment.pattern == "plain":
        return np.zeros(u.shape, dtype=bool)
    across = np.sin(2 * np.pi * (garment.frequency * v + garment.phase)) > garment.duty
    along = np.sin(2 * np.pi * (garment.frequency * u + garment.phase)) > garment.duty
    if garment.pattern == "horizontal":
        return across
    if garment.pattern == "vertical":
        return along
    return across ^ along


def _person_labels(
    identity: Identity, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, back_view: bool
) -> np.ndarray:
    """Paint the person into a label map (uint8, BACKGROUND elsewhere), back to front."""
    p = identity
    labels = np.zeros(u.shape, dtype=np.uint8)
    r = p.limb_radius
    head_cv = 1.0 - p.head_radius
    shoulder_v = 1.0 - 2.0 * p.head_radius - 0.035
    hip_v = p.leg_length
    bag_side = {"bag_left": -1.0, "bag_right": 1.0}.get(p.carried, 0.0) * (-1.0 if back_view else 1.0)

    def paint(mask: np.ndarray, label: int) -> None:
        labels[mask] = label

    if p.carried == "backpack" and not back_view:  # seen from the front: bulges at the sides
        paint(_box(u, v, -p.shoulder_half_width - 0.03, p.shoulder_half_width + 0.03, shoulder_v - 0.27, shoulder_v),
              BACKPACK)
    if p.headwear == "long_hair" and not back_view:  # hair falling behind the shoulders
        paint(_box(u, v, -1.15 * p.head_radius, 1.15 * p.head_radius, shoulder_v - 0.1, head_cv), HAIR)

    # Legs: skin first, the lower garment and shoes over them.
    spread = rng.uniform(-0.015, 0.06)
    stride = rng.uniform(-0.03, 0.03)
    legs = np.zeros(u.shape, dtype=bool)
    for side in (-1.0, 1.0):
        hip = (side * p.hip_half_width * 0.55, hip_v)
        foot = (side * (p.hip_half_width * 0.55 + spread) + stride * side, 0.035)
        mask, _ = _limb(u, v, hip, foot, 1.3 * r, 0.9 * r)
        legs |= mask
    paint(legs, SKIN)
    crotch = _box(u, v, -p.hip_half_width, p.hip_half_width, hip_v - 0.07, hip_v + 0.01)
    if p.lower_style == "trousers":
        paint(legs & (v > 0.04), LOWER)
    elif p.lower_style == "shorts":
        paint(legs & (v > hip_v * 0.55), LOWER)
    else:  # skirt: trapezoid from the hip flaring to above the knee
        t = np.clip((hip_v - v) / (hip_v * 0.5), 0.0, 1.0)
        half = p.hip_half_width * (1.0 + 0.7 * t)
        paint((np.abs(u) < half) & (v <= hip_v + 0.01) & (v > hip_v * 0.5), LOWER)
    paint(crotch, LOWER)
    paint(legs & (v <= 0.045), SHOES)
    for side in (-1.0, 1.0):
        paint(_ellipse(u, v, side * (p.hip_half_width * 0.55 + spread) + stride * side, 0.018, 1.6 * r, 0.022), SHOES)

    # Torso: widening from hip to shoulder, rounded shoulders; a coat continues below the hip.
    frac = np.clip((v - hip_v) / (shoulder_v - hip_v), 0.0, 1.0) ** 0.7
    half = p.hip_half_width + (p.shoulder_half_width - p.hip_half_width) * frac
    torso = (np.abs(u) < half) & (v >= hip_v - 0.02) & (v <= shoulder_v)
    torso |= _ellipse(u, v, 0.0, shoulder_v, p.shoulder_half_width, 0.035)
    if p.upper_style == "long":
        t = np.clip((hip_v - v) / 0.18, 0.0, 1.0)
        torso |= (np.abs(u) < p.hip_half_width * (1.05 + 0.3 * t)) & (v < hip_v) & (v > hip_v - 0.18)
    paint(torso, UPPER)

    # Arms: a swinging tapered capsule, hand at the end, the sleeve over the upper part.
    for side in (-1.0, 1.0):
        shoulder = (side * (p.shoulder_half_width - 0.8 * r), shoulder_v - r)
        angle = rng.uniform(-0.12, 0.2) * side + rng.uniform(-0.12, 0.12)
        length = 0.34 + 0.4 * (p.leg_length - 0.47)
        hand = (shoulder[0] + length * np.sin(angle), shoulder[1] - length * np.cos(angle))
        arm, t = _limb(u, v, shoulder, hand, 1.05 * r, 0.8 * r)
        paint(arm, SKIN)
        paint(arm & (t < (0.92 if identity.sleeves == "long" else 0.38)), UPPER)
        paint(_ellipse(u, v, hand[0], hand[1] - 0.01, 0.9 * r, 1.1 * r), SKIN)
        if bag_side == side:  # hand bag hanging from this hand, strap to the shoulder
            paint(_box(u, v, hand[0] - 0.055, hand[0] + 0.055, hand[1] - 0.11, hand[1] + 0.02), BAG)
            strap, _ = _limb(u, v, (side * p.shoulder_half_width * 0.6, shoulder_v), hand, 0.008, 0.008)
            paint(strap & (labels != SKIN), BAG)

    # Neck and head.
    paint(_box(u, v, -0.028, 0.028, shoulder_v - 0.01, head_cv - 0.5 * p.head_radius), SKIN)
    head = _ellipse(u, v, 0.0, head_cv, 0.85 * p.head_radius, p.head_radius)
    paint(head, SKIN)
    hair_cap = _ellipse(u, v, 0.0, head_cv + 0.05 * p.head_radius, 0.95 * p.head_radius, 1.05 * p.head_radius)
    if back_view:
        paint(hair_cap & (v > head_cv - 0.55 * p.head_radius), HAIR)
        if p.headwear == "long_hair":
            paint(_box(u, v, -0.9 * p.head_radius, 0.9 * p.head_radius, shoulder_v - 0.12, head_cv), HAIR)
    elif p.headwear != "hat":
        paint(hair_cap & (v > head_cv + 0.35 * p.head_radius), HAIR)
        if p.headwear == "long_hair":
            side_hair = (np.abs(u) > 0.6 * p.head_radius) & (np.abs(u) < 1.1 * p.head_radius)
            paint(side_hair & (v < head_cv + 0.4 * p.head_radius) & (v > shoulder_v - 0.06), HAIR)
    if p.headwear == "hat":
        paint(_box(u, v, -1.0 * p.head_radius, 1.0 * p.head_radius, head_cv + 0.3 * p.head_radius,
                   head_cv + 1.3 * p.head_radius), HAT)
        paint(_box(u, v, -1.5 * p.head_radius, 1.5 * p.head_radius, head_cv + 0.25 * p.head_radius,
                   head_cv + 0.45 * p.head_radius), HAT)

    if p.carried == "backpack":
        if back_view:
            pack = _box(u, v, -0.85 * p.shoulder_half_width, 0.85 * p.shoulder_half_width, shoulder_v - 0.3,
                        shoulder_v - 0.02)
            paint(pack, BACKPACK)
        else:
            for side in (-1.0, 1.0):
                centre = side * p.shoulder_half_width * 0.55
                paint(_box(u, v, centre - 0.017, centre + 0.017, shoulder_v - 0.22, shoulder_v + 0.02), BACKPACK)
    return labels


def render_image(
    identity: Identity, camera: Camera, rng: np.random.Generator, height: int, width: int
) -> RenderedImage:
    """Render one image of ``identity`` seen by ``camera``; pose and noise come from ``rng``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Framing: the person's foot point, pixel scale (pixels per body unit), lean, view.
    scale = height * 0.9 * identity.height * camera.scale * rng.uniform(0.95, 1.05)
    foot_y = height * (0.985 + camera.offset_y + rng.uniform(-0.02, 0.01))
    foot_y = max(foot_y, scale + 1.0)
    centre_x = width * (0.5 + camera.offset_x + rng.normal(0.0, 0.04))
    lean = rng.uniform(-0.08, 0.08)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    back_view = bool(rng.random() < 0.5)
    v = (foot_y - yy) / scale
    u = mirror * ((xx - centre_x) / scale + lean * (v - 0.5))
    labels = _person_labels(identity, u, v, rng, back_view)

    occluded = rng.random() < OCCLUSION_PROBABILITY
    if occluded:  # an object in front of the person: a bench, a sign, a passer-by
        box_w, box_h = rng.uniform(0.35, 0.8) * width, rng.uniform(0.2, 0.45) * height
        x0 = rng.uniform(-0.2 * width, width - 0.6 * box_w)
        y0 = height - box_h if rng.random() < 0.6 else rng.uniform(0.2 * height, height - box_h)
        occluder = (xx >= x0) & (xx < x0 + box_w) & (yy >= y0) & (yy < y0 + box_h)
        labels[occluder] = OCCLUDER

    is_person = (labels != BACKGROUND) & (labels != OCCLUDER)
    upper_stripes = (labels == UPPER) & _pattern(identity.upper, u, v)
    lower_stripes = (labels == LOWER) & _pattern(identity.lower, u, v)
    # Cylindrical body shading plus light from the camera's side.
    across = np.clip(u / (identity.shoulder_half_width + 0.05), -1.0, 1.0)
    shading = 1.0 - 0.28 * across**2 + 0.12 * camera.light_side * mirror * across

    if camera.infrared:
        table = np.zeros((NUM_LABELS, 3), dtype=np.float32)
        table[[SKIN, HAIR, HAT, UPPER, LOWER, SHOES, BAG, BACKPACK]] = np.array([
            identity.skin_material, identity.hair_material, identity.accessory_material, identity.upper.material,
            identity.lower.material, identity.shoe_material, identity.accessory_material,
            identity.accessory_material,
        ], dtype=np.float32)[:, None]
        stripe_values = (identity.upper.stripe_material, identity.lower.stripe_material)
        shading = 1.0 + 0.4 * (shading - 1.0)  # thermal / NIR shading is weaker
        occluder_value = np.full(3, rng.uniform(0.1, 0.6), dtype=np.float32)
    else:
        table = np.zeros((NUM_LABELS, 3), dtype=np.float32)
        table[[SKIN, HAIR, HAT, UPPER, LOWER, SHOES, BAG, BACKPACK]] = np.array([
            identity.skin_colour, identity.hair_colour, identity.accessory_colour, identity.upper.colour,
            identity.lower.colour, identity.shoe_colour, identity.accessory_colour, identity.accessory_colour,
        ], dtype=np.float32)
        stripe_values = (identity.upper.stripe_colour, identity.lower.stripe_colour)
        occluder_value = np.array(_vivid_colour(rng), dtype=np.float32)

    image = table[labels]
    image[upper_stripes] = stripe_values[0]
    image[lower_stripes] = stripe_values[1]
    image *= np.where(is_person, shading, 1.0)[..., None]
    if occluded:
        grain = 1.0 - 0.15 * (np.mod((xx + yy) / max(2.0, 0.08 * height), 1.0) < 0.5)
        image[labels == OCCLUDER] = (occluder_value * grain[..., None])[labels == OCCLUDER]
    image = np.where((labels == BACKGROUND)[..., None], camera.background, image)
    # Infrared cameras hold their exposure more steadily than visible ones under changing light.
    gain = camera.gain * (rng.uniform(0.95, 1.05) if camera.infrared else rng.uniform(0.85, 1.15))
    image = image * gain * np.asarray(camera.cast, dtype=np.float32)

    if camera.infrared:
        grey = np.clip(image[..., 0], 0.0, 1.0)
        blurred = Image.fromarray(np.round(grey * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(camera.blur * height / 128.0))
        grey = np.asarray(blurred, dtype=np.float32) / 255.0
        grey += camera.noise * rng.standard_normal(grey.shape, dtype=np.float32)
        image = np.repeat(grey[..., None], 3, axis=2)
    else:
        image += camera.noise * rng.standard_normal(image.shape, dtype=np.float32)
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return RenderedImage(pixels=pixels, labels=labels, stripes=upper_stripes | lower_stripes)


# ----------------------------------------------------------------------------- dataset


def _split_ids(num_ids: int, num_train_ids: int) -> tuple[list[int], list[int], list[int]]:
    """SYSU-style split: train and val ids (val ≈ 10 % of the training ids) then test ids."""
    num_val = max(1, round(0.1 * num_train_ids))
    train = list(range(1, num_train_ids - num_val + 1))
    val = list(range(num_train_ids - num_val + 1, num_train_ids + 1))
    test = list(range(num_train_ids + 1, num_ids + 1))
    return train, val, test


def _check_parameters(num_ids: int, num_train_ids: int, images_per_camera: int, height: int, width: int) -> None:
    if not 2 <= num_train_ids < num_ids:
        raise ConfigError(f"make_synthetic expects 2 <= num_train_ids < num_ids, got {num_train_ids} and {num_ids}.")
    if num_ids > 9999:
        raise ConfigError(f"make_synthetic writes 4-digit ids, so num_ids must be at most 9999, got {num_ids}.")
    if not 1 <= images_per_camera <= 9999:
        raise ConfigError(f"make_synthetic expects 1 <= images_per_camera <= 9999, got {images_per_camera}.")
    if height < 32 or width < 16:
        raise ConfigError(f"make_synthetic expects images of at least 32x16 pixels, got {height}x{width}.")


@dataclass(frozen=True)
class Scene:
    """The identities (person id i is ``identities[i - 1]``) and cameras of one dataset."""

    identities: tuple[Identity, ...]
    cameras: dict[int, Camera]
    seed: int
    height: int
    width: int


def make_scene(num_ids: int, height: int, width: int, seed: int) -> Scene:
    """Identities and cameras of the dataset that ``make_synthetic`` writes for these arguments."""
    rng = np.random.default_rng(seed)
    identities = tuple(sample_identities(num_ids, rng))
    return Scene(identities, sample_cameras(height, width, rng), seed, height, width)


def render_sample(scene: Scene, pid: int, camid: int, index: int) -> RenderedImage:
    """Image ``index`` (1-based) of person ``pid`` in camera ``camid``, as written to disk.

    Each image has its own generator keyed by (seed, pid, camid, index), so images do not
    depend on the order they are rendered in.
    """
    rng = np.random.default_rng([scene.seed, pid, camid, index])
    return render_image(scene.identities[pid - 1], scene.cameras[camid], rng, scene.height, scene.width)


def make_synthetic(
    root: str | Path,
    *,
    num_ids: int = 120,
    num_train_ids: int = 80,
    images_per_camera: int = 4,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Render the synthetic dataset into ``root`` in the SYSU-MM01 layout; returns ``root``.

    ``num_ids`` persons with ids 1..num_ids; ids 1..num_train_ids train (the last ~10 % of
    them listed as val), the rest test. Every id has ``images_per_camera`` images
    (height x width RGB JPEG) in each of the six cameras. If ``root`` already holds a dataset
    made with the same parameters and generator version, nothing is done; one made by an older
    generator version with the same parameters is rendered again (it is ours, and stale); different
    parameters raise :class:`DatasetError` unless ``overwrite`` is true, which deletes the
    previous camera folders, ``exp`` and the manifest first.
    """
    _check_parameters(num_ids, num_train_ids, images_per_camera, height, width)
    root = Path(root)
    params = {"num_ids": num_ids, "num_train_ids": num_train_ids, "images_per_camera": images_per_camera,
              "height": height, "width": width, "seed": seed}
    manifest = {"generator": __name__, "version": GENERATOR_VERSION, "params": params}
    if _existing_dataset_matches(root, manifest, overwrite):
        logger.info("synthetic dataset already present in %s", root)
        return root
    _remove_generated(root)

    scene = make_scene(num_ids, height, width, seed)
    logger.info("rendering %d synthetic images into %s", num_ids * len(CAMERAS) * images_per_camera, root)
    for camid in CAMERAS:
        for pid in range(1, num_ids + 1):
            folder = root / f"cam{camid}" / f"{pid:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(1, images_per_camera + 1):
                rendered = render_sample(scene, pid, camid, index)
                Image.fromarray(rendered.pixels).save(folder / f"{index:04d}{IMAGE_SUFFIX}", quality=JPEG_QUALITY)

    (root / "exp").mkdir(parents=True, exist_ok=True)
    split_names = ("train_id.txt", "val_id.txt", "test_id.txt")
    for name, ids in zip(split_names, _split_ids(num_ids, num_train_ids), strict=True):
        (root / "exp" / name).write_text(",".join(str(i) for i in ids) + "\n")
    # Written last: its presence marks a complete dataset.
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def _existing_dataset_matches(root: Path, manifest: dict, overwrite: bool) -> bool:
    """True if ``root`` holds this exact dataset; raises if it holds something else."""
    path = root / MANIFEST_NAME
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == manifest:
            return True
        if _older_version_of(existing, manifest):
            logger.warning("%s holds synthetic data of generator version %s: rendering version %s in its place",
                           root, existing["version"], manifest["version"])
            return False
        if not overwrite:
            found = existing.get("params") if isinstance(existing, dict) else "unreadable"
            raise DatasetError(
                f"{path} was written with different parameters ({found}, version "
                f"{existing.get('version') if isinstance(existing, dict) else '?'}) than requested "
                f"({manifest['params']}, version {manifest['version']}); pass overwrite=True or choose another root."
            )
        return False
    if not overwrite and root.is_dir() and any(root.iterdir()):
        raise DatasetError(
            f"{root} is not empty but has no {MANIFEST_NAME}; choose an empty folder or pass overwrite=True."
        )
    return False


def _older_version_of(existing: object, manifest: dict) -> bool:
    """True if ``existing`` is the manifest of the same generator and parameters, older version."""
    return (
        isinstance(existing, dict) and existing.get("generator") == manifest["generator"]
        and existing.get("params") == manifest["params"] and isinstance(existing.get("version"), int)
        and existing["version"] < manifest["version"]
    )


def _remove_generated(root: Path) -> None:
    """Delete what the generator writes (camera folders, exp, manifest), nothing else."""
    for name in [f"cam{c}" for c in CAMERAS] + ["exp"]:
        if (root / name).is_dir():
            shutil.rmtree(root / name)
    (root / MANIFEST_NAME).unlink(missing_ok=True)


__all__ = [
    "CAMERAS",
    "GENERATOR_VERSION",
    "INFRARED_CAMERAS",
    "VISIBLE_CAMERAS",
    "Camera",
    "Garment",
    "Identity",
    "RenderedImage",
    "Scene",
    "make_scene",
    "make_synthetic",
    "render_image",
    "render_sample",
    "sample_cameras",
    "sample_identities",
]
