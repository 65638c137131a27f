"""Benchmark: CPU cost of the training loader's images, per step, on one core.

Writes synthetic JPEGs of SYSU-MM01's sizes (random 90-200 px wide, 250-480 px high; visible
smooth colour noise, infrared the same in gray) to a temporary folder and times, with one
torch thread, every step of the sysu preset's training views (288×144, pad 10):

- before: each view run on the decoded PIL image as ``T.Compose`` of its steps (the
  visible image is resized once per view; torchvision's PIL colour jitter);
- after: :class:`bmil.data.images.TrainDataset` reading the resized pixels from a
  :class:`bmil.data.resized_cache.ResizedCache` (filled beforehand; the fill, a decode and a
  resize per image once per run, is printed apart), the random steps on uint8 / float
  tensors, the colour jitter as ``--jitter`` says (``tensor``: :class:`TensorColorJitter`).

One sysu iteration's batch is 128 visible images (two views: standard + channel) and 128
infrared images (stage 1's view, with jitter); stage 2 draws two such batches an iteration,
its infrared view without jitter. Prints a per-step table (ms per image) and, last,
``loader: X core-seconds per sysu iteration`` (after).

    PYTHONPATH=src python benchmarks/loader_throughput.py --images 48
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bmil.data.images import TrainDataset, load_image
from bmil.data.records import INFRARED, VISIBLE, Record
from bmil.data.resized_cache import ResizedCache
from bmil.data.transforms import TrainView, infrared_views, visible_views

BATCH = 128  # images per modality in one sysu iteration (8 identities × 16)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Record]:
    """``count`` visible and ``count`` infrared JPEGs of SYSU-MM01-like sizes."""
    rng = np.random.default_rng(seed)
    records = []
    for modality in (VISIBLE, INFRARED):
        for i in range(count):
            w, h = int(rng.integers(90, 201)), int(rng.integers(250, 481))
            small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            if modality == INFRARED:
                small[..., 1:] = small[..., :1]
            path = folder / f"{modality}_{i:04d}.jpg"
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=90)
            records.append(Record(path=str(path), pid=i, camid=1 if modality == VISIBLE else 3, modality=modality))
    return records


class Clock:
    """Per-image seconds of named steps; the median over images resists the pauses of a
    shared machine (a step run twice for one image, e.g. two views, adds up)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.image: dict[str, float] = defaultdict(float)

    def time(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.image[name] += time.perf_counter() - start
        return out

    def next_image(self) -> None:
        for name, seconds in self.image.items():
            self.calls[name].append(seconds)
        self.image.clear()

    def ms(self) -> dict[str, float]:
        return {name: 1e3 * float(np.median(values)) for name, values in self.calls.items()}


def before(records: list[Record], views: list[TrainView], repeats: int) -> dict[str, float]:
    """ms per image of each step of ``T.Compose(view.transforms)`` for every view, the
    decode once per image."""
    clock = Clock()
    for _ in range(repeats):
        for record in records:
            image = clock.time("decode", load_image, record.path)
            for view in views:
                x = image
                for step in view.transforms:
                    x = clock.time(_step_name(step), step, x)
            clock.next_image()
    return clock.ms()


def after_steps(pixels: list[torch.Tensor], views: list[TrainView], repeats: int) -> dict[str, float]:
    """ms per image of each random step of :meth:`TrainView.from_resized` (tensor jitter)."""
    clock = Clock()
    for _ in range(repeats):
        for p in pixels:
            for view in views:
                crop = clock.time("pad + crop + flip (uint8)", view._crop_flip, p)
                x = clock.time("to float", view._to_float, crop)
                if view.jitter is not None:
                    x = clock.time("colour jitter", view.jitter, x)
                x = clock.time("Normalize", view._normalize_, x)
                x = clock.time("ChannelRandomErasing", view.erasing, x)
                if view.channel_step is not None:
                    x = clock.time(type(view.channel_step).__name__, view.channel_step, x)
            clock.next_image()
    return clock.ms()


def _step_name(step) -> str:
    name = type(step).__name__
    return "colour jitter" if "ColorJitter" in name else name


def end_to_end(dataset: TrainDataset, repeats: int) -> float:
    """ms per image of ``dataset[i]`` (all the modality's views; median over reads)."""
    clock = Clock()
    for _ in range(repeats):
        for i in range(len(dataset)):
            clock.time("read", dataset.__getitem__, i)
            clock.next_image()
    return clock.ms()["read"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="JPEGs per modality")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jitter", default="tensor", choices=("pil", "tensor"), help="the after pipeline's jitter")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    args = parser.parse_args()
    torch.set_num_threads(1)
    h, w = args.height, args.width
    with tempfile.TemporaryDirectory() as tmp:
        records = write_jpegs(Path(tmp), args.images)
        by_mod = {m: [r for r in records if r.modality == m] for m in (VISIBLE, INFRARED)}
        old = {"visible": visible_views(h, w), "infrared": infrared_views(h, w, stage=1),
               "infrared stage 2": infrared_views(h, w, stage=2)}
        new = {"visible": visible_views(h, w, jitter=args.jitter),
               "infrared": infrared_views(h, w, stage=1, jitter=args.jitter),
               "infrared stage 2": infrared_views(h, w, stage=2, jitter=args.jitter)}
        mod_of = {"visible": VISIBLE, "infrared": INFRARED, "infrared stage 2": INFRARED}
        rows_before = {k: before(by_mod[mod_of[k]], v, args.repeats) for k, v in old.items()}
        pixels = {m: [old["visible"][0].resize(load_image(r.path)) for r in rs] for m, rs in by_mod.items()}
        rows_after = {k: after_steps(pixels[mod_of[k]], v, args.repeats) for k, v in new.items()}
        fill_ms, totals = {}, {}
        for key, views in new.items():
            rs = by_mod[mod_of[key]]
            cache = ResizedCache(len(rs), h, w)
            dataset = TrainDataset(rs, {mod_of[key]: views}, resized=cache)
            fill_ms[key] = end_to_end(dataset, 1)  # the first reads fill the cache
            totals[key] = end_to_end(dataset, args.repeats)
            totals[key + " (no cache)"] = end_to_end(TrainDataset(rs, {mod_of[key]: views}), 1)
    steps = ["decode", "Resize", "Pad", "RandomCrop", "RandomHorizontalFlip", "pad + crop + flip (uint8)", "to float",
             "colour jitter", "ToTensor", "Normalize", "ChannelRandomErasing", "ChannelExchange", "ChannelAdaptiveGray"]
    print(f"Training loader, {h}×{w}, pad 10, one torch thread; CPU: {cpu_model()}; torch {torch.__version__}; "
          f"{args.images} JPEGs per modality × {args.repeats}; after = resized-image cache + {args.jitter} jitter\n")
    print("ms per image (all the image's views) | " + " | ".join(f"{k} before | {k} after" for k in old))
    print("|---" * (1 + 2 * len(old)) + "|")
    for step in steps:
        cells = []
        for key in old:
            b, a = rows_before[key].get(step), rows_after[key].get(step)
            cells += ["–" if b is None else f"{b:.3f}", "–" if a is None else f"{a:.3f}"]
        if any(c != "–" for c in cells):
            print(f"| {step} | " + " | ".join(cells) + " |")
    sums = []
    for key in old:
        sums += [f"{sum(rows_before[key].values()):.3f}", f"{totals[key]:.3f}"]
    print("| **total** (after: TrainDataset[i] end to end, cache filled) | " + " | ".join(sums) + " |")
    print()
    for key in old:
        print(f"{key}: cache fill (decode + resize, once a run) {fill_ms[key]:.3f} ms an image; "
              f"without the cache {totals[key + ' (no cache)']:.3f} ms an image")
    core_s_before = BATCH * (sum(rows_before["visible"].values()) + sum(rows_before["infrared"].values())) / 1e3
    core_s = BATCH * (totals["visible"] + totals["infrared"]) / 1e3
    stage2 = 2 * BATCH * (totals["visible"] + totals["infrared stage 2"]) / 1e3
    print(f"before: {core_s_before:.3f} core-seconds per sysu iteration (stage 1 batch: 128 visible + 128 infrared)")
    print(f"stage 2 (two batches, infrared without jitter), after: {stage2:.3f} core-seconds per iteration")
    print(f"loader: {core_s:.3f} core-seconds per sysu iteration")


if __name__ == "__main__":
    main()
