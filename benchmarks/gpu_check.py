"""Check a GPU machine for bmil in one command: environment, the network on CUDA against the
CPU, NCCL and bmil's DDP helpers in one process, a tiny ``bmil train`` / ``eval`` /
``--resume`` on CUDA, clustering at SYSU-MM01's size, and training / extraction throughput
at the sysu preset. Prints a table (section, check, result, figure, PASS/FAIL/SKIP), writes
it as JSON to ``--out`` and exits 1 when any check fails.

Every check runs on its own: an exception is a FAIL row with its message and the script goes
on. ``--smoke`` runs the same steps at tiny sizes (with ``--device cpu``: on the CPU, gloo
instead of NCCL) in well under a minute.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out /tmp/gpu_check.json
    PYTHONPATH=src python3 benchmarks/gpu_check.py --only env,model,cluster
    PYTHONPATH=src python3 benchmarks/gpu_check.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

SECTIONS = ("env", "model", "nccl", "train", "cluster", "throughput")
# Seconds a section is expected to take on one H200 (full sizes): --budget-s starts a
# section only when this much time is left.
EXPECTED_S = {"env": 5, "model": 30, "nccl": 20, "train": 60, "cluster": 90, "throughput": 100}
# The authors' release on their 2-GPU machine (printed beside bmil's figures).
ANCHORS = {"stage1": "release: 0.87 s/it (2 GPUs)", "stage2": "release: 2.3 s/it (2 GPUs)",
           "jaccard": "release: 55-97 s per call"}


@dataclass
class Sizes:
    """Problem sizes of a check run (``full``: the sysu preset; ``smoke``: tiny)."""

    depth: int = 50
    model_width: int = 64
    height: int = 288
    width: int = 144
    ids: int = 8
    instances: int = 16
    model_batch: int = 8
    cluster_n: int = 34_167
    cluster_dim: int = 2048
    cluster_compare_n: int = 6000
    knn_sample: int = 512
    steps: int = 10
    warmup: int = 3
    extract_images: int = 2048
    synthetic_ids: int = 24
    tiny_ids: int = 12
    tiny_images_per_camera: int = 3
    tiny_iterations: int = 2

    @property
    def small_width(self) -> int:
        """model.width of the depth-18 networks of the DDP and tiny-training checks."""
        return 64 if self.model_width >= 64 else self.model_width


SMOKE = Sizes(depth=18, model_width=16, height=64, width=32, ids=2, instances=4, model_batch=4, cluster_n=1500,
              cluster_dim=64, cluster_compare_n=600, knn_sample=64, steps=1, warmup=0, extract_images=64,
              synthetic_ids=12, tiny_ids=9, tiny_images_per_camera=2, tiny_iterations=1)


@dataclass
class Row:
    section: str
    check: str
    status: str
    result: str = ""
    figure: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, check: str, status: str, result: str = "", figure: str = "") -> None:
        self.rows.append(Row(section, check, status, result, figure))

    def check(self, section: str, check: str, fn: Callable[[], tuple[bool | None, str, str]]) -> object:
        """Run ``fn`` → (passed, result, figure); passed None means SKIP. An exception is a FAIL."""
        try:
            passed, result, figure = fn()
        except Exception as err:  # every failure is a row, never the end of the script
            tail = traceback.extract_tb(err.__traceback__)[-1]
            where = f" ({Path(tail.filename).name}:{tail.lineno})"
            message = (str(err).strip().splitlines() or [""])[0][:300]
            self.add(section, check, "FAIL", f"{type(err).__name__}: {message}{where}")
            return None
        status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
        self.add(section, check, status, result, figure)
        return passed

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)

    def table(self) -> str:
        head = ("section", "check", "result", "figure", "status")
        rows = [(r.section, r.check, r.result, r.figure, r.status) for r in self.rows]
        widths = [min(70, max(len(str(x[i])) for x in [head, *rows])) for i in range(5)]
        lines = [" | ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / max(steps, 1)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> str:
    import torch

    if device.type != "cuda":
        return "n/a on CPU"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rowwise_cosine(a, b) -> float:
    import torch.nn.functional as F

    return float(F.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).min())


def _is_channels_last(p) -> bool:
    import torch

    return p.dim() != 4 or p.is_contiguous(memory_format=torch.channels_last)


def _random_memory(clusters: int, dim: int, device, seed: int = 0):
    import torch
    import torch.nn.functional as F

    from bmil.memory import PrototypeMemory

    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(clusters, dim, generator=gen), dim=1).to(device)
    return PrototypeMemory.from_features(feats, torch.arange(clusters, device=device))


def _quiet_cli(argv: list[str]) -> tuple[int, str]:
    """``bmil`` in this process (stdout captured); returns (exit code, stdout)."""
    from bmil import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["-q", *argv])
    return rc, out.getvalue()


# ---------------------------------------------------------------------------- sections
class GpuCheck:
    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        import torch

        self.args, self.report = args, report
        self.sizes = SMOKE if args.smoke else Sizes()
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())  # set_device and DDP need the index
        self.work = Path(tempfile.mkdtemp(prefix="bmil_gpu_check_"))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def _need_device(self) -> None:
        import torch

        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this torch build / machine")

    # ------------------------------------------------------------------ env
    def env(self) -> None:
        import torch

        r, s = self.report, "env"
        r.check(s, "python / torch", lambda: (True, f"python {platform.python_version()}, torch {torch.__version__}",
                                              f"CUDA build {torch.version.cuda}"))

        def cuda():
            ok = torch.cuda.is_available()
            if not ok:
                return (False if self.cuda else None), "CUDA not available", ""
            props = torch.cuda.get_device_properties(self.device)
            return True, f"{props.name}, {torch.cuda.device_count()} GPU(s)", f"{props.total_memory / 2**30:.1f} GiB"

        r.check(s, "CUDA device", cuda)

        def cudnn():
            if not torch.cuda.is_available():
                return None, "no CUDA", ""
            return torch.backends.cudnn.is_available(), f"cuDNN {torch.backends.cudnn.version()}", ""

        r.check(s, "cuDNN", cudnn)

        def bf16():
            if not torch.cuda.is_available():
                return None, "no CUDA", ""
            return torch.cuda.is_bf16_supported(), f"bf16 supported: {torch.cuda.is_bf16_supported()}", ""

        r.check(s, "bf16", bf16)

        def cores():
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            return True, f"{os.cpu_count()} cores, {usable} usable", f"torch threads {torch.get_num_threads()}"

        r.check(s, "CPU cores", cores)

        def shm():
            from bmil.engine.data_setup import shm_bytes

            size = shm_bytes()
            if size is None:
                return None, "/dev/shm not found", ""
            return True, "/dev/shm", f"{size / 2**30:.2f} GiB"

        r.check(s, "/dev/shm", shm)

        def faiss_free():
            blocked = "faiss" not in sys.modules
            saved = sys.modules.get("faiss")
            sys.modules["faiss"] = None  # any `import faiss` now fails, as on a machine without it
            try:
                import numpy as np

                from bmil.cluster import dbscan_labels, jaccard_distance

                gen = np.random.default_rng(0)
                x = np.repeat(gen.standard_normal((20, 16)), 10, axis=0) + 0.05 * gen.standard_normal((200, 16))
                labels = dbscan_labels(jaccard_distance(x.astype(np.float32), k1=8, k2=3, max_distance=0.6), 0.6)
            finally:
                if saved is None:
                    del sys.modules["faiss"]
                else:
                    sys.modules["faiss"] = saved
            try:
                import faiss  # noqa: F401

                present = "faiss installed"
            except ImportError:
                present = "faiss not installed"
            clusters = int(labels.max()) + 1
            return clusters >= 15 and blocked, f"{present}; imports and clusters without it", f"{clusters} clusters"

        r.check(s, "clustering without faiss", faiss_free)

    # ------------------------------------------------------------------ model
    def model(self) -> None:
        import torch

        from bmil.engine.run import adam, align_optimizer_state
        from bmil.losses import intra_loss
        from bmil.model import build_model

        self._need_device()
        r, s, z, dev = self.report, "model", self.sizes, self.device
        torch.manual_seed(0)
        cpu_model = build_model(depth=z.depth, non_local=True, pretrained="none", width=z.model_width).eval()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(z.model_batch, 3, z.height, z.width, generator=gen)
        mods = torch.arange(z.model_batch) % 2
        with torch.no_grad():
            ref = cpu_model(x, mods)
        model = copy.deepcopy(cpu_model).to(dev, memory_format=torch.channels_last)
        xd = x.to(dev).contiguous(memory_format=torch.channels_last)

        def fp32():
            with torch.no_grad():
                cos = _rowwise_cosine(model(xd, mods.to(dev)), ref)
            note = f"depth {z.depth}, {z.height}x{z.width}, TF32 conv {torch.backends.cudnn.allow_tf32}"
            if cos < 0.9999 and self.cuda:  # say whether TF32 is the cause
                torch.backends.cudnn.allow_tf32 = False
                with torch.no_grad():
                    strict = _rowwise_cosine(model(xd, mods.to(dev)), ref)
                torch.backends.cudnn.allow_tf32 = True
                note += f"; without TF32 {strict:.6f}"
            return cos >= 0.9999, note, f"min cosine {cos:.6f}"

        r.check(s, "fp32 vs CPU", fp32)

        def bf16():
            if not self.cuda:
                return None, "bf16 autocast runs on CUDA only", ""
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(xd, mods.to(dev))
            cos = _rowwise_cosine(out, ref)
            return cos >= 0.99, "bf16 autocast, threshold 0.99", f"min cosine {cos:.5f}"

        r.check(s, "bf16 vs CPU", bf16)

        def train_step():
            import torch.nn.functional as F

            net = copy.deepcopy(model).train()
            opt = adam([p for p in net.parameters() if p.requires_grad], 3.5e-4, 5e-4)
            memory = _random_memory(16, net.feat_dim, dev)
            labels = torch.arange(z.model_batch, device=dev) % 16
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                feats = net(xd, mods.to(dev))
            feats = F.normalize(feats.float(), dim=1)
            loss = intra_loss(feats, memory, labels, 0.05, 0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            opt.step()
            memory.update(feats.detach(), labels)
            layout = all(_is_channels_last(p) for p in net.parameters())
            state_layout = all(_is_channels_last(st["exp_avg"]) for st in opt.state.values())
            mem32 = all(getattr(memory, b).dtype == torch.float32 for b in memory.bank_names)
            fused = bool(opt.defaults.get("fused"))
            ok = finite and layout and state_layout and mem32 and fused and bool(torch.isfinite(loss))
            return ok, (f"fused Adam {fused}, grads finite {finite}, channels_last kept {layout} "
                        f"(Adam state {state_layout}), memories float32 {mem32}"), f"loss {float(loss.detach()):.4f}"

        r.check(s, "bf16 training step", train_step)

        def resume_layout():
            # An optimizer state saved from NCHW CPU parameters, loaded for channels_last ones.
            cpu_net = copy.deepcopy(cpu_model).train()
            cpu_opt = adam(list(cpu_net.parameters()), 3.5e-4, 5e-4)
            cpu_net(x[:4], mods[:4]).sum().backward()
            cpu_opt.step()
            net = copy.deepcopy(model).train()
            opt = adam(list(net.parameters()), 3.5e-4, 5e-4)
            opt.load_state_dict(cpu_opt.state_dict())
            align_optimizer_state(opt)
            net(xd[:4], mods[:4].to(dev)).sum().backward()
            opt.step()
            same = all(_is_channels_last(st["exp_avg"]) and st["exp_avg"].device == p.device
                       for p, st in opt.state.items())
            return same, "CPU-saved Adam state loaded for channels_last parameters, fused step ran", ""

        r.check(s, "resume optimizer layout", resume_layout)

    # ------------------------------------------------------------------ nccl
    def nccl(self) -> None:
        import torch
        import torch.distributed as dist

        from bmil.engine import distributed
        from bmil.engine.run import adam
        from bmil.losses import intra_loss
        from bmil.model import build_model

        self._need_device()
        r, s, dev = self.report, "nccl", self.device
        backend = "nccl" if self.cuda else "gloo"
        if dist.is_initialized():
            r.add(s, "init", "SKIP", "a process group already exists")
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())

        def init():
            if self.cuda:
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, rank=0, world_size=1)
            return dist.is_initialized(), f"{backend}, world size 1", ""

        if not r.check(s, "init_process_group", init):
            return
        # bmil's helpers are identities for one process: a context that claims to be
        # distributed makes them run their collectives.
        ctx = _JobContext(rank=0, world_size=1, local_rank=0, device=dev)
        try:
            def gather():
                rows = torch.arange(12.0, device=dev).reshape(6, 2)
                got = distributed.gather_rows(ctx, rows)
                same = distributed.gather_rows(ctx, rows, same_size=True)
                flag = distributed.all_true(ctx, True) and not distributed.all_true(ctx, False)
                obj = distributed.broadcast_object(ctx, {"labels": [3, -1, 2]})
                ok = torch.equal(got, rows) and got.device == rows.device and torch.equal(same, rows)
                ok = ok and flag and obj == {"labels": [3, -1, 2]}
                return ok, "gather_rows (sizes exchanged or equal), all_true, broadcast_object", ""

            r.check(s, "collectives", gather)

            def buffers():
                net = build_model(depth=18, non_local=False, pretrained="none", width=self.sizes.small_width).to(dev)
                for b in net.buffers():
                    if b.is_floating_point():
                        b.add_(0.5)
                before = [b.clone() for b in net.buffers()]
                distributed.average_buffers(ctx, net)
                same = all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))
                return same, "BatchNorm statistics averaged over 1 rank unchanged", ""

            r.check(s, "buffer averaging", buffers)

            def ddp_steps():
                net = build_model(depth=18, non_local=False, pretrained="none", width=self.sizes.small_width).to(dev)
                net, synced = distributed.convert_sync_bn(net, ctx, True)
                if self.cuda:
                    net = net.to(memory_format=torch.channels_last)
                wrapped = distributed.wrap_ddp(net, ctx)
                opt = adam(list(net.parameters()), 3.5e-4, 5e-4)
                memory = _random_memory(8, net.feat_dim, dev)
                x = torch.randn(8, 3, 64, 32, device=dev)
                stems = []
                for mods in (torch.zeros(8), torch.ones(8), torch.arange(8) % 2):  # visible, infrared, both
                    mods = mods.long().to(dev)
                    feats = torch.nn.functional.normalize(wrapped(x, mods).float(), dim=1)
                    loss = intra_loss(feats, memory, torch.arange(8, device=dev), 0.05, 0.2)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    stems.append(tuple(getattr(net, f"{n}_stem").conv1.weight.grad is not None
                                       for n in ("visible", "infrared")))
                ok = stems == [(True, False), (False, True), (True, True)]
                kind = "SyncBatchNorm" if synced else "BatchNorm (SyncBatchNorm needs CUDA)"
                return ok, f"DDP, {kind}: visible stem, infrared stem, both", f"stems with gradients {stems}"

            r.check(s, "DDP steps", ddp_steps)
        finally:
            dist.destroy_process_group()

    # ------------------------------------------------------------------ train
    def _train_overrides(self, out: Path, device: str, *extra: str) -> list[str]:
        z = self.sizes
        return [
            "data.dataset=synthetic", f"data.root={self.work / 'synthetic_tiny'}",
            f"data.synthetic.num_ids={z.tiny_ids}", f"data.synthetic.num_train_ids={z.tiny_ids * 2 // 3}",
            f"data.synthetic.images_per_camera={z.tiny_images_per_camera}", "data.synthetic.height=64",
            "data.synthetic.width=32",
            "data.height=64", "data.width=32", f"data.workers={2 if self.cuda else 0}",
            "model.depth=18", "model.non_local=false", "model.pretrained=none", f"model.width={z.small_width}",
            "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.6",
            "train.stage1_epochs=1", "train.stage2_epochs=1", f"train.iterations={z.tiny_iterations}",
            "train.num_ids=4", "train.num_instances=4", "train.eval_every=1", "train.extract_batch=64",
            "eval.trials=1", f"train.device={device}", f"train.amp={str(self.cuda).lower()}", f"output={out}", *extra,
        ]

    def _config_file(self) -> str:
        path = self.work / "empty.yaml"
        path.write_text("{}\n")
        return str(path)

    def train(self) -> None:
        self._need_device()
        r, s, dev = self.report, "train", str(self.device)
        config = self._config_file()
        run_a = self.work / "run_device"

        def train_both():
            start = time.perf_counter()
            rc, _ = _quiet_cli(["train", "--config", config, *self._train_overrides(run_a, dev)])
            summary = json.loads((run_a / "summary.json").read_text()) if rc == 0 else {}
            ok = rc == 0 and (run_a / "checkpoints" / "last.pt").is_file() and summary["stage2"]["epoch"] >= 0
            return ok, f"bmil train on {dev}, amp {self.cuda}, both stages, exit {rc}", \
                f"{time.perf_counter() - start:.1f} s"

        trained = r.check(s, "train both stages", train_both)

        def eval_match():
            if not trained:
                return None, "no checkpoint (training failed)", ""
            from bmil.commands.evaluate import evaluate_checkpoint
            from bmil.config import load_config

            ckpt = run_a / "checkpoints" / "last.pt"
            maps = {}
            # fp32 on both devices (the comparison), then the device's bf16 extraction (a figure).
            for key, device, amp in ((dev, dev, False), ("cpu", "cpu", False), ("bf16", dev, True)):
                if key == "bf16" and not self.cuda:
                    continue
                overrides = self._train_overrides(self.work / f"eval_{key}", device, f"train.amp={str(amp).lower()}")
                results, _ = evaluate_checkpoint(load_config(config, overrides), ckpt, progress=False)
                maps[key] = float(results[0].mean["mAP"])
            diff = abs(maps[dev] - maps["cpu"])
            bf16 = f", bf16 {maps['bf16']:.4f}" if "bf16" in maps else ""
            return diff <= 1e-3, f"fp32 eval on {dev} and on cpu of the same checkpoint", \
                f"mAP {maps[dev]:.4f} vs {maps['cpu']:.4f} (|diff| {diff:.1e}){bf16}"

        r.check(s, "eval device vs CPU", eval_match)

        def resume():
            # The CPU run ends in stage 2, so the resumed epoch steps the restored Adam state.
            run_b = self.work / "run_resume"
            rc, _ = _quiet_cli(["train", "--config", config, *self._train_overrides(run_b, "cpu")])
            if rc != 0:
                return False, f"the CPU run that writes the checkpoint exited {rc}", ""
            rc, _ = _quiet_cli(["train", "--config", config, "--resume",
                                *self._train_overrides(run_b, dev, "train.stage2_epochs=2")])
            lines = (run_b / "metrics.jsonl").read_text().splitlines()
            epochs = [json.loads(line)["epoch"] for line in lines]
            return rc == 0 and epochs == [0, 1, 2], f"CPU-written last.pt (stage 2) resumed on {dev}, exit {rc}", \
                f"epochs {epochs}"

        r.check(s, "resume from CPU checkpoint", resume)

    # ------------------------------------------------------------------ cluster
    def cluster(self) -> None:
        import numpy as np
        import torch
        import torch.nn.functional as F

        from bmil.cluster import dbscan_labels, jaccard_distance, knn
        from bmil.cluster.memory_check import available_memory

        self._need_device()
        r, s, z, dev = self.report, "cluster", self.sizes, self.device
        gen = torch.Generator().manual_seed(0)
        n, d = z.cluster_n, z.cluster_dim
        ids = max(2, n // 17)  # SYSU-MM01 has about 17 images per (identity, modality)
        centers = F.normalize(torch.randn(ids, d, generator=gen), dim=1)
        labels = torch.randint(0, ids, (n,), generator=gen)
        x = F.normalize(centers[labels] + 0.9 * torch.randn(n, d, generator=gen) / d**0.5, dim=1)
        modality = (torch.rand(n, generator=gen) < 0.37).long().numpy()  # SYSU-MM01: 11,909 of 34,167 infrared
        xd = x.to(dev)

        def knn_match():
            k = 31
            rows = np.sort(np.random.default_rng(0).choice(n, size=min(z.knn_sample, n), replace=False))
            start = time.perf_counter()
            _, idx_dev = knn(xd, k)
            _sync(dev)
            took = time.perf_counter() - start
            _, idx_cpu = knn(x, k, queries=rows)  # rows in ascending order, as knn returns them
            got = idx_dev[rows]
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, idx_cpu, strict=True)]))
            equal = float(np.mean(np.all(got == idx_cpu, axis=1)))
            return recall >= 0.999, f"{dev} kNN (all {n} rows, k={k}) vs CPU on {len(rows)} rows", \
                f"recall {recall:.4f}, equal rows {equal:.3f}, {took:.2f} s"

        r.check(s, "kNN device vs CPU", knn_match)

        def jaccard_equal():
            m = z.cluster_compare_n
            a = jaccard_distance(xd[:m], k1=30, k2=6, modality=modality[:m], max_distance=0.6)
            b = jaccard_distance(x[:m], k1=30, k2=6, modality=modality[:m], max_distance=0.6)
            la, lb = dbscan_labels(a, 0.6), dbscan_labels(b, 0.6)
            same = float(np.mean(la == lb))
            return same >= 0.99, f"Jaccard + DBSCAN at N = {m}, {dev} vs CPU", \
                f"same labels {same:.4f}, nnz {a.nnz} vs {b.nnz}"

        r.check(s, "Jaccard device vs CPU", jaccard_equal)

        def jaccard_full():
            free_before = available_memory(dev)
            _peak_reset(dev)
            start = time.perf_counter()
            dist = jaccard_distance(xd, k1=30, k2=6, modality=modality, max_distance=0.6)
            took = time.perf_counter() - start
            peak = _peak_gib(dev)
            clusters = int(dbscan_labels(dist, 0.6).max()) + 1
            free = "unknown" if free_before is None else f"{free_before / 2**30:.1f} GiB available before"
            return True, f"N = {n} x {d}, modality-aware, t = 0.6; {free}; {ANCHORS['jaccard']}", \
                f"{took:.1f} s, {peak}, {clusters} clusters"

        r.check(s, "jaccard_distance at full N", jaccard_full)

        def cached_counts_free():
            if not self.cuda:
                return None, "CUDA only", ""
            from bmil.cluster.memory_check import gpu_available_memory

            torch.cuda.synchronize(dev)
            block = torch.empty(1 << 28, dtype=torch.uint8, device=dev)  # 256 MiB
            del block  # now cached by PyTorch: free for its next allocation, used for the driver
            seen = gpu_available_memory(dev)
            free, _ = torch.cuda.mem_get_info(dev)
            cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            return seen - free >= 1 << 28, "cached-but-free blocks counted as available", \
                f"{seen / 2**30:.2f} GiB (driver free {free / 2**30:.2f}, cached {cached / 2**30:.2f})"

        r.check(s, "memory check counts cache", cached_counts_free)

    # ------------------------------------------------------------------ throughput
    def throughput(self) -> None:
        import torch

        self._need_device()
        r, s, z, dev = self.report, "throughput", self.sizes, self.device
        note = f"{z.height}x{z.width}, {z.ids}x{z.instances} per modality, depth {z.depth}"
        for amp in (False, True):
            if amp and not self.cuda:
                r.add(s, "model alone, bf16", "SKIP", "bf16 autocast runs on CUDA only")
                continue
            name = "bf16" if amp else "fp32"

            def alone(amp=amp):
                step = _ModelStep(z, dev, amp)
                _peak_reset(dev)
                one = _timed(step.stage1, dev, z.steps, z.warmup)
                two = _timed(step.stage2, dev, z.steps, z.warmup)
                return True, f"random batches on {dev}; {note}", \
                    f"stage 1 {one:.3f} s/it, stage 2 {two:.3f} s/it, {_peak_gib(dev)}"

            r.check(s, f"model alone, {name}", alone)
        r.add(s, "release anchors", "SKIP", f"{ANCHORS['stage1']}, {ANCHORS['stage2']}", "for comparison")

        def with_loader():
            from bmil.records import VISIBLE

            run = self._sysu_run()
            loop = _LoaderStep(run, z)
            _peak_reset(dev)
            one = _timed(loop.stage1, dev, z.steps, z.warmup)
            two = _timed(loop.stage2, dev, z.steps, z.warmup)
            workers = run.workers(VISIBLE)  # after the /dev/shm check
            return True, f"bmil Run, 4 real loaders ({workers} workers each), amp {self.cuda}; {note}", \
                f"stage 1 {one:.3f} s/it, stage 2 {two:.3f} s/it, {_peak_gib(dev)}"

        r.check(s, "with the real loader", with_loader)

        def extraction():
            from bmil.inference import extract_features
            from bmil.model import build_model

            net = build_model(depth=z.depth, non_local=True, pretrained="none", width=z.model_width)
            net = net.to(dev, memory_format=torch.channels_last)
            records = self._sysu_records()
            records = (records * (z.extract_images // len(records) + 1))[: z.extract_images]  # images repeat
            from bmil.engine.data_setup import extraction_workers

            cfg = self._sysu_config()
            workers = extraction_workers(cfg, dev, z.height, z.width)  # fewer when /dev/shm is small
            kwargs = dict(height=z.height, width=z.width, batch_size=cfg.train.extract_batch, device=dev,
                          workers=workers, amp=self.cuda, progress=False)
            extract_features(net, records[: min(len(records), 256)], **kwargs)  # warm-up
            _sync(dev)
            start = time.perf_counter()
            feats = extract_features(net, records, **kwargs)
            took = time.perf_counter() - start
            return feats.shape[0] == len(records), \
                f"{len(records)} images, flip, batch {cfg.train.extract_batch}, {workers} workers, amp {self.cuda}", \
                f"{len(records) / took:.0f} images/s"

        r.check(s, "extraction", extraction)

    def _sysu_config(self):
        from bmil.config import load_config

        z = self.sizes
        return load_config(None, [
            "data.dataset=synthetic", f"data.root={self.work / 'synthetic_sysu'}",
            f"data.synthetic.num_ids={z.synthetic_ids}", f"data.synthetic.num_train_ids={z.synthetic_ids * 2 // 3}",
            "data.synthetic.images_per_camera=4", f"data.synthetic.height={z.height}",
            f"data.synthetic.width={z.width}", f"data.height={z.height}", f"data.width={z.width}",
            f"model.depth={z.depth}", f"model.width={z.model_width}", "model.pretrained=none", f"train.num_ids={z.ids}",
            f"train.num_instances={z.instances}", f"train.iterations={2 * (z.steps + z.warmup) + 1}",
            f"train.device={self.device}", f"train.amp={str(self.cuda).lower()}", f"output={self.work / 'sysu_run'}",
            *([] if self.cuda else ["data.workers=0"]),
        ])

    def _sysu_records(self):
        from bmil.engine.data_setup import train_records

        return train_records(self._sysu_config())

    def _sysu_run(self):
        from bmil.engine.run import build_run

        return build_run(self._sysu_config())


def _job_context_class():
    from bmil.engine.distributed import DistContext

    @dataclass(frozen=True)
    class JobContext(DistContext):
        """A one-process job that runs bmil's collectives (``enabled`` although world size is 1)."""

        @property
        def enabled(self) -> bool:
            return True

    return JobContext


