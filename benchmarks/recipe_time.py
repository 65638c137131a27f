"""Benchmark: the time of the whole SYSU-MM01 recipe (50 + 50 epochs) on one device.

Times a few repetitions of each piece of an epoch at SYSU-MM01's sizes and scales them up:

- training iterations, stage 1 (intra step) and stage 2 (intra step + global step), with the
  real loader: synthetic JPEGs of SYSU-MM01's sizes (90-200 × 250-480 px), the sysu
  preset's training views (two visible views, the stage's infrared view), the camera-aware
  P×K sampler (8 × 16 per modality), DataLoader workers; by default with the resized-image
  cache (filled first; its fill is a piece of its own) and ``data.jitter=tensor``
  (``--no-cache``, ``--jitter pil``: the preset's defaults); the release network (ResNet-50,
  non-local, 288×144), fused Adam; fp32 and bf16 autocast (CUDA only);
- the loader alone (one stage-1 batch pair, as configured and with PIL jitter and no
  cache) and a loader's start (first batch of an epoch);
- feature extraction (flip-averaged) of what each epoch clusters (stage 1: the visible half
  and the infrared images, 23,038; stage 2: all 34,167) and of the test images at each
  evaluation, timed on a few thousand images and scaled;
- the clustering calls of an epoch (:func:`bmil.cluster.jaccard_distance` + DBSCAN, eps 0.6)
  on synthetic features with cluster structure: stage 1 the visible half (11,129, plain)
  and the infrared images (11,909, plain); stage 2 adds the global call (23,038,
  modality-aware);
- the 10-trial SYSU-MM01 evaluation (3,803 queries against single-shot galleries).

Prints a table of pieces and the estimated time of the recipe beside the release's (about
15 h on its authors' 2-GPU machine). Every piece runs in its own try/except and is reported
as FAIL (the others continue); a piece that would start after ``--budget-s`` is SKIP.
Runs from a source checkout without installing bmil:

    PYTHONPATH=src python3 benchmarks/recipe_time.py --device cuda --out /tmp/recipe.json
    PYTHONPATH=src python3 benchmarks/recipe_time.py --smoke                      # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bmil.cluster import dbscan_labels, jaccard_distance
from bmil.data.images import TrainDataset
from bmil.data.resized_cache import ResizedCache
from bmil.data.sampler import PseudoIdentitySampler
from bmil.data.transforms import infrared_views, visible_views
from bmil.engine.forward import forward_batches
from bmil.engine.run import adam
from bmil.evaluation import evaluate
from bmil.inference import extract_features, resolve_device
from bmil.losses import global_loss, intra_loss
from bmil.memory import PrototypeMemory, positive_mask
from bmil.model import build_model
from bmil.records import Record

VISIBLE, INFRARED = 0, 1
# SYSU-MM01 (train = train + val ids) and the recipe.
TRAIN_IMAGES = 34_167
VISIBLE_HALF, INFRARED_IMAGES = 11_129, 11_909
GLOBAL_IMAGES = VISIBLE_HALF + INFRARED_IMAGES
QUERIES, TEST_IDS, GALLERY_CAMERAS, TRIALS = 3_803, 96, 4, 10
EPOCHS, ITERATIONS, EVAL_EVERY = (50, 50), 200, 2
# The release's figures (its logs, 2 GPUs): s / iteration, s / Jaccard call, hours a run.
RELEASE = {"stage1_iteration": 0.87, "stage2_iteration": 2.3, "jaccard": (55, 97), "hours": 15.0}


@dataclass
class Sizes:
    """Everything the full run and ``--smoke`` size differently."""

    height: int = 288
    width: int = 144
    depth: int = 50
    channels: int = 64            # model.width (64: the release network)
    num_ids: int = 8
    num_instances: int = 16
    jpeg_ids: int = 32            # synthetic pseudo identities per modality
    jpeg_per_id: int = 12
    jpeg_width: tuple[int, int] = (90, 200)
    jpeg_height: tuple[int, int] = (250, 480)
    iterations: int = 6           # timed iterations per (stage, precision), after one warm-up
    extract_images: int = 2048
    extract_batch: int = 256
    cluster: dict[str, int] = field(default_factory=lambda: {
        "visible half": VISIBLE_HALF, "infrared": INFRARED_IMAGES, "global": GLOBAL_IMAGES})
    feat_dim: int = 2048
    queries: int = QUERIES
    gallery: int = TEST_IDS * GALLERY_CAMERAS
    k1: int = 30
    pad: int = 10


SMOKE = Sizes(height=32, width=16, depth=18, channels=8, num_ids=2, num_instances=2, jpeg_ids=3, jpeg_per_id=4,
              jpeg_width=(12, 24), jpeg_height=(30, 56), iterations=1, extract_images=16, extract_batch=8,
              cluster={"visible half": 120, "infrared": 130, "global": 250}, feat_dim=64, queries=60,
              gallery=24, k1=10, pad=2)


@dataclass
class Piece:
    """One timed piece: ``seconds`` per ``unit``; ``per_recipe`` units in the whole recipe."""

    name: str
    unit: str
    seconds: float | None = None
    per_recipe: float = 0.0
    status: str = "ok"
    note: str = ""

    @property
    def total(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.per_recipe


class Bench:
    """Runs pieces under a time budget, each guarded."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget
        self.pieces: list[Piece] = []

    def run(self, piece: Piece, fn: Callable[[], float]) -> Piece:
        self.pieces.append(piece)
        if time.perf_counter() - self.start > self.budget:
            piece.status = "SKIP"
            piece.note = f"over --budget-s {self.budget:g}"
            return piece
        try:
            piece.seconds = fn()
        except Exception as error:  # noqa: BLE001 - a failed piece is reported, the rest continue
            piece.status = "FAIL"
            piece.note = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            traceback.print_exc()
        return piece


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- synthetic data
def write_jpegs(folder: Path, sizes: Sizes) -> list[Record]:
    """Smooth random JPEGs of SYSU-MM01-like sizes: ``jpeg_ids`` people × ``jpeg_per_id``
    images per modality, visible cameras 1, 2, 4, 5 and infrared 3, 6."""
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    cams = {VISIBLE: (1, 2, 4, 5), INFRARED: (3, 6)}
    for modality in (VISIBLE, INFRARED):
        for pid in range(sizes.jpeg_ids):
            for k in range(sizes.jpeg_per_id):
                w = int(rng.integers(sizes.jpeg_width[0], sizes.jpeg_width[1] + 1))
                h = int(rng.integers(sizes.jpeg_height[0], sizes.jpeg_height[1] + 1))
                small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
                if modality == INFRARED:
                    small[..., 1:] = small[..., :1]
                image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
                path = folder / f"m{modality}_{pid:03d}_{k:02d}.jpg"
                image.save(path, quality=90)
                cam = cams[modality][k % len(cams[modality])]
                records.append(Record(path=str(path), pid=pid, camid=cam, modality=modality))
    return records


