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
from torchvision import transforms as T
from torchvision.transforms import functional as F

from bmil.data.images import TrainDataset, load_image
from bmil.data.resized_cache import ResizedCache
from bmil.data.transforms import TrainView, infrared_views, visible_views
from bmil.records import INFRARED, VISIBLE, Record

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
    """Per-image CPU seconds of this thread (core-seconds: the time another process holds
    the core is not counted) in named steps, median over images (a step run twice for one
    image, e.g. for two views, adds up)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.image: dict[str, float] = defaultdict(float)

    def time(self, name: str, fn, *args):
        start = time.thread_time()
        out = fn(*args)
        self.image[name] += time.thread_time() - start
        return out

    def next_image(self) -> None:
        for name, seconds in self.image.items():
            self.calls[name].append(seconds)
        self.image.clear()

    def ms(self) -> dict[str, float]:
        return {name: 1e3 * float(np.median(values)) for name, values in self.calls.items()}


def _step_name(step) -> str:
    name = type(step).__name__
    return "colour jitter" if "ColorJitter" in name else name


def _pil_jitter(jitter, crop: torch.Tensor) -> torch.Tensor:
    return F.to_tensor(jitter(Image.fromarray(crop.numpy())))


def before_steps(clock: Clock, path: str, views: list[TrainView]) -> None:
    """Each step of ``T.Compose(view.transforms)`` for every view, the decode once."""
    image = clock.time("decode", load_image, path)
    for view in views:
        x = image
        for step in view.transforms:
            x = clock.time(_step_name(step), step, x)
    clock.next_image()


def after_steps(clock: Clock, pixels: torch.Tensor, views: list[TrainView]) -> None:
    """Each random step of :meth:`TrainView.from_resized` for every view."""
    for view in views:
        crop = clock.time("pad + crop + flip (uint8)", view._crop_flip, pixels)
        if view.jitter is not None and "Tensor" not in type(view.jitter).__name__:  # PIL, then to tensor
            x = clock.time("colour jitter", _pil_jitter, view.jitter, crop)
        else:
            x = clock.time("to float", view._to_float, crop)
            if view.jitter is not None:
                x = clock.time("colour jitter", view.jitter, x)
        x = clock.time("Normalize", view._normalize_, x)
        x = clock.time("ChannelRandomErasing", view.erasing, x)
        if view.channel_step is not None:
            x = clock.time(type(view.channel_step).__name__, view.channel_step, x)
    clock.next_image()


def measure(records: list[Record], old: list[TrainView], new: list[TrainView], modality: int,
            repeats: int) -> dict:
    """Interleaved, image by image (so that a busy moment of a shared machine hits both
    alike): the old pipeline's steps and whole read (decode, every view as ``T.Compose``),
    the new pipeline's steps and whole ``TrainDataset`` read from a filled cache, and the
    new read without the cache. ms per image, medians."""
    h, w = new[0].height, new[0].width
    cache = ResizedCache(len(records), h, w)
    cached = TrainDataset(records, {modality: new}, resized=cache)
    uncached = TrainDataset(records, {modality: new})
    fill = Clock()
    for i in range(len(records)):
        fill.time("fill", cached.__getitem__, i)  # the first reads fill the cache
        fill.next_image()
    steps_before, steps_after, reads = Clock(), Clock(), Clock()
    for _ in range(repeats):
        for i, record in enumerate(records):
            before_steps(steps_before, record.path, old)
            after_steps(steps_after, cache.pixels[i], new)
            reads.time("before", lambda path=record.path: [T.Compose(v.transforms)(load_image(path)) for v in old])
            reads.time("after", cached.__getitem__, i)
            reads.time("after, no cache", uncached.__getitem__, i)
            reads.next_image()
    return {"before": steps_before.ms(), "after": steps_after.ms(), "reads": reads.ms(),
            "fill": fill.ms()["fill"]}


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
    old = {"visible": visible_views(h, w), "infrared": infrared_views(h, w, stage=1),
           "infrared stage 2": infrared_views(h, w, stage=2)}
    new = {"visible": visible_views(h, w, jitter=args.jitter),
           "infrared": infrared_views(h, w, stage=1, jitter=args.jitter),
           "infrared stage 2": infrared_views(h, w, stage=2, jitter=args.jitter)}
    mod_of = {"visible": VISIBLE, "infrared": INFRARED, "infrared stage 2": INFRARED}
    with tempfile.TemporaryDirectory() as tmp:
        records = write_jpegs(Path(tmp), args.images)
        by_mod = {m: [r for r in records if r.modality == m] for m in (VISIBLE, INFRARED)}
        rows = {k: measure(by_mod[mod_of[k]], old[k], new[k], mod_of[k], args.repeats) for k in old}
    steps = ["decode", "Resize", "Pad", "RandomCrop", "RandomHorizontalFlip", "pad + crop + flip (uint8)", "to float",
             "colour jitter", "ToTensor", "Normalize", "ChannelRandomErasing", "ChannelExchange", "ChannelAdaptiveGray"]
    print(f"Training loader, {h}×{w}, pad 10, one torch thread; CPU: {cpu_model()}; torch {torch.__version__}; "
          f"{args.images} JPEGs per modality × {args.repeats}; after = resized-image cache + {args.jitter} jitter; "
          "thread CPU time, medians over images, before and after interleaved image by image\n")
    print("| ms per image (all its views) | " + " | ".join(f"{k} before | {k} after" for k in old) + " |")
    print("|---" * (1 + 2 * len(old)) + "|")
    for step in steps:
        cells = []
        for key in old:
            b, a = rows[key]["before"].get(step), rows[key]["after"].get(step)
            cells += ["–" if b is None else f"{b:.3f}", "–" if a is None else f"{a:.3f}"]
        if any(c != "–" for c in cells):
            print(f"| {step} | " + " | ".join(cells) + " |")
    cells = []
    for key in old:
        cells += [f"{rows[key]['reads']['before']:.3f}", f"{rows[key]['reads']['after']:.3f}"]
    print("| **whole read** (before: decode + each view's T.Compose; after: TrainDataset[i], cache filled) | "
          + " | ".join(cells) + " |")
    print()
    for key in old:
        r = rows[key]
        print(f"{key}: cache fill (first read: decode + resize + views) {r['fill']:.3f} ms an image, once a run; "
              f"after without the cache {r['reads']['after, no cache']:.3f} ms an image")

    def core_s(when: str, infrared: str = "infrared", batches: int = 1) -> float:
        return batches * BATCH * (rows["visible"]["reads"][when] + rows[infrared]["reads"][when]) / 1e3

    before, after = core_s("before"), core_s("after")
    print(f"stage 2 (two batches, infrared without jitter): before {core_s('before', 'infrared stage 2', 2):.3f}, "
          f"after {core_s('after', 'infrared stage 2', 2):.3f} core-seconds per iteration")
    print(f"before: {before:.3f} core-seconds per sysu iteration (128 visible + 128 infrared); "
          f"after / before = {after / before:.2f}")
    print(f"loader: {after:.3f} core-seconds per sysu iteration")


if __name__ == "__main__":
    main()