def _JobContext(**kwargs):  # noqa: N802  (a class, built lazily so importing this file needs no torch)
    return _job_context_class()(**kwargs)


class _ModelStep:
    """Stage-1 (intra) and stage-2 (intra + global) iterations on fixed random batches:
    visible P×K in two views and infrared P×K in one forward, hybrid memories, fused Adam."""

    def __init__(self, z: Sizes, device, amp: bool) -> None:
        import torch

        from bmil.engine.run import adam
        from bmil.model import build_model

        self.device, self.amp = device, amp
        self.model = build_model(depth=z.depth, non_local=True, pretrained="none", width=z.model_width).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = adam(list(self.model.parameters()), 3.5e-4, 5e-4)
        n = z.ids * z.instances
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(3 * n, 3, z.height, z.width, generator=gen).to(device)
        if device.type == "cuda":
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.mods = torch.cat([torch.zeros(2 * n), torch.ones(n)]).long().to(device)
        ids = torch.arange(z.ids).repeat_interleave(z.instances)
        self.vis_labels, self.ir_labels, self.n = ids.repeat(2).to(device), ids.to(device), n
        dim = self.model.feat_dim
        self.mem = {"visible": _random_memory(500, dim, device, 1), "infrared": _random_memory(400, dim, device, 2),
                    "global": _random_memory(450, dim, device, 3)}

    def _features(self):
        import torch
        import torch.nn.functional as F

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            feats = self.model(self.images, self.mods)
        feats = F.normalize(feats.float(), dim=1)
        return feats[: 2 * self.n], feats[2 * self.n:]

    def _apply(self, loss) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def stage1(self) -> None:
        from bmil.losses import intra_loss

        vis, ir = self._features()
        m = self.mem
        self._apply(intra_loss(vis, m["visible"], self.vis_labels) + intra_loss(ir, m["infrared"], self.ir_labels))
        m["visible"].update(vis.detach(), self.vis_labels)
        m["infrared"].update(ir.detach(), self.ir_labels)

    def stage2(self) -> None:
        import torch

        from bmil.losses import global_loss
        from bmil.memory import positive_mask

        self.stage1()
        vis, ir = self._features()
        m = self.mem
        sub_to_cluster = torch.arange(450, device=self.device)
        loss = 0.5 * (global_loss(vis, m["global"], positive_mask(self.vis_labels, sub_to_cluster))
                      + global_loss(ir, m["global"], positive_mask(self.ir_labels, sub_to_cluster)))
        self._apply(loss)
        m["global"].update(torch.cat([vis, ir]).detach(), torch.cat([self.vis_labels, self.ir_labels]))


