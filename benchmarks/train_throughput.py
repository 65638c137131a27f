"""Benchmark: training-step throughput (images/s) of the stage-2 iteration.

One stage-2 iteration as the trainer runs it with ``train.separate_global_step`` (the
release's default): an intra step (visible P×K with two views + infrared P×K, one forward,
hybrid InfoNCE against both modalities' memories, backward, Adam, momentum update) and a
global step (same batch shape, split-and-contrast loss against the global memory). Inputs
are random tensors already on the device, so this is the model's cost, not decoding
(see extract_throughput.py for the loader side). Memories hold SYSU-MM01-like cluster
counts. Warm-up iterations are not timed. Prints a Markdown table.

    .venv/bin/python benchmarks/train_throughput.py --ids 2 --instances 4 --steps 2    # CPU
    .venv/bin/python benchmarks/train_throughput.py --device cuda --ids 8 --instances 16 --steps 20
    # the demo's network and batch, and its cheaper variants (model.width, model.last_stride):
    .venv/bin/python benchmarks/train_throughput.py --depth 18 --no-non-local --height 64 --width 32 \
        --ids 8 --instances 4 --steps 10 --channels 64 32 --last-stride 1 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from bmil.engine.run import adam
from bmil.inference import resolve_device
from bmil.losses import global_loss, intra_loss
from bmil.memory import PrototypeMemory, positive_mask
from bmil.model import build_model

CLUSTERS = {"visible": 500, "infrared": 400, "global": 450}


def random_memory(clusters: int, dim: int, device: torch.device, gen: torch.Generator) -> PrototypeMemory:
    feats = F.normalize(torch.randn(clusters, dim, generator=gen), dim=1).to(device)
    return PrototypeMemory.from_features(feats, torch.arange(clusters, device=device))


class Step:
    """One stage-2 iteration on fixed random batches."""

    def __init__(self, args: argparse.Namespace, device: torch.device, amp: bool) -> None:
        self.device, self.amp = device, amp and device.type == "cuda"
        self.model = build_model(depth=args.depth, non_local=not args.no_non_local, pretrained="none",
                                 width=args.channels, last_stride=args.last_stride).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = adam(list(self.model.parameters()), 3.5e-4, 5e-4)  # training's optimiser
        gen = torch.Generator().manual_seed(0)
        dim = self.model.feat_dim
        self.memories = {name: random_memory(c, dim, device, gen) for name, c in CLUSTERS.items()}
        n = args.ids * args.instances
        self.images = torch.randn(3 * n, 3, args.height, args.width, generator=gen).to(device)
        if device.type == "cuda":
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.modality = torch.cat([torch.zeros(2 * n), torch.ones(n)]).long().to(device)
        ids = torch.arange(args.ids).repeat_interleave(args.instances)
        self.visible_labels = ids.repeat(2).to(device)  # both views of an image share its label
        self.infrared_labels = ids.to(device)
        self.n = n

    def _features(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            feats = self.model(self.images, self.modality)
        feats = F.normalize(feats.float(), dim=1)
        return feats[: 2 * self.n], feats[2 * self.n :]

    def _apply(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def __call__(self) -> None:
        vis, ir = self._features()
        m = self.memories
        intra = intra_loss(vis, m["visible"], self.visible_labels) + intra_loss(ir, m["infrared"], self.infrared_labels)
        self._apply(intra)
        m["visible"].update(vis.detach(), self.visible_labels)
        m["infrared"].update(ir.detach(), self.infrared_labels)

        vis, ir = self._features()
        sub_to_cluster = torch.arange(CLUSTERS["global"], device=self.device)
        loss = 0.5 * (global_loss(vis, m["global"], positive_mask(self.visible_labels, sub_to_cluster))
                      + global_loss(ir, m["global"], positive_mask(self.infrared_labels, sub_to_cluster)))
        self._apply(loss)
        m["global"].update(torch.cat([vis, ir]).detach(), torch.cat([self.visible_labels, self.infrared_labels]))


def measure(args: argparse.Namespace, device: torch.device, amp: bool) -> dict:
    step = Step(args, device, amp)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    # Images through the network per iteration: two forwards of 3·P·K images each.
    return {"amp": step.amp, "seconds": seconds, "rate": 2 * 3 * step.n / seconds, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ids", type=int, default=2, help="P: pseudo identities per batch and modality")
    parser.add_argument("--instances", type=int, default=4, help="K: images per identity")
    parser.add_argument("--steps", type=int, default=2, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--no-non-local", action="store_true")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--channels", type=int, nargs="+", default=[64], help="model.width values to compare")
    parser.add_argument("--last-stride", type=int, nargs="+", default=[1], help="model.last_stride values")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    rows = []
    for channels in args.channels:
        for last_stride in args.last_stride:
            variant = argparse.Namespace(**{**vars(args), "channels": channels, "last_stride": last_stride})
            for amp in (False, True) if device.type == "cuda" else (False,):
                rows.append({"channels": channels, "last_stride": last_stride, **measure(variant, device, amp)})
    n = args.ids * args.instances
    print(f"Stage-2 training iteration (intra step + global step), ResNet-{args.depth}"
          f"{'' if args.no_non_local else ' + non-local'}, {args.height}×{args.width}; "
          f"P×K = {args.ids}×{args.instances} per modality = {3 * n} images per forward "
          f"(visible ×2 views + infrared); device: {name}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| device | model.width | model.last_stride | P×K | bf16 autocast | s / iteration | "
          "images/s (2 forwards) | peak GPU memory |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = f"{row['peak']:.1f} GiB" if row["peak"] == row["peak"] else "–"
        print(f"| {name} | {row['channels']} | {row['last_stride']} | {args.ids}×{args.instances} | "
              f"{'yes' if row['amp'] else 'no'} | {row['seconds']:.3f} | {row['rate']:.1f} | {peak} |")


if __name__ == "__main__":
    main()
