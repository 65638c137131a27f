"""Data-parallel training: two gloo processes on the CPU end with identical weights and
memories; the collectives keep rank order; each rank trains on its share of the batch and
draws its own augmentations; checkpoints are read by rank 0 only (stage 2's start and
--resume work when the other ranks cannot see the files); under torchrun every BatchNorm
becomes SyncBatchNorm."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bmil.engine import distributed
from bmil.errors import ConfigError
from bmil.model import build_model

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    """What torchrun sets for each process."""
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    torch.set_num_threads(1)


class _Draws(torch.utils.data.Dataset):
    """Stands in for a training dataset: each item is the random draws an augmentation makes
    (torch, numpy, Python), so a loader's batches show how its workers are seeded."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import random

        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()]), i


def _augmentation_draws(trainer) -> dict:
    """The first batches of a visible training loader with data.workers=2 (twice with one
    seed, once with the next epoch's), and the in-process draws with no workers."""
    from bmil.engine.run import seed_everything
    from bmil.records import VISIBLE

    run = trainer.run
    os.cpu_count = lambda: 16  # 8 cores per process: 2 workers for each of stage 2's 4 loaders
    run.cfg.data.workers = 2
    saved = run.datasets[VISIBLE]
    run.datasets[VISIBLE] = _Draws(len(saved))
    labels = np.arange(len(saved)) % 4

    def first_batches(seed: int) -> torch.Tensor:
        loader = run.loader(VISIBLE, labels, seed)
        assert loader.num_workers == 2
        batches = []
        for views, _ in loader:
            batches.append(views)
            if len(batches) == 2:  # one from each worker
                break
        return torch.stack(batches)

    draws = {"first": first_batches(5), "again": first_batches(5), "next_epoch": first_batches(6)}
    run.datasets[VISIBLE] = saved
    seed_everything(trainer.cfg.train.seed, 3, trainer.run.dist.rank)
    draws["in_process"] = torch.rand(4)
    return draws


