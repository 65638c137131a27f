"""Benchmark: feature-extraction throughput (images/s) of the training-epoch path.

Writes random JPEG images (288×144 by default, half visible, half infrared) to a temporary
folder and runs ``bmil.inference.extract_features`` on them exactly as a training epoch
does: decode, resize, normalise, DataLoader, channels_last, flip-averaged forward, bf16
autocast on CUDA when ``--amp``. The first batch is a warm-up and is not timed. Prints a
Markdown table.

    .venv/bin/python benchmarks/extract_throughput.py --images 64 --batch 16           # CPU
    .venv/bin/python benchmarks/extract_throughput.py --device cuda --images 4096 --batch 256 --workers 8
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bmil.inference import extract_features, resolve_device
from bmil.model import build_model
from bmil.records import Record


def write_images(folder: Path, count: int, height: int, width: int) -> list[Record]:
    """``count`` random JPEGs (smooth noise, so they compress like photos) and their records."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        records.append(Record(path=str(path), pid=i // 8, camid=1 + i % 2, modality=i % 2))
    return records


def measure(args: argparse.Namespace, device: torch.device, amp: bool, records: list[Record]) -> dict:
    model = build_model(depth=args.depth, non_local=not args.no_non_local, pretrained="none").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    common = dict(height=args.height, width=args.width, batch_size=args.batch, device=device, flip=True,
                  workers=args.workers, amp=amp, progress=False)
    extract_features(model, records[: args.batch], **common)  # warm-up (kernels, allocator, cudnn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    feats = extract_features(model, records, **common)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert feats.shape[0] == len(records)
    return {"amp": amp and device.type == "cuda", "seconds": seconds, "rate": len(records) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=64, help="timed images (after one warm-up batch)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--no-non-local", action="store_true")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    with tempfile.TemporaryDirectory() as tmp:
        records = write_images(Path(tmp), max(args.images, args.batch), args.height, args.width)
        rows = [measure(args, device, amp, records) for amp in ((False, True) if device.type == "cuda" else (False,))]
    print(f"Feature extraction, ResNet-{args.depth}{'' if args.no_non_local else ' + non-local'}, "
          f"{args.height}×{args.width}, flip-averaged; device: {name}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {args.workers} loader workers\n")
    print("| device | batch | bf16 autocast | images | seconds | images/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {name} | {args.batch} | {'yes' if row['amp'] else 'no'} | {len(records)} | "
              f"{row['seconds']:.1f} | {row['rate']:.1f} |")


if __name__ == "__main__":
    main()