class _LoaderStep:
    """Iterations through bmil's own training loop pieces: the Run's P×K loaders (true ids as
    pseudo labels), ``Run.forward`` and ``Run.step``; stage 2 keeps four loaders alive."""

    def __init__(self, run, z: Sizes) -> None:
        import numpy as np

        from bmil.records import MODALITIES

        self.run, self.z = run, z
        run.set_stage_views(2)  # stage 2: four loaders alive, as here
        self.labels = {}
        for m in MODALITIES:
            pids = run.pids[run.index[m]]
            _, self.labels[m] = np.unique(pids, return_inverse=True)
        self.iters = {(g, m): iter(run.loader(m, self.labels[m], seed=i))
                      for i, g in enumerate(("intra", "global")) for m in MODALITIES}
        dim = run.model.feat_dim
        clusters = {m: int(self.labels[m].max()) + 1 for m in MODALITIES}
        self.mem = {m: _random_memory(c, dim, run.device, m) for m, c in clusters.items()}
        self.step_no = 0

    def _step(self, group: str) -> None:
        import torch

        from bmil.losses import intra_loss
        from bmil.records import MODALITIES

        batches = {m: next(self.iters[(group, m)]) for m in MODALITIES}
        out = self.run.forward(batches, self.labels)
        loss = sum(intra_loss(out[m].features, self.mem[m], out[m].targets, 0.05, 0.2) for m in MODALITIES)
        self.run.step(loss, 0, self.step_no)
        with torch.no_grad():
            for m in MODALITIES:
                self.mem[m].update(out[m].features.detach(), out[m].targets)
        self.step_no += 1

    def stage1(self) -> None:
        self._step("intra")

    def stage2(self) -> None:
        self._step("intra")
        self._step("global")


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--smoke", action="store_true", help="the same steps at tiny sizes")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=290.0,
                        help="start a section only while its expected time is left (seconds)")
    parser.add_argument("--out", help="write the table as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    report = Report()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"error: --only names unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    checker = None
    try:
        checker = GpuCheck(args, report)
    except Exception as err:  # e.g. torch or bmil cannot be imported
        report.add("env", "import", "FAIL", f"{type(err).__name__}: {err}")
    if checker is not None:
        try:
            for section in SECTIONS:
                if section not in chosen:
                    continue
                left = args.budget_s - (time.perf_counter() - start)
                expected = EXPECTED_S[section] * (0.1 if args.smoke else 1.0)
                if left < expected:
                    report.add(section, "(section)", "SKIP", f"{left:.0f} s of --budget-s left, needs ~{expected:.0f}")
                    continue
                began = time.perf_counter()
                try:
                    getattr(checker, section)()
                except Exception as err:
                    report.add(section, "(section)", "FAIL", f"{type(err).__name__}: {str(err)[:300]}")
                print(f"[{section}: {time.perf_counter() - began:.1f} s]", file=sys.stderr, flush=True)
        finally:
            checker.close()
    elapsed = time.perf_counter() - start
    report.add("total", "wall time", "PASS", f"device {args.device}, smoke {args.smoke}", f"{elapsed:.1f} s")
    print(report.table())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": args.device, "smoke": args.smoke, "seconds": elapsed,
                                              "rows": [asdict(r) for r in report.rows]}, indent=2) + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