def _train_worker(rank: int, port: int, root: str, out: str, dump: str) -> None:
    import bmil.engine.run as run_module
    from bmil.data import PseudoIdentitySampler
    from bmil.engine.trainer import Trainer
    from bmil.errors import CheckpointError
    from bmil.inference import extract_features
    from conftest import tiny_config  # tests/ is on the path pytest hands to spawned processes

    _join(rank, port)
    if rank == 1:  # another node without a shared file system: rank 1 sees no checkpoint
        def invisible(path, *args, **kwargs):
            raise CheckpointError(f"checkpoint {path} not found")

        run_module.load_checkpoint = invisible
    overrides = ["train.stage1_epochs=1", "train.stage2_epochs=1", "train.iterations=2", "train.eval_every=5",
                 "model.sync_bn=true"]
    cfg = tiny_config(Path(root), Path(out), *overrides)
    trainer = Trainer(cfg, progress=False)
    assert trainer.run.dist.world_size == WORLD and trainer.run.dist.rank == rank
    seen = {}
    original = trainer.run.loader
    start_stage2 = trainer._start_stage2

    def recording_loader(modality, labels, seed):
        loader = original(modality, labels, seed)
        if "batch" not in seen:
            seen["batch"] = loader.batch_size
            seen["mine"] = loader.sampler.indices()[: loader.batch_size].tolist()
            cameras = trainer.run.camids[trainer.run.index[modality]]  # train.sampler=camera, the default
            full = PseudoIdentitySampler(labels, cfg.train.num_ids, cfg.train.num_instances, 1, seed=seed,
                                         cameras=cameras)
            seen["full"] = full.indices().tolist()
        return loader

    def recording_start():
        start_stage2()
        seen["stage2_start"] = {k: v.clone() for k, v in trainer.run.model.state_dict().items()}

    trainer.run.loader = recording_loader
    trainer._start_stage2 = recording_start
    trainer.fit()
    sharded = trainer.extract(trainer.run.records[:10], flip=False)
    whole = extract_features(trainer.run.model, trainer.run.records[:10], height=cfg.data.height, width=cfg.data.width,
                             batch_size=64, flip=False, amp=False, progress=False)
    draws = _augmentation_draws(trainer)
    # --resume from checkpoints/last.pt, which rank 1 cannot read either (the run is complete:
    # the set-up is what is checked, no epoch follows).
    resumed = Trainer(cfg, resume=True, progress=False)
    torch.save({
        "model": trainer.run.model.state_dict(), "memories": trainer.memory_state, "seen": seen,
        "sharded": sharded, "whole": whole, "draws": draws, "start_epoch": resumed.start_epoch,
        "resumed_model": resumed.run.model.state_dict(), "best": {k: vars(v) for k, v in resumed.run.best.items()},
    }, Path(dump) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_run")
    dump = tmp_path_factory.mktemp("ddp_dump")
    mp.spawn(_train_worker, args=(_free_port(), str(synthetic_root), str(out), str(dump)), nprocs=WORLD, join=True)
    states = [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, states


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix, tree


@pytest.mark.e2e
def test_ranks_end_with_identical_weights_and_memories(two_rank_run):
    _, (a, b) = two_rank_run
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    mem_a, mem_b = dict(_flatten(a["memories"])), dict(_flatten(b["memories"]))
    assert mem_a.keys() == mem_b.keys() and any("global" in k for k in mem_a)
    assert all(torch.equal(mem_a[k], mem_b[k]) for k in mem_a)


@pytest.mark.e2e
def test_each_rank_takes_its_half_of_every_batch(two_rank_run):
    _, (a, b) = two_rank_run
    # tiny config: 4 identities × 4 instances; 2 processes → 2 identities × 4 instances each.
    assert a["seen"]["batch"] == b["seen"]["batch"] == 8
    assert a["seen"]["full"] == b["seen"]["full"] and len(a["seen"]["full"]) == 16
    assert a["seen"]["mine"] + b["seen"]["mine"] == a["seen"]["full"]  # rank 0: first 2 ids, rank 1: last 2


@pytest.mark.e2e
def test_only_rank_zero_writes_and_run_json_describes_the_job(two_rank_run):
    out, _ = two_rank_run
    info = json.loads((out / "run.json").read_text())
    # gloo on the CPU: torch cannot synchronise BatchNorm there, so each process normalises its own 24 images.
    assert info["world_size"] == 2 and info["per_process_batch"] == 8
    assert info["effective_bn_batch"] == 24 and info["sync_bn"] is False
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]  # one writer, no duplicates
    assert (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.e2e
def test_ranks_and_workers_draw_their_own_augmentations(two_rank_run):
    _, (a, b) = two_rank_run
    for draws in (a["draws"], b["draws"]):
        assert torch.equal(draws["first"], draws["again"])  # a rerun repeats them
        assert not torch.equal(draws["first"][0], draws["first"][1])  # worker 0 and worker 1 differ
        assert not torch.equal(draws["first"], draws["next_epoch"])
    assert not torch.equal(a["draws"]["first"], b["draws"]["first"])  # rank 0 and rank 1 differ
    assert not torch.equal(a["draws"]["in_process"], b["draws"]["in_process"])  # also with no workers


@pytest.mark.e2e
def test_stage2_start_and_resume_use_rank_zero_checkpoints(two_rank_run):
    """Rank 1 cannot read any checkpoint: it starts stage 2 from rank 0's best_stage1.pt and
    resumes from rank 0's last.pt (it would fail reading them itself)."""
    out, (a, b) = two_rank_run
    best = torch.load(out / "checkpoints" / "best_stage1.pt", weights_only=False)["model"]
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    for state in (a, b):
        assert all(torch.equal(state["seen"]["stage2_start"][k], v) for k, v in best.items())
        assert state["start_epoch"] == 2
        assert all(torch.equal(state["resumed_model"][k], v) for k, v in last["model"].items())
    assert a["best"] == b["best"] and a["best"][1]["epoch"] == 0  # restored on both ranks


@pytest.mark.e2e
def test_checkpoints_carry_the_memories(two_rank_run):
    out, (a, _) = two_rank_run
    saved = dict(_flatten(torch.load(out / "checkpoints" / "last.pt", weights_only=False)["memories"]))
    mine = dict(_flatten(a["memories"]))
    assert saved.keys() == mine.keys() and any("intra" in k for k in saved) and any("global" in k for k in saved)
    assert all(torch.equal(saved[k], mine[k]) for k in saved)


@pytest.mark.e2e
def test_sharded_extraction_returns_all_features_in_order(two_rank_run):
    _, states = two_rank_run
    for state in states:
        assert state["sharded"].shape == state["whole"].shape
        np.testing.assert_allclose(state["sharded"], state["whole"], atol=1e-5)


# ------------------------------------------------------------------ collectives alone
def _collectives_worker(rank: int, port: int, dump: str) -> None:
    _join(rank, port)
    ctx = distributed.init_distributed(torch.device("cpu"))
    rows = torch.arange(3 + rank * 2, dtype=torch.float32)[:, None].repeat(1, 2) + 100 * rank
    gathered = distributed.gather_rows(ctx, rows)
    equal = distributed.gather_rows(ctx, torch.full((2, 3), float(rank)), same_size=True)
    labels = distributed.broadcast_object(ctx, np.array([7, -1, 3]) if rank == 0 else None)
    flags = distributed.all_true(ctx, rank == 0), distributed.all_true(ctx, True)
    shard = distributed.shard_range(7, ctx)
    pieces = distributed.gather_shards(ctx, np.arange(7)[shard])
    torch.save({"gathered": gathered, "equal": equal, "labels": labels, "flags": flags, "pieces": pieces},
               Path(dump) / f"rank{rank}.pt")
    distributed.shutdown(ctx)


@pytest.mark.e2e
def test_collectives_keep_rank_order(tmp_path):
    mp.spawn(_collectives_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = torch.cat([
        torch.arange(3.0)[:, None].repeat(1, 2),
        torch.arange(5.0)[:, None].repeat(1, 2) + 100,
    ])
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(got["gathered"], expected)  # unequal row counts, rank order
        assert torch.equal(got["equal"], torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None].expand(4, 3))
        np.testing.assert_array_equal(got["labels"], [7, -1, 3])
        assert got["flags"] == (False, True)
        np.testing.assert_array_equal(got["pieces"], np.arange(7))


def test_identity_shards_partition_each_batch():
    class Batches:  # 3 batches of 4 identities × 2 instances, indices 0..23
        num_ids, num_instances, iterations = 4, 2, 3

        def indices(self):
            return np.arange(24)

    shards = [distributed.IdentityShardSampler(Batches(), distributed.DistContext(rank=r, world_size=2))
              for r in range(2)]
    assert shards[0].indices().tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert shards[1].indices().tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert len(shards[0]) == 12
    with pytest.raises(ConfigError, match="train.num_ids"):
        distributed.per_rank_ids(6, distributed.DistContext(rank=0, world_size=4))


def test_single_process_helpers_are_identities():
    ctx = distributed.DistContext()
    x = torch.randn(3, 2)
    assert distributed.gather_rows(ctx, x) is x
    assert distributed.broadcast_object(ctx, "labels") == "labels"
    assert distributed.shard_range(5, ctx) == slice(0, 5)
    assert not ctx.enabled and ctx.is_main


@pytest.mark.e2e
def test_sync_bn_conversion_for_torchrun():
    """The helper the trainer calls under torchrun: every BatchNorm becomes SyncBatchNorm
    with the same state-dict keys; a CPU or single-process job keeps BatchNorm."""
    from bmil.engine.distributed import DistContext, convert_sync_bn

    model = build_model(depth=18, non_local=False, pretrained="none")
    keys = set(model.state_dict())
    bn_count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    same, synced = convert_sync_bn(model, DistContext(world_size=1), enabled=True)
    assert same is model and not synced
    same, synced = convert_sync_bn(model, DistContext(world_size=2, device=torch.device("cpu")), enabled=True)
    assert not synced
    converted, synced = convert_sync_bn(model, DistContext(world_size=2, device=torch.device("cuda", 0)), True)
    assert synced
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == bn_count
    assert set(converted.state_dict()) == keys


# ------------------------------------------------------------------ loader workers on a node
def test_workers_are_shared_between_the_loaders_alive(monkeypatch):
    """4 GPU processes on 16 cores: stage 2's four loaders get 1 worker each (16 / 4 / 4),
    not data.workers=8 each (128 workers on the node); a single loader keeps the setting."""
    from bmil.config import load_config
    from bmil.engine.data_setup import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = load_config(None, ["data.workers=8"])
    assert loader_workers(cfg, "cuda:0", loaders=4) == 1
    assert loader_workers(cfg, "cuda:0", loaders=2) == 2
    assert loader_workers(cfg, "cuda:0") == 8
    assert loader_workers(load_config(None, ["data.workers=0"]), "cuda:0", loaders=4) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(load_config(None, []), "cuda:0", loaders=4) == 4  # unset: min(8, 16 / 4)


def test_too_little_shared_memory_lowers_the_workers_with_one_sentence():
    from bmil.engine.data_setup import PREFETCH, shm_workers

    mib = 1 << 20
    batch = 127 * mib  # 8 x 16 images, two views, 288 x 144, float32
    assert shm_workers(2, 4, batch, free=4 * 2 * PREFETCH * batch) == (2, None)  # fits exactly
    workers, sentence = shm_workers(2, 4, batch, free=64 * mib)  # a container's default /dev/shm
    assert workers == 0
    assert "/dev/shm has 64 MiB free" in sentence and "--shm-size" in sentence and "\n" not in sentence
    assert shm_workers(4, 2, batch, free=2 * 2 * PREFETCH * batch)[0] == 2  # as many as fit
    assert shm_workers(4, 2, batch, free=None) == (4, None)  # unknown: unchanged


@pytest.mark.e2e
def test_rank_zero_clusters_on_the_node_cores_then_gives_them_back(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1; the clustering step (rank 0 alone) gets the node's
    cores less one per other process of the node, and the thread count is restored."""
    monkeypatch.setattr(distributed, "node_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with distributed.clustering_threads(distributed.DistContext(rank=0, world_size=4)) as threads:
            assert threads == 13 and torch.get_num_threads() == 13
        assert torch.get_num_threads() == 1
        with distributed.clustering_threads(distributed.DistContext(rank=2, world_size=4)) as threads:
            assert threads == 1 and torch.get_num_threads() == 1  # the waiting ranks keep theirs
        with distributed.clustering_threads(distributed.DistContext()) as threads:
            assert threads == 1  # one process: the user's setting stands
    finally:
        torch.set_num_threads(before)


def test_extraction_workers_fit_in_shared_memory(monkeypatch, caplog):
    from bmil.config import load_config
    from bmil.engine import data_setup

    cfg = load_config(None, ["data.workers=8", "train.extract_batch=256"])  # batches of 127 MiB at 288 x 144
    monkeypatch.setattr(data_setup, "shm_bytes", lambda: 64 << 20)
    assert data_setup.extraction_workers(cfg, "cuda:0", 288, 144) == 0
    assert "--shm-size" in caplog.text
    monkeypatch.setattr(data_setup, "shm_bytes", lambda: 8 << 30)
    assert data_setup.extraction_workers(cfg, "cuda:0", 288, 144) == 8
