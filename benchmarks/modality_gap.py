"""How wide is the modality gap of the synthetic dataset, and are identities findable?

Generates the synthetic dataset (or reads ``--root``), takes the training images (train and
val ids), and reports, for raw pixels and for a randomly initialised ResNet-18:

- the intra-modality share of each image's top-k cosine neighbours (self excluded), next to
  the share expected by chance (the own modality's fraction of the pool);
- within-modality retrieval: each image queries the other images of its modality seen by
  the other cameras (Rank-1, mAP);
- cross-modality retrieval: each infrared image queries all visible images (Rank-1, mAP).

Optionally also for a ResNet-18 probe trained with identity labels (``--probe-epochs``: on the
training ids, tested on the test ids) and for one trained on the visible images of another
population only (``--visible-probe-epochs``: a stand-in for an ImageNet backbone, tested on the
training ids). It also saves a contact sheet (identities × cameras) as a PNG.

    .venv/bin/python benchmarks/modality_gap.py [--root DIR] [--sheet docs/synthetic_contact_sheet.png]
        [--probe-epochs 10] [--visible-probe-epochs 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from bmil.data.synthetic import CAMERAS, INFRARED_CAMERAS, make_synthetic

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def read_ids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().strip().split(",") if x.strip()]


def load_images(root: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 [N, H, W, 3] of ``ids`` in all cameras, with pids, camids, modalities [N]."""
    images, pids, camids = [], [], []
    for camid in CAMERAS:
        for pid in ids:
            for path in sorted((root / f"cam{camid}" / f"{pid:04d}").glob("*.jpg")):
                images.append(np.asarray(Image.open(path).convert("RGB")))
                pids.append(pid)
                camids.append(camid)
    camids = np.array(camids)
    return np.stack(images), np.array(pids), camids, np.isin(camids, INFRARED_CAMERAS).astype(np.int64)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Downsampled (32x16) pixels, each image centred and L2-normalised: [N, 1536]."""
    small = np.stack([np.asarray(Image.fromarray(im).resize((16, 32), Image.BILINEAR)) for im in images])
    flat = small.reshape(len(images), -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


@torch.no_grad()
def random_resnet_features(images: np.ndarray, seed: int = 0, batch_size: int = 128) -> np.ndarray:
    """Global-average-pooled layer4 of a randomly initialised ResNet-18 (eval), 128x64 input: [N, 512]."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    features = []
    for start in range(0, len(images), batch_size):
        features.append(trunk(to_tensor(images[start:start + batch_size], (128, 64))).mean(dim=(2, 3)))
    f = torch.cat(features).numpy()
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def train_probe(images: np.ndarray, pids: np.ndarray, epochs: int, seed: int = 0) -> torch.nn.Module:
    """A ResNet-18 trained from scratch with identity labels on 64x32 crops (supervised upper bound).

    Visible images are turned grey with probability 0.5 (as the method's channel augmentation
    does), so the model must lean on the cues both modalities share.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=int(pids.max()) + 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    data = to_tensor(images, (64, 32))
    grey = data.mean(dim=1, keepdim=True).expand_as(data)
    labels = torch.from_numpy(pids)
    model.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            batch = torch.where(torch.rand(len(index), 1, 1, 1) < 0.5, grey[index], data[index])
            batch = torch.where(torch.rand(len(index), 1, 1, 1) < 0.5, batch.flip(3), batch)
            shift = [int(x) for x in rng.integers(-4, 5, 2)]
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(batch), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        print(f"  probe epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def to_tensor(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, H, W, 3] → ImageNet-normalised float [N, 3, *size]."""
    batch = torch.from_numpy((images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(batch, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def probe_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    data = to_tensor(images, (64, 32))
    f = torch.cat([trunk(data[s:s + 256]).mean(dim=(2, 3)) for s in range(0, len(data), 256)]).numpy()
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def neighbour_modality_share(sim: np.ndarray, modalities: np.ndarray, k: int) -> float:
    """Mean fraction of each image's top-k neighbours (self excluded) that share its modality."""
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    top = np.argpartition(-sim, k, axis=1)[:, :k]
    return float((modalities[top] == modalities[:, None]).mean())


def retrieval(sim: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """(Rank-1, mAP) of queries (rows) over gallery columns allowed by ``valid`` [Q, G]."""
    sim = np.where(valid, sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    match = (g_pids[order] == q_pids[:, None]) & np.take_along_axis(valid, order, axis=1)
    has_match = match.any(axis=1)
    match = match[has_match]
    hits = np.cumsum(match, axis=1)
    precision = hits / np.arange(1, match.shape[1] + 1)
    ap = (precision * match).sum(axis=1) / match.sum(axis=1)
    return float(match[:, 0].mean()), float(ap.mean())


def measure(features: np.ndarray, pids: np.ndarray, camids: np.ndarray, mods: np.ndarray, k: int) -> dict:
    sim = features @ features.T
    same_mod = mods[:, None] == mods[None, :]
    other_cam = camids[:, None] != camids[None, :]
    within_r1, within_map = retrieval(sim, pids, pids, same_mod & other_cam)
    ir, vis = mods == 1, mods == 0
    cross_r1, cross_map = retrieval(sim[ir][:, vis], pids[ir], pids[vis], np.ones((ir.sum(), vis.sum()), bool))
    return {"share": neighbour_modality_share(sim, mods, k), "within_r1": within_r1, "within_map": within_map,
            "cross_r1": cross_r1, "cross_map": cross_map}


def contact_sheet(root: Path, ids: list[int], per_camera: int, path: Path, zoom: int = 1) -> None:
    """A labelled grid: one row per id, ``per_camera`` images of each camera (cam1..cam6)."""
    first = Image.open(next((root / "cam1").glob("*/*.jpg")))
    w, h = first.width * zoom, first.height * zoom
    gap, left, top = 6, 70, 24
    columns = len(CAMERAS) * per_camera
    sheet = Image.new("RGB", (left + columns * w + (len(CAMERAS) - 1) * gap, top + len(ids) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, camid in enumerate(CAMERAS):
        x0 = left + c * (per_camera * w + gap)
        kind = "infrared" if camid in INFRARED_CAMERAS else "visible"
        draw.text((x0 + 4, 6), f"cam{camid} ({kind})", fill="black")
        for r, pid in enumerate(ids):
            files = sorted((root / f"cam{camid}" / f"{pid:04d}").glob("*.jpg"))[:per_camera]
            for j, file in enumerate(files):
                tile = Image.open(file).convert("RGB").resize((w, h), Image.NEAREST)
                sheet.paste(tile, (x0 + j * w, top + r * h))
    for r, pid in enumerate(ids):
        draw.text((6, top + r * h + h // 2 - 6), f"id {pid:04d}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="an existing synthetic dataset (default: generate into a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=30, help="neighbours counted for the modality share")
    parser.add_argument("--sheet", default="docs/synthetic_contact_sheet.png", help="contact sheet PNG ('' for none)")
    parser.add_argument("--sheet-ids", type=int, default=8)
    parser.add_argument("--probe-epochs", type=int, default=0,
                        help="also train a supervised ResNet-18 probe for this many epochs and test it on the test ids")
    parser.add_argument("--visible-probe-epochs", type=int, default=0,
                        help="also train a probe on the visible images of another population (seed + 101) only, "
                             "a stand-in for an ImageNet backbone, and test it on the training ids")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "synthetic"
        start = time.perf_counter()
        make_synthetic(root, seed=args.seed)
        print(f"dataset ready in {time.perf_counter() - start:.1f} s: {root}")
        train_ids = read_ids(root / "exp" / "train_id.txt") + read_ids(root / "exp" / "val_id.txt")
        if args.sheet:
            contact_sheet(root, train_ids[: args.sheet_ids], 2, Path(args.sheet))
            print(f"contact sheet: {args.sheet}")
        images, pids, camids, mods = load_images(root, train_ids)
        test = load_images(root, read_ids(root / "exp" / "test_id.txt")) if args.probe_epochs else None
        other = visible_population(Path(tmp) / "other", args.seed + 101) if args.visible_probe_epochs else None

    print(f"{len(images)} training images ({(mods == 0).sum()} visible, {(mods == 1).sum()} infrared), "
          f"{len(np.unique(pids))} ids")
    rows = []
    for name, extract in (("raw pixels 32×16", pixel_features), ("random ResNet-18", random_resnet_features)):
        start = time.perf_counter()
        rows.append((f"{name}, train ids", measure(extract(images), pids, camids, mods, args.k), chance_share(mods)))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    if test is not None:
        start = time.perf_counter()
        model = train_probe(images, pids, args.probe_epochs)
        test_images, test_pids, test_camids, test_mods = test
        m = measure(probe_features(model, test_images), test_pids, test_camids, test_mods, args.k)
        rows.append((f"supervised ResNet-18 probe ({args.probe_epochs} epochs), test ids", m, chance_share(test_mods)))
        print(f"probe: {time.perf_counter() - start:.1f} s")
    if other is not None:
        start = time.perf_counter()
        model = train_probe(*other, args.visible_probe_epochs)
        m = measure(probe_features(model, images), pids, camids, mods, args.k)
        rows.append((f"visible-only probe, another population ({args.visible_probe_epochs} epochs), train ids", m,
                     chance_share(mods)))
        print(f"visible-only probe: {time.perf_counter() - start:.1f} s")

    print(f"\n| features | intra-modality share of top-{args.k} | chance | within-modality R1 / mAP (other cams) "
          "| cross-modality R1 / mAP (IR → VIS) |")
    print("|---|---|---|---|---|")
    for name, m, chance in rows:
        print(f"| {name} | {m['share']:.3f} | {chance:.3f} | {100 * m['within_r1']:.1f} / {100 * m['within_map']:.1f} "
              f"| {100 * m['cross_r1']:.1f} / {100 * m['cross_map']:.1f} |")


def visible_population(root: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Visible images uint8 [N, H, W, 3] and 0-based ids [N] of every id of another synthetic population."""
    make_synthetic(root, seed=seed)
    ids = read_ids(root / "exp" / "train_id.txt") + read_ids(root / "exp" / "val_id.txt")
    ids += read_ids(root / "exp" / "test_id.txt")
    images, pids, _, mods = load_images(root, ids)
    return images[mods == 0], pids[mods == 0] - 1


def chance_share(modalities: np.ndarray) -> float:
    """Expected own-modality share of random neighbours: (n_own - 1) / (N - 1), averaged over images."""
    own = np.where(modalities == 1, (modalities == 1).sum(), (modalities == 0).sum())
    return float(np.mean((own - 1) / (len(modalities) - 1)))

if __name__ == "__main__":
    main()
