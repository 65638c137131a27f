"""Benchmark: where `bmil demo`'s time goes, phase by phase (a Markdown table).

Runs the demo (the ``demo`` preset, any ``section.key=value`` overrides after the options)
with timers around the trainer's phases: set-up (dataset generation, model), training-set
feature extraction, clustering, batch assembly (image decoding/caching and augmentation),
forward, backward + optimiser step, memory updates, test-set feature extraction, metric
computation, checkpoint writes, and the demo's final clustering comparison. Wall and CPU
seconds are both printed: CPU seconds of the process move little when other jobs share the
machine, wall seconds do. Phases nest (forward inside a training epoch); the table lists each
phase by its own time, "other" is what no timer covers.

    .venv/bin/python benchmarks/demo_profile.py --out /tmp/demo-profile
    .venv/bin/python benchmarks/demo_profile.py --out /tmp/p train.stage1_epochs=4 train.stage2_epochs=2
    # an AVX-512 CPU restricted to AVX2 kernels (torch's own and oneDNN's convolutions):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/demo_profile.py --out /tmp/p2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

from bmil.commands import demo as demo_mod
from bmil.commands import preset_path
from bmil.config import load_config
from bmil.data import images as images_mod
from bmil.engine import run as run_mod
from bmil.engine import trainer as trainer_mod
from bmil.evaluation import protocols as protocols_mod
from bmil.memory import PrototypeMemory


class Clock:
    """Exclusive wall / CPU seconds per phase (a nested phase's time is not its parent's)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        frame = [name, time.perf_counter(), time.process_time(), 0.0, 0.0]  # name, t0, c0, child wall, child cpu
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            wall = time.perf_counter() - frame[1]
            cpu = time.process_time() - frame[2]
            self.wall[name] += wall - frame[3]
            self.cpu[name] += cpu - frame[4]
            self.calls[name] += 1
            if self.stack:
                self.stack[-1][3] += wall
                self.stack[-1][4] += cpu

    def wrap(self, owner, attribute: str, name) -> None:
        """Time every call of ``owner.attribute``; ``name`` is a string or f(args, kwargs) -> str."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            label = name(args, kwargs) if callable(name) else name
            with self.phase(label):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def _extract_phase(args, kwargs) -> str:
    desc = kwargs.get("desc", "")
    return "test-set features" if "test" in desc else "training-set features (clustering)"


def instrument(clock: Clock) -> None:
    T = trainer_mod.Trainer
    clock.wrap(T, "__init__", "set-up (data, model)")
    clock.wrap(T, "extract", _extract_phase)
    clock.wrap(T, "associate", "clustering")
    clock.wrap(T, "association_stats", "pseudo-label statistics")
    clock.wrap(T, "train_epoch", "training epoch: loaders, sampler, other")
    clock.wrap(images_mod.TrainDataset, "__getitem__", "batch images: decode/cache + augmentation")
    clock.wrap(run_mod.Run, "forward", "forward")
    clock.wrap(run_mod.Run, "step", "backward + optimiser step")
    clock.wrap(PrototypeMemory, "update", "memory updates")
    clock.wrap(PrototypeMemory, "from_features", "memory set-up")
    clock.wrap(T, "evaluate", "evaluation: metrics, trial set-up")
    clock.wrap(protocols_mod, "evaluate", "evaluation: metrics, trial set-up")
    clock.wrap(trainer_mod, "save_checkpoint", "checkpoint writes")
    clock.wrap(demo_mod, "clustering_ari", "demo: plain vs modality-aware clustering")


PER_EPOCH = {"training-set features (clustering)", "clustering", "pseudo-label statistics", "forward",
             "backward + optimiser step", "memory updates", "memory set-up", "training epoch: loaders, sampler, other",
             "batch images: decode/cache + augmentation", "checkpoint writes"}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = "AVX-512" if "avx512f" in out else "AVX2" if "avx2" in out else "no AVX2"
    # ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 make an AVX-512 CPU run AVX2 kernels.
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{model}, flags {flags}, torch kernels {torch.backends.cpu.get_cpu_capability()}"
            + (f", oneDNN up to {onednn}" if onednn else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bmil-demo-profile", help="run folder (removed contents are not reused)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo preset")
    args = parser.parse_args()
    cfg = load_config(preset_path("demo"), [*args.overrides, f"output={args.out}"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    clock = Clock()
    instrument(clock)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with clock.phase("other"):
        summary = demo_mod.run_demo(cfg, progress=False)
    total_wall, total_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    epochs = cfg.train.stage1_epochs + cfg.train.stage2_epochs
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; {epochs} epochs × "
          f"{cfg.train.iterations} iterations; overrides: {' '.join(args.overrides) or 'none'}\n")
    print("| phase | calls | wall s | CPU s | share of wall | grows with epochs |")
    print("|---|---:|---:|---:|---:|---|")
    for name in sorted(clock.wall, key=clock.wall.get, reverse=True):
        grows = "yes" if name in PER_EPOCH else ("with evaluations" if "evaluation" in name or "test-set" in name
                                                 else "no")
        print(f"| {name} | {clock.calls[name]} | {clock.wall[name]:.1f} | {clock.cpu[name]:.1f} | "
              f"{100 * clock.wall[name] / total_wall:.0f} % | {grows} |")
    print(f"| **total** | | **{total_wall:.1f}** | **{total_cpu:.1f}** | 100 % | |")
    print(f"\nstage 1 R1/mAP {100 * summary['stage1.rank1']:.1f}/{100 * summary['stage1.mAP']:.1f}, "
          f"stage 2 {100 * summary['stage2.rank1']:.1f}/{100 * summary['stage2.mAP']:.1f}, "
          f"ARI plain {summary['clustering.ari_plain']:.3f} / aware {summary['clustering.ari_modality_aware']:.3f}")


if __name__ == "__main__":
    main()