def clustered_features(n: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    """[n, dim] float32 rows of norm about 0.95 (flip-averaged features are shorter than 1)
    around n/20 random centres, so DBSCAN finds clusters."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, n // 20), dim, generator=gen), dim=1)
    assign = torch.randint(len(centres), (n,), generator=gen)
    feats = F.normalize(centres[assign] + 0.6 * torch.randn(n, dim, generator=gen) / dim**0.5, dim=1)
    return (0.95 * feats).to(device)


# ---------------------------------------------------------------- training
class Training:
    """The recipe's training iteration on loader batches (stage 1 or 2, fp32 or bf16)."""

    def __init__(self, records: list[Record], sizes: Sizes, device: torch.device, workers: int,
                 jitter: str = "tensor", cache: bool = True) -> None:
        self.sizes, self.device, self.workers, self.jitter = sizes, device, workers, jitter
        self.records = records
        self.index = {m: [i for i, r in enumerate(records) if r.modality == m] for m in (VISIBLE, INFRARED)}
        self.caches = {m: ResizedCache(len(ix), sizes.height, sizes.width) for m, ix in self.index.items()} \
            if cache else {}
        self.model = build_model(depth=sizes.depth, non_local=True, pretrained="none", width=sizes.channels).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = adam(list(self.model.parameters()), 3.5e-4, 5e-4)
        gen = torch.Generator().manual_seed(0)
        dim = self.model.feat_dim
        ids = sizes.jpeg_ids

        def memory(clusters: int) -> PrototypeMemory:
            feats = F.normalize(torch.randn(clusters, dim, generator=gen), dim=1).to(device)
            return PrototypeMemory.from_features(feats, torch.arange(clusters, device=device))

        self.memories = {"visible": memory(ids), "infrared": memory(ids), "global": memory(2 * ids)}
        # Global sub-clusters: person p's visible prototype is 2p, its infrared one 2p + 1.
        self.sub_to_cluster = torch.arange(2 * ids, device=device) // 2

    def fill_cache(self) -> float:
        """Seconds per image to fill the resized-image caches (decode + resize), done once a
        run (its first epoch, spread over the loader workers)."""
        start = time.perf_counter()
        for m, ix in self.index.items():
            dataset = self.dataset(m, 1)
            for i in range(len(ix)):
                dataset[i]
        return (time.perf_counter() - start) / len(self.records)

    def dataset(self, modality: int, stage: int, jitter: str | None = None, cached: bool = True) -> TrainDataset:
        s, jitter = self.sizes, jitter or self.jitter
        records = [self.records[i] for i in self.index[modality]]
        views = {VISIBLE: visible_views(s.height, s.width, pad=s.pad, jitter=jitter),
                 INFRARED: infrared_views(s.height, s.width, pad=s.pad, stage=stage, jitter=jitter)}
        return TrainDataset(records, views, resized=self.caches.get(modality) if cached else None)

    def loader(self, modality: int, stage: int, seed: int, dataset: TrainDataset | None = None,
               ) -> torch.utils.data.DataLoader:
        s = self.sizes
        records = [self.records[i] for i in self.index[modality]]
        labels = np.array([r.pid for r in records])
        cameras = np.array([r.camid for r in records])
        sampler = PseudoIdentitySampler(labels, s.num_ids, s.num_instances, s.iterations + 2, seed=seed,
                                         cameras=cameras)
        return torch.utils.data.DataLoader(
            dataset or self.dataset(modality, stage), batch_size=s.num_ids * s.num_instances, sampler=sampler,
            drop_last=True,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
        )

    def labels(self, modality: int) -> np.ndarray:
        return np.array([self.records[i].pid for i in self.index[modality]])

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def intra(self, batches: dict, amp: bool) -> None:
        labels = {m: self.labels(m) for m in batches}
        out = forward_batches(self.model, batches, labels, self.device, amp=amp)
        vis, ir = out[VISIBLE], out[INFRARED]
        m = self.memories
        self._step(intra_loss(vis.features, m["visible"], vis.targets)
                   + intra_loss(ir.features, m["infrared"], ir.targets))
        m["visible"].update(vis.features.detach(), vis.targets)
        m["infrared"].update(ir.features.detach(), ir.targets)

    def global_step(self, batches: dict, amp: bool) -> None:
        labels = {m: self.labels(m) for m in batches}
        out = forward_batches(self.model, batches, labels, self.device, amp=amp)
        vis, ir = out[VISIBLE], out[INFRARED]
        m = self.memories["global"]
        loss = 0.5 * (global_loss(vis.features, m, positive_mask(vis.targets, self.sub_to_cluster))
                      + global_loss(ir.features, m, positive_mask(ir.targets, self.sub_to_cluster)))
        self._step(loss)
        m.update(torch.cat([vis.features, ir.features]).detach(),
                 torch.cat([2 * vis.targets, 2 * ir.targets + 1]))

    def time(self, stage: int, amp: bool) -> tuple[float, float]:
        """(seconds of the first iteration, including the loaders' start; seconds per
        later iteration)."""
        loaders = [iter(self.loader(m, stage, seed)) for seed, m in enumerate((VISIBLE, INFRARED))]
        if stage == 2:
            loaders += [iter(self.loader(m, stage, 10 + seed)) for seed, m in enumerate((VISIBLE, INFRARED))]

        def iteration() -> None:
            self.intra({VISIBLE: next(loaders[0]), INFRARED: next(loaders[1])}, amp)
            if stage == 2:
                self.global_step({VISIBLE: next(loaders[2]), INFRARED: next(loaders[3])}, amp)

        start = time.perf_counter()
        iteration()
        sync(self.device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(self.sizes.iterations):
            iteration()
        sync(self.device)
        return first, (time.perf_counter() - start) / self.sizes.iterations

    def loader_only(self, jitter: str | None = None, cached: bool = True) -> float:
        """Seconds per stage-1 batch pair drawn from warm loaders (no network)."""
        loaders = [iter(self.loader(m, 1, seed, self.dataset(m, 1, jitter, cached)))
                   for seed, m in enumerate((VISIBLE, INFRARED))]
        for it in loaders:
            next(it)
        start = time.perf_counter()
        for _ in range(self.sizes.iterations):
            for it in loaders:
                next(it)
        return (time.perf_counter() - start) / self.sizes.iterations


# ---------------------------------------------------------------- the other pieces
def time_extraction(model: torch.nn.Module, records: list[Record], sizes: Sizes, device: torch.device,
                    workers: int, amp: bool) -> float:
    """Seconds per image of flip-averaged extraction (one warm-up batch not timed)."""
    pool = (records * (sizes.extract_images // len(records) + 1))[: sizes.extract_images]
    common = dict(height=sizes.height, width=sizes.width, batch_size=sizes.extract_batch, device=device,
                  flip=True, workers=workers, amp=amp, progress=False)
    extract_features(model, pool[: sizes.extract_batch], **common)
    sync(device)
    start = time.perf_counter()
    extract_features(model, pool, **common)
    sync(device)
    return (time.perf_counter() - start) / len(pool)


def time_clustering(n: int, sizes: Sizes, device: torch.device, modality_aware: bool) -> float:
    """Seconds of one Jaccard distance + DBSCAN call on ``n`` synthetic features."""
    feats = clustered_features(n, sizes.feat_dim, device, seed=n)
    modality = None
    if modality_aware:
        modality = np.zeros(n, dtype=np.int64)
        modality[n * VISIBLE_HALF // GLOBAL_IMAGES:] = 1
    sync(device)
    start = time.perf_counter()
    distance = jaccard_distance(feats, k1=sizes.k1, k2=6, modality=modality)
    dbscan_labels(distance, eps=0.6, min_samples=4)
    return time.perf_counter() - start


def time_evaluation(sizes: Sizes, trials: int) -> float:
    """Seconds of ``trials`` SYSU-MM01 trials: distances and scores (features given)."""
    gen = np.random.default_rng(0)
    ids = max(2, sizes.gallery // GALLERY_CAMERAS)
    query = gen.standard_normal((sizes.queries, sizes.feat_dim)).astype(np.float32)
    q_pids = gen.integers(0, ids, sizes.queries)
    q_cams = gen.choice([3, 6], sizes.queries)
    start = time.perf_counter()
    for _ in range(trials):
        gallery = gen.standard_normal((sizes.gallery, sizes.feat_dim)).astype(np.float32)
        g_pids = np.repeat(np.arange(ids), GALLERY_CAMERAS)[: sizes.gallery]
        g_cams = np.tile([1, 2, 4, 5], ids)[: sizes.gallery]
        distmat = 1.0 - query @ gallery.T
        evaluate(distmat, q_pids, g_pids, q_cams, g_cams, protocol="sysu")
    return time.perf_counter() - start


# ---------------------------------------------------------------- the recipe
def recipe_counts() -> dict[str, float]:
    """Units of each kind in the whole recipe (stage 1 then stage 2)."""
    s1, s2 = EPOCHS
    evals1 = len(range(0, s1 - 1, EVAL_EVERY))  # epochs 0, 2, ..., 48
    evals2 = len(range(0, s2 - 1, EVAL_EVERY))
    test_images = QUERIES + TRIALS * TEST_IDS * GALLERY_CAMERAS
    return {
        "s1_iterations": s1 * ITERATIONS, "s2_iterations": s2 * ITERATIONS,
        "s1_epochs": s1, "s2_epochs": s2,
        # Each epoch extracts only what its clustering reads: stage 1 the clustered visible
        # half and the infrared images, stage 2 every training image.
        "extract_images": s1 * GLOBAL_IMAGES + s2 * TRAIN_IMAGES
        + evals1 * (QUERIES + TEST_IDS * GALLERY_CAMERAS) + evals2 * test_images,
        "intra_calls": s1 + s2, "global_calls": s2,
        "eval_trials": evals1 * 1 + evals2 * TRIALS,
    }


def run_all(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    sizes = SMOKE if args.smoke else Sizes()
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only wait for each other
    if args.iterations:
        sizes.iterations = args.iterations
    workers = args.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    counts = recipe_counts()
    bench = Bench(args.budget_s)
    precisions = [False, True] if device.type == "cuda" else [False]
    with tempfile.TemporaryDirectory() as tmp:
        records = write_jpegs(Path(tmp), sizes)
        training = None

        def build() -> float:
            nonlocal training
            start = time.perf_counter()
            training = Training(records, sizes, device, workers, args.jitter, not args.no_cache)
            return time.perf_counter() - start

        bench.run(Piece("build network (once)", "run", per_recipe=1), build)
        if training is not None:
            if not args.no_cache:
                bench.run(Piece("resized-image cache fill (once, over the workers)", "image",
                                per_recipe=TRAIN_IMAGES / max(1, workers)), training.fill_cache)
            loader = f"{args.jitter} jitter{'' if args.no_cache else ' + resized-image cache'}"
            bench.run(Piece(f"loader only, stage-1 batch pair ({loader})", "iteration", per_recipe=0,
                            note="inside the iterations below, not added"), training.loader_only)
            bench.run(Piece("loader only, stage-1 batch pair (pil jitter, no cache)", "iteration", per_recipe=0,
                            note="for comparison, not added"), lambda: training.loader_only("pil", False))
            for amp in precisions:
                tag = "bf16" if amp else "fp32"
                for stage in (1, 2):
                    firsts: dict[str, float] = {}

                    def timed(stage: int = stage, amp: bool = amp, firsts: dict = firsts) -> float:
                        firsts["first"], per = training.time(stage, amp)
                        return per

                    piece = bench.run(Piece(f"stage-{stage} iteration, {tag}", "iteration",
                                            per_recipe=counts[f"s{stage}_iterations"]), timed)
                    if "first" in firsts and piece.seconds is not None:
                        bench.pieces.append(Piece(
                            f"stage-{stage} loaders' start, {tag}", "epoch", firsts["first"] - piece.seconds,
                            counts[f"s{stage}_epochs"], note="first iteration minus a later one"))
            for amp in precisions:
                tag = "bf16" if amp else "fp32"
                bench.run(Piece(f"extraction, flip, {tag}", "image", per_recipe=counts["extract_images"]),
                          lambda amp=amp: time_extraction(training.model, records, sizes, device, workers, amp))
        for name, n in sizes.cluster.items():
            aware = name == "global"
            calls = counts["global_calls"] if aware else counts["intra_calls"]
            bench.run(Piece(f"Jaccard + DBSCAN, {name} ({n:,}{', modality-aware' if aware else ''})", "call",
                            per_recipe=calls), lambda n=n, aware=aware: time_clustering(n, sizes, device, aware))
        bench.run(Piece(f"evaluation, {sizes.queries:,} queries × {sizes.gallery} gallery", "trial",
                        per_recipe=counts["eval_trials"]), lambda: time_evaluation(sizes, TRIALS) / TRIALS)
    loader = f"data.jitter={args.jitter}, resized-image cache {'off' if args.no_cache else 'on'}"
    return summarise(bench, device, sizes, workers, precisions, loader)


def summarise(bench: Bench, device: torch.device, sizes: Sizes, workers: int, precisions: list[bool],
              loader: str) -> dict:
    """Totals per precision: a piece tagged with the other precision is left out."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    totals = {}
    for amp in precisions:
        other = "fp32" if amp else "bf16"
        parts = [p for p in bench.pieces if not p.name.endswith(other) and p.total is not None]
        totals["bf16" if amp else "fp32"] = sum(p.total for p in parts) / 3600
    return {
        "device": name, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "loader_workers": workers, "loader": loader,
        "smoke": sizes is SMOKE,
        "pieces": [{"name": p.name, "unit": p.unit, "seconds_per_unit": p.seconds, "units": p.per_recipe,
                    "recipe_seconds": p.total, "status": p.status, "note": p.note} for p in bench.pieces],
        "recipe_hours": totals, "release_hours": RELEASE["hours"], "release": RELEASE,
        "benchmark_seconds": time.perf_counter() - bench.start,
        "complete": all(p.status == "ok" for p in bench.pieces),
    }


def print_table(result: dict) -> None:
    print(f"Recipe time (SYSU-MM01, {EPOCHS[0]} + {EPOCHS[1]} epochs × {ITERATIONS} iterations); "
          f"device: {result['device']}; torch {result['torch']}, {result['cpu_threads']} threads, "
          f"{result['loader_workers']} loader workers ({result['loader']})"
          f"{'; SMOKE sizes' if result['smoke'] else ''}\n")
    print("| piece | s / unit | units in recipe | recipe h | status |")
    print("|---|---|---|---|---|")
    for p in result["pieces"]:
        sec = "–" if p["seconds_per_unit"] is None else f"{p['seconds_per_unit']:.4g} / {p['unit']}"
        total = "–" if p["recipe_seconds"] is None else f"{p['recipe_seconds'] / 3600:.3f}"
        status = p["status"] + (f" ({p['note']})" if p["note"] else "")
        print(f"| {p['name']} | {sec} | {p['units']:,.0f} | {total} | {status} |")
    print()
    for tag, hours in result["recipe_hours"].items():
        print(f"estimated recipe, {tag}: {hours:.2f} h (release: ~{result['release_hours']:.0f} h on 2 GPUs)"
              + ("" if result["complete"] else "; some pieces missing, see the table"))
    r = result["release"]
    print(f"release (its logs, 2 GPUs): {r['stage1_iteration']} s a stage-1 iteration, {r['stage2_iteration']} s a "
          f"stage-2 iteration, {r['jaccard'][0]}-{r['jaccard'][1]} s a Jaccard call")
    print(f"benchmark took {result['benchmark_seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a test, a CPU)")
    parser.add_argument("--out", help="write the table as JSON to this path")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="start no piece after this many seconds (those left are SKIP)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: min(8, cores) on CUDA, as the sysu preset; 0 on a CPU)")
    parser.add_argument("--iterations", type=int, default=0, help="timed iterations per training piece")
    parser.add_argument("--jitter", default="tensor", choices=("pil", "tensor"), help="data.jitter of the loader")
    parser.add_argument("--no-cache", action="store_true", help="no resized-image cache (data.resized_cache_gib=0)")
    args = parser.parse_args()
    result = run_all(args)
    print_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
