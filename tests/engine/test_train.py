"""End to end on the CPU: both stages, the files a run writes, learning, exact resume; fixed
seeds (bit-identical runs, DataLoader worker seeds), extreme modality ratios and an epoch whose
global clusters each hold one modality."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from bmil.cluster.association import Association
from bmil.engine import run as run_mod
from bmil.engine.run_log import read_metrics
from bmil.engine.step import iteration_steps
from bmil.engine.trainer import Trainer
from bmil.errors import CheckpointError
from bmil.records import INFRARED, VISIBLE
from helpers import SHORT, finite_losses, record_keyword


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory, make_config):
    out = tmp_path_factory.mktemp("run")
    cfg = make_config(synthetic_root, out, "train.eval_every=5")
    trainer = Trainer(cfg, progress=False)
    summary = trainer.fit()
    return cfg, trainer, summary


@pytest.mark.e2e
def test_run_writes_config_metrics_events_checkpoints(finished_run):
    cfg, _, summary = finished_run
    out = cfg.output
    from pathlib import Path

    out = Path(out)
    assert (out / "config.yaml").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 1 and info["per_process_batch"] == 16 and info["effective_bn_batch"] == 48
    assert info["versions"]["torch"] and info["versions"]["scikit-learn"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["stage"] for r in records] == [1, 1, 2, 2]
    assert all("loss/intra" in r for r in records)
    assert all("global/clusters" in r and "global/ari" in r for r in records[2:])
    assert not any("loss/global" in r or "global/clusters" in r for r in records[:2])
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").iterdir())
    for name in ("last.pt", "best_stage1.pt", "best_stage2.pt"):
        assert (out / "checkpoints" / name).is_file()
    for stage in ("stage1", "stage2"):
        metrics = next(iter(summary[stage]["metrics"].values()))
        assert 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["rank1"] <= 1.0


@pytest.mark.e2e
def test_stage_two_adds_the_global_loss(finished_run):
    cfg, _, _ = finished_run
    from pathlib import Path

    records = read_metrics(Path(cfg.output) / "metrics.jsonl")
    stage2 = [r for r in records[2:] if r["global/clusters"] >= 2]  # one cluster: skipped by design
    assert stage2, "no stage-2 epoch of the tiny run had two global clusters"
    assert all(np.isfinite(r["loss/global"]) and r["loss/global"] > 0 for r in stage2)
    assert all("loss/global" not in r for r in records[:2])


@pytest.mark.e2e
def test_optimiser_steps_lower_both_losses_on_a_fixed_batch(synthetic_root, tmp_path, make_config):
    """The trainer's own objectives, forward and step, both stages' losses, fixed memories."""
    # Every visible image in the global clustering: the tiny data's left-out half alone gives one cluster.
    # loss.global_gradient=simultaneous: with memories that never move, that is the exact gradient of the
    # fixed loss (the release's order takes the infrared term's against prototypes the visible batch moved).
    trainer = Trainer(make_config(synthetic_root, tmp_path, "train.lr=1e-3", "cluster.global_visible=all",
                                  "loss.global_gradient=simultaneous"), progress=False)
    rng = run_mod.seed_everything(0, 0)
    features = trainer.extract(trainer.run.records, flip=False)
    assoc = trainer.associate(features, 2, rng)
    objectives = trainer.objectives(0, features, assoc)
    assert [(o.name, o.group) for o in objectives] == [
        ("intra/visible", "intra"), ("intra/infrared", "intra"), ("global", "global")]
    batches = {(o.name, m): next(iter(dl)) for o in objectives for m, dl in o.loaders.items()}
    glob = objectives[2:]
    (step,) = iteration_steps(objectives, separate_global_step=False)  # both groups in one step
    trainer.run.model.train()
    history = []
    for i in range(6):
        losses = step.loss(batches, trainer.run.forward)
        history.append((float(losses["intra"].detach()), float(losses["global"].detach())))
        trainer.run.step(losses["intra"] + losses["global"], 0, i)
    assert history[-1][0] < 0.8 * history[0][0]
    assert history[-1][1] < 0.8 * history[0][1]
    # Every row of the global memory update moves a prototype of its own global cluster and modality.
    (global_objective,) = glob
    outputs = trainer.run.forward({m: batches[("global", m)] for m in (0, 1)}, global_objective.labels)
    global_objective.loss(outputs)
    sub_to_cluster = global_objective.sub_to_cluster.cpu().numpy()
    for m, (features, sub) in zip((0, 1), global_objective._pending, strict=True):
        y = outputs[m][1].cpu().numpy()
        assert len(sub) == len(features) == len(y)
        assert np.array_equal(sub_to_cluster[sub.cpu().numpy()], y)
        mod = np.asarray(assoc.sub.sub_modality)[sub.cpu().numpy()]
        assert np.all(mod == m)


@pytest.mark.e2e
def test_resume_across_the_stage_boundary_is_bit_for_bit(synthetic_root, tmp_path, monkeypatch, make_config):
    short = ("train.stage1_epochs=1", "train.stage2_epochs=1", "train.eval_every=5", "train.iterations=2")
    straight = make_config(synthetic_root, tmp_path / "straight", *short)
    Trainer(straight, progress=False).fit()

    cut = make_config(synthetic_root, tmp_path / "cut", *short)
    original = Trainer._run_epoch

    def stop_after_stage_one(self, epoch, logger):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch, logger)

    monkeypatch.setattr(Trainer, "_run_epoch", stop_after_stage_one)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cut, progress=False).fit()
    monkeypatch.undo()
    resumed = Trainer(cut, resume=True, progress=False)
    assert resumed.start_epoch == 1
    resumed.fit()

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    la = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    lb = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["epoch"] for r in lb] == [0, 1]
    assert la[-1]["loss/intra"] == lb[-1]["loss/intra"]


@pytest.mark.e2e
def test_init_from_checks_the_architecture(finished_run, synthetic_root, tmp_path, make_config):
    cfg, _, _ = finished_run
    from pathlib import Path

    best = Path(cfg.output) / "checkpoints" / "best_stage1.pt"
    ok = make_config(synthetic_root, tmp_path / "a", "train.stage1_epochs=0", f"train.init_from={best}")
    trainer = Trainer(ok, progress=False)
    expected = torch.load(best, weights_only=False)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in trainer.run.model.state_dict().items())
    bad = make_config(synthetic_root, tmp_path / "b", "model.depth=34", f"train.init_from={best}")
    with pytest.raises(CheckpointError, match="model.depth"):
        Trainer(bad, progress=False)


@pytest.mark.e2e
def test_demo_summary_has_the_published_keys(synthetic_root, tmp_path, make_config):
    from bmil.commands.demo import demo_table, run_demo

    cfg = make_config(synthetic_root, tmp_path, "train.stage1_epochs=1", "train.stage2_epochs=1", "train.eval_every=5")
    summary = run_demo(cfg, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    keys = ["stage1.mAP", "stage1.rank1", "stage2.mAP", "stage2.rank1", "clustering.ari_plain",
            "clustering.ari_modality_aware"]
    for key in keys:
        assert on_disk[key] == summary[key]
        assert -1.0 <= on_disk[key] <= 1.0
    history = {h["stage"]: h["metrics"] for h in torch.load(tmp_path / "checkpoints" / "last.pt",
                                                              weights_only=False)["history"]}
    assert on_disk["stage1.mAP"] == pytest.approx(next(iter(history[1].values()))["mAP"])
    assert on_disk["stage2.rank1"] == pytest.approx(next(iter(history[2].values()))["rank1"])
    table = demo_table(summary)
    assert f"{100 * summary['stage2.mAP']:.1f}" in table
    # The headline ARIs come from the best stage-1 model's flip-averaged clustering features (the
    # mean of the two views' unit features, not normalised again), which are what training
    # clusters (cluster.flip), on the images stage 2's first global clustering
    # sees: visible subset 1 of that epoch's split and every infrared image. Recomputed here
    # through the library's distance and DBSCAN and scikit-learn's ARI, the split from the
    # epoch's generator, not through the demo's own helpers; then the same on all images.
    from sklearn.metrics import adjusted_rand_score

    from bmil.cluster import dbscan_labels, jaccard_distance, visible_subsets
    from bmil.engine.data_setup import train_records
    from bmil.inference import extract_features, load_model
    from bmil.records import INFRARED, VISIBLE, record_arrays

    assert cfg.cluster.flip and summary["clustering_training_features"] == summary["clustering"]
    model, _ = load_model(tmp_path / "checkpoints" / "best_stage1.pt", "cpu")
    records = train_records(cfg)
    pids, _, modality = record_arrays(records)
    features = extract_features(model, records, height=64, width=32, batch_size=64, device="cpu", flip=True,
                                workers=0, amp=False, progress=False, desc="check", feature="clustering")
    visible = np.flatnonzero(modality == VISIBLE)
    _, left_out = visible_subsets(len(visible), cfg.cluster.subset_ratio,
                                  run_mod.seed_everything(cfg.train.seed, cfg.train.stage1_epochs))
    seen = np.sort(np.r_[visible[left_out], np.flatnonzero(modality == INFRARED)])
    assert summary["clustering"]["images"] == len(seen) < len(records)
    c = cfg.cluster
    for name, index in (("clustering", seen), ("clustering_all_images", np.arange(len(records)))):
        for aware, key in ((False, "ari_plain"), (True, "ari_modality_aware")):
            distance = jaccard_distance(features[index], k1=c.k1, k2=c.k2,
                                        modality=modality[index] if aware else None)
            labels = dbscan_labels(distance, c.eps, c.min_samples)
            # DBSCAN outliers count as singletons, each its own cluster (label_quality's rule).
            singletons = np.where(labels < 0, labels.max() + 1 + np.arange(len(labels)), labels)
            expected = adjusted_rand_score(pids[index], singletons)
            assert summary[name][key] == pytest.approx(expected, abs=1e-6), (name, key)


@pytest.mark.e2e
@pytest.mark.parametrize("select_last", [False, True], ids=["release", "select_last"])
def test_best_model_is_selected_by_test_rank1_on_the_release_schedule_and_the_last_is_kept(
        synthetic_root, tmp_path, make_config, monkeypatch, select_last):
    """The release's selection: evaluate at a stage's first epoch and every 2 after it
    (``epoch % 2 == 0``), stage 1 on one trial, keep the best test-set Rank-1 among those; the
    last epoch is evaluated and reported beside it but selected only with train.select_last."""
    from types import SimpleNamespace

    # Scripted (Rank-1, mAP): Rank-1 and mAP disagree on the best epoch, and the last epoch of
    # stage 1 (3, off the schedule) has the best Rank-1 of all.
    scripted = iter([(0.3, 0.6), (0.5, 0.2), (0.8, 0.1), (0.2, 0.9), (0.7, 0.3)])
    calls = []

    def fake_evaluate(self, trials=None):
        calls.append((self.current_epoch, trials))
        rank1, mAP = next(scripted)
        return [SimpleNamespace(setting="all", mean={"rank1": rank1, "mAP": mAP})]

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    monkeypatch.setattr(Trainer, "current_epoch", -1, raising=False)
    real_run_epoch = Trainer._run_epoch

    def run_epoch(self, epoch, logger):
        self.current_epoch = epoch
        return real_run_epoch(self, epoch, logger)

    monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
    cfg = make_config(synthetic_root, tmp_path, "train.stage1_epochs=4", "train.stage2_epochs=3",
                      "train.iterations=1", "train.eval_every=2", "eval.trials=3", f"train.select_last={select_last}")
    assert cfg.train.select_by == "rank1" and cfg.train.stage1_eval_trials == 1
    summary = Trainer(cfg, progress=False).fit()
    # Stage 1: epochs 0, 2 and its last (3), one trial; stage 2: its first (4) and 6 (first + 2, also its last).
    assert calls == [(0, 1), (2, 1), (3, 1), (4, None), (6, None)]
    best1 = 3 if select_last else 2
    assert summary["stage1"]["epoch"] == best1
    assert summary["stage1"]["metrics"]["all"]["rank1"] == (0.8 if select_last else 0.5)
    assert summary["stage1"]["last"]["epoch"] == 3 and summary["stage1"]["last"]["metrics"]["all"]["rank1"] == 0.8
    assert summary["stage2"]["epoch"] == 6 and summary["stage2"]["last"]["epoch"] == 6
    assert "test set" in summary["stage1"]["selected_by"]
    ckpt = tmp_path / "checkpoints"
    assert torch.load(ckpt / "best_stage1.pt", weights_only=False)["epoch"] == best1
    assert torch.load(ckpt / "last_stage1.pt", weights_only=False)["epoch"] == 3
    assert torch.load(ckpt / "last_stage2.pt", weights_only=False)["epoch"] == 6


@pytest.mark.e2e
def test_stage_two_starts_from_the_selected_stage_one_model(synthetic_root, tmp_path, make_config, monkeypatch):
    """Stage 1's scores are forced so that the selected epoch (2) is not its last (3): the
    weights at the first stage-2 step are best_stage1.pt's, not the last stage-1 model's."""
    from types import SimpleNamespace

    scripted = iter([0.3, 0.6, 0.4, 0.5])
    monkeypatch.setattr(Trainer, "evaluate", lambda self, trials=None: [
        SimpleNamespace(setting="all", mean={"rank1": next(scripted), "mAP": 0.0})])
    seen = {}
    real_train_epoch = Trainer.train_epoch

    def train_epoch(self, epoch, features, assoc):
        if epoch == self.cfg.train.stage1_epochs:  # before the first stage-2 step
            seen.update({k: v.clone() for k, v in self.run.model.state_dict().items()})
        return real_train_epoch(self, epoch, features, assoc)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    cfg = make_config(synthetic_root, tmp_path, "train.stage1_epochs=4", "train.stage2_epochs=1",
                      "train.iterations=2", "train.eval_every=2")
    summary = Trainer(cfg, progress=False).fit()
    assert summary["stage1"]["epoch"] == 2 and summary["stage1"]["last"]["epoch"] == 3
    ckpt = tmp_path / "checkpoints"
    best = torch.load(ckpt / "best_stage1.pt", weights_only=False)
    last = torch.load(ckpt / "last_stage1.pt", weights_only=False)
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert seen.keys() == best["model"].keys()
    assert all(torch.equal(seen[k], v) for k, v in best["model"].items())
    assert not all(torch.equal(seen[k], v) for k, v in last["model"].items())


@pytest.mark.e2e
def test_selection_by_map_is_an_option(synthetic_root, tmp_path, make_config, monkeypatch):
    from types import SimpleNamespace

    scripted = iter([(0.3, 0.6), (0.5, 0.2)])
    monkeypatch.setattr(Trainer, "evaluate", lambda self, trials=None: [
        SimpleNamespace(setting="all", mean=dict(zip(("rank1", "mAP"), next(scripted), strict=True)))])
    cfg = make_config(synthetic_root, tmp_path, "train.stage1_epochs=2", "train.stage2_epochs=0",
                      "train.iterations=1", "train.eval_every=1", "train.select_by=mAP")
    assert Trainer(cfg, progress=False).fit()["stage1"]["epoch"] == 0


@pytest.mark.e2e
def test_bn_split_feeds_batchnorm_what_one_gpu_of_the_release_sees(synthetic_root, tmp_path, make_config):
    """train.bn_split=2: pass 1 = every first visible view + the first half of the infrared batch,
    pass 2 = the second views + the other half (the release's 2-GPU DataParallel scatter)."""
    trainer = Trainer(make_config(synthetic_root, tmp_path, "train.bn_split=2"), progress=False)
    b = 8
    visible = torch.randn(b, 2, 3, 64, 32)
    infrared = torch.randn(b, 1, 3, 64, 32)
    batches = {0: (visible, torch.arange(b)), 1: (infrared, torch.arange(b))}
    labels = {0: np.arange(b) + 100, 1: np.arange(b) + 200}
    seen = []
    inner = trainer.run.train_model

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, mods):
            seen.append((x.clone(), mods.clone()))
            return self.inner(x, mods)

    trainer.run.train_model = Recording()
    trainer.run.model.train()
    out = trainer.run.forward(batches, labels)
    assert len(seen) == 2
    for j, (x, mods) in enumerate(seen):
        expected = torch.cat([visible[:, j], infrared[j * b // 2:(j + 1) * b // 2, 0]])
        assert torch.equal(x, expected)
        assert torch.equal(mods, torch.tensor([0] * b + [1] * (b // 2)))
    # Labels follow the view-major layout: view 1 of every image, then view 2.
    assert torch.equal(out[0][1], torch.from_numpy(np.r_[labels[0], labels[0]]))
    assert torch.equal(out[1][1], torch.from_numpy(labels[1]))
    # Reassembly: with BatchNorm on running statistics, split and unsplit passes give the same features.
    trainer.run.model.eval()
    split = trainer.run.forward(batches, labels)
    trainer.cfg.train.bn_split = 1
    whole = trainer.run.forward(batches, labels)
    for m in (0, 1):
        torch.testing.assert_close(split[m][0], whole[m][0], atol=1e-5, rtol=1e-4)
        expected = inner(torch.cat([visible[:, 0], visible[:, 1]]) if m == 0 else infrared[:, 0],
                         torch.full((2 * b if m == 0 else b,), m))
        torch.testing.assert_close(whole[m][0], torch.nn.functional.normalize(expected, dim=1), atol=1e-5, rtol=1e-4)


def test_bn_split_updates_running_statistics_from_the_first_pass_only():
    """train.bn_split=2: after one training forward the running mean and variance are the
    momentum update from pass 1's images alone (only DataParallel replica 0's buffers survive),
    while pass 2 is still normalised with its own batch statistics; re-computed by hand."""
    from bmil.engine.forward import forward_batches

    class Toy(torch.nn.Module):  # a BatchNorm over the images, flattened
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3, momentum=0.1)

        def forward(self, x, mods):
            return self.bn(x).flatten(1)

    torch.manual_seed(0)
    b = 4
    visible = torch.randn(b, 2, 3, 4, 2) * 2 + 1
    infrared = torch.randn(b, 1, 3, 4, 2) - 3
    batches = {0: (visible, torch.arange(b)), 1: (infrared, torch.arange(b))}
    labels = {0: np.arange(b), 1: np.arange(b)}
    for split in (1, 2):
        net = Toy().train()
        out = forward_batches(net, batches, labels, torch.device("cpu"), bn_split=split)
        passes = ([torch.cat([visible[:, 0], visible[:, 1], infrared[:, 0]])] if split == 1 else
                  [torch.cat([visible[:, 0], infrared[: b // 2, 0]]), torch.cat([visible[:, 1], infrared[b // 2:, 0]])])
        first = passes[0].double()
        mean = first.mean(dim=(0, 2, 3))
        var = first.var(dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(net.bn.running_mean.double(), 0.9 * torch.zeros(3, dtype=torch.float64) + 0.1 * mean)
        torch.testing.assert_close(net.bn.running_var.double(), 0.9 * torch.ones(3, dtype=torch.float64) + 0.1 * var)
        assert int(net.bn.num_batches_tracked) == 1
        # Each pass normalised with its own batch statistics (biased variance, eps 1e-5).
        for j, x in enumerate(passes):
            x = x.double()
            m = x.mean(dim=(0, 2, 3), keepdim=True)
            v = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            expected = torch.nn.functional.normalize(((x - m) / torch.sqrt(v + 1e-5)).flatten(1), dim=1)
            rows_v = len(visible) * (2 if split == 1 else 1)
            got = torch.cat([out[0].features.reshape(2, b, -1)[j] if split == 2 else out[0].features,
                             out[1].features[j * b // 2:(j + 1) * b // 2] if split == 2 else out[1].features])
            assert got.shape[0] == rows_v + (b if split == 1 else b // 2)
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_bn_split_must_divide_the_batch(make_config, synthetic_root, tmp_path):
    from bmil.errors import ConfigError

    with pytest.raises(ConfigError, match="train.bn_split"):
        make_config(synthetic_root, tmp_path, "train.bn_split=3")  # 4 × 4 = 16 images


@pytest.mark.e2e
def test_scoring_resizes_with_lanczos_and_clustering_with_bicubic(synthetic_root, tmp_path, make_config, monkeypatch):
    """The release scores query/gallery images resized with PIL Lanczos (TestData) and clusters
    features of bicubic-resized images (get_test_loader): eval.resize and the clustering path."""
    from bmil import inference

    seen = record_keyword(monkeypatch, inference, "extract_features", "resize")
    trainer = Trainer(make_config(synthetic_root, tmp_path), progress=False)
    trainer.extract(trainer.run.records[:8], flip=True)
    assert seen == ["bicubic"]
    trainer.evaluate(trials=1)
    assert seen[1:] and set(seen[1:]) == {"lanczos"}
    seen.clear()
    trainer.cfg.eval.resize = "bicubic"
    trainer.evaluate(trials=1)
    assert seen and set(seen) == {"bicubic"}


def test_extraction_memory_format_changes_speed_not_features(synthetic_root):
    """train.channels_last only picks the memory format (docs/benchmarks.md: slower for the demo's
    ResNet-18 at 64×32 on a CPU): the features agree with the contiguous pass."""
    from bmil.data import sysu_train
    from bmil.inference import extract_features
    from bmil.model import build_model

    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none")
    records = sysu_train(synthetic_root)[:12]
    common = dict(height=64, width=32, batch_size=8, device="cpu", workers=0, amp=False, progress=False)
    a = extract_features(model, records, channels_last=True, **common)
    b = extract_features(model, records, channels_last=False, **common)
    assert a.shape == (12, model.feat_dim)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_extraction_cache_gives_the_same_features_without_reading_the_files_again(synthetic_root, tmp_path):
    """``extract_features(cache=...)`` fills the dict with every image's tensor; a later call
    with it returns the same features although the files have become unreadable."""
    import shutil
    from dataclasses import replace
    from pathlib import Path

    from bmil.data import sysu_train
    from bmil.errors import DatasetError
    from bmil.inference import extract_features
    from bmil.model import build_model

    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none")
    records = []
    for i, record in enumerate(sysu_train(synthetic_root)[:10]):
        copy = tmp_path / f"{i}.jpg"
        shutil.copy(record.path, copy)
        records.append(replace(record, path=str(copy)))
    common = dict(height=64, width=32, batch_size=4, device="cpu", workers=0, amp=False, progress=False)
    plain = extract_features(model, records, **common)
    cache: dict = {}
    first = extract_features(model, records, cache=cache, **common)
    assert set(cache) == {r.path for r in records}
    np.testing.assert_array_equal(first, plain)
    for record in records:
        Path(record.path).write_bytes(b"no longer an image")
    np.testing.assert_array_equal(extract_features(model, records, cache=cache, **common), plain)
    with pytest.raises(DatasetError):
        extract_features(model, records, **common)


@pytest.mark.e2e
def test_each_epoch_extracts_only_what_its_association_reads(synthetic_root, tmp_path, make_config, monkeypatch):
    """Stage 1 extracts visible subset 0 of the epoch's split (the draw associate makes from
    the epoch's generator) and every infrared image; stage 2 every image. With
    data.cache_images each training image is decoded at most twice in the whole run (once
    for the training views, once for extraction), not once per epoch."""
    from collections import Counter

    from bmil.cluster import visible_subsets
    from bmil.data import images as images_mod
    from bmil.records import INFRARED, VISIBLE

    cfg = make_config(synthetic_root, tmp_path, "train.stage1_epochs=2", "train.stage2_epochs=1",
                      "train.eval_every=10")
    trainer = Trainer(cfg, progress=False)
    extracted: dict[int, list[str]] = {}
    real_extract = trainer.extract

    def recording(records, **kwargs):
        desc = kwargs.get("desc", "")
        if desc.startswith("epoch "):
            extracted[int(desc.split()[1])] = [r.path for r in records]
        return real_extract(records, **kwargs)

    decoded: Counter = Counter()
    real_load = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda path: decoded.update([path]) or real_load(path))
    monkeypatch.setattr(trainer, "extract", recording)
    trainer.fit()
    paths = np.array([r.path for r in trainer.run.records])
    modality = trainer.run.modality
    visible, infrared = np.flatnonzero(modality == VISIBLE), np.flatnonzero(modality == INFRARED)
    for epoch in (0, 1):
        first, _ = visible_subsets(len(visible), cfg.cluster.subset_ratio,
                                   run_mod.seed_everything(cfg.train.seed, epoch))
        assert sorted(extracted[epoch]) == sorted(paths[np.r_[visible[first], infrared]])
    assert sorted(extracted[2]) == sorted(paths)
    assert max(decoded[p] for p in paths) <= 2


# ------------------------ fixed seeds (engine/run.py, trainer.py)


@pytest.fixture
def no_evaluation(monkeypatch):
    """These tests are about training; the test-set evaluation would only cost time."""
    monkeypatch.setattr(Trainer, "_maybe_evaluate", lambda self, epoch, stage: None)


@pytest.fixture
def restore_determinism():
    """train.deterministic switches a process-wide torch flag: put it back afterwards."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _recording_run(cfg) -> tuple[dict[str, torch.Tensor], list[Association]]:
    """Train ``cfg``; returns the final weights and every epoch's pseudo labels."""
    trainer = Trainer(cfg, progress=False)
    seen: list[Association] = []
    associate = trainer.associate

    def record(features, stage, rng, subsets=None):
        assoc = associate(features, stage, rng, subsets)
        seen.append(assoc)
        return assoc

    trainer.associate = record
    trainer.fit()
    return trainer.run.model.state_dict(), seen


def _same_labels(a: list[Association], b: list[Association]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if any(not np.array_equal(x.intra[m], y.intra[m]) for m in (VISIBLE, INFRARED)):
            return False
        if (x.global_labels is None) != (y.global_labels is None):
            return False
        if x.global_labels is not None and not np.array_equal(x.global_labels, y.global_labels):
            return False
    return True


@pytest.mark.e2e
def test_same_seed_is_bit_identical_and_another_seed_differs(synthetic_root, tmp_path, make_config,
                                                              restore_determinism, no_evaluation):
    """Two CPU runs with one DataLoader worker (so worker seeding is exercised)."""
    common = (*SHORT, "train.deterministic=true", "data.workers=1")
    w1, l1 = _recording_run(make_config(synthetic_root, tmp_path / "a", *common, "train.seed=3"))
    w2, l2 = _recording_run(make_config(synthetic_root, tmp_path / "b", *common, "train.seed=3"))
    assert len(l1) == 2 and l1[1].global_labels is not None
    assert _same_labels(l1, l2)
    for key, value in w1.items():
        assert torch.equal(value, w2[key]), key
    w3, l3 = _recording_run(make_config(synthetic_root, tmp_path / "c", *common, "train.seed=4"))
    assert not _same_labels(l1, l3)
    assert any(not torch.equal(value, w3[key]) for key, value in w1.items())
    # the per-epoch cluster counts are logged too
    for record in read_metrics(tmp_path / "a" / "metrics.jsonl"):
        assert {"clusters/visible", "outliers/visible", "clusters/infrared", "outliers/infrared"} <= set(record)
    assert "global/cross_clusters" in read_metrics(tmp_path / "a" / "metrics.jsonl")[1]


def test_loader_workers_follow_the_epoch_seed_not_the_parent_state():
    """As the trainer builds its loaders: numpy / random inside workers follow the torch seed
    that seed_everything sets, whatever the parent's numpy state."""

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            import random

            return torch.tensor([np.random.randint(1 << 30), random.randint(0, 1 << 30), torch.randint(1 << 30, ())])

    def draws(seed: int, parent_numpy: int) -> torch.Tensor:
        run_mod.seed_everything(seed, 0)
        np.random.seed(parent_numpy)
        loader = torch.utils.data.DataLoader(Draws(), batch_size=1, num_workers=2,
                                             worker_init_fn=run_mod.seed_worker)
        return torch.cat(list(loader))

    a = draws(7, parent_numpy=123)
    assert torch.equal(a, draws(7, parent_numpy=456))
    assert not torch.equal(a, draws(8, parent_numpy=123))
    assert not torch.equal(a[0], a[1])  # the two workers draw differently


# ------------------------ extreme modality ratios (trainer.py, objectives.py)


def _subsample(records, visible: int, infrared: int):
    """The first ``visible`` visible and ``infrared`` infrared records, taken across ids."""
    out = []
    for modality, count in ((VISIBLE, visible), (INFRARED, infrared)):
        of_modality = [r for r in records if r.modality == modality]
        # every k-th record, so several ids are kept
        step = max(1, len(of_modality) // count)
        out += of_modality[::step][:count]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(("visible", "infrared"), [(96, 9), (5, 48)], ids=["10to1", "1to10"])
def test_training_survives_extreme_modality_ratios(visible, infrared, synthetic_root, tmp_path, make_config,
                                                   monkeypatch, caplog, no_evaluation):
    real = run_mod.train_records
    monkeypatch.setattr(run_mod, "train_records", lambda cfg: _subsample(real(cfg), visible, infrared))
    cfg = make_config(synthetic_root, tmp_path, *SHORT, "train.stage1_epochs=0", "train.iterations=2")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, progress=False)
        assert (len(trainer.run.index[VISIBLE]), len(trainer.run.index[INFRARED])) == (visible, infrared)
        trainer.fit()
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["stage"] == 2
    assert finite_losses(tmp_path)
    warnings = caplog.text
    if "loss/intra" not in record:
        assert "intra-modality loss is skipped" in warnings or "no training step" in warnings
    if "loss/global" not in record:
        assert "cross-modality loss is skipped" in warnings or "no cross-modality clustering" in warnings


@pytest.mark.e2e
def test_epoch_whose_global_clusters_each_hold_one_modality(synthetic_root, tmp_path, make_config, monkeypatch,
                                                            caplog, no_evaluation):
    """Every global cluster split into its per-modality parts: the run goes on, says so."""
    from bmil.cluster import association, split_by_modality

    real = association.global_labels

    def one_modality_clusters(features, modality, cfg, split, index=None):
        labels, sub = real(features, modality, cfg, split, index)
        separated = sub.sub_labels  # (cluster, modality) pairs become clusters
        return separated, split_by_modality(separated, modality)

    monkeypatch.setattr(association, "global_labels", one_modality_clusters)
    cfg = make_config(synthetic_root, tmp_path, *SHORT, "train.stage1_epochs=0")
    with caplog.at_level(logging.WARNING):
        Trainer(cfg, progress=False).fit()
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["global/clusters"] > 0 and record["global/cross_clusters"] == 0
    assert math.isfinite(record["loss/global"]) and math.isfinite(record["loss/intra"])
    assert "no global cluster holds both modalities" in caplog.text


@pytest.mark.e2e
def test_visible_batches_draw_train_visible_num_ids_identities(synthetic_root, tmp_path, make_config):
    """The release's RegDB loaders: visible batches of visible_num_ids × K (two views each),
    infrared batches of num_ids × K."""
    trainer = Trainer(make_config(synthetic_root, tmp_path, "train.visible_num_ids=2"), progress=False)
    t = trainer.cfg.train
    assert (t.num_ids, t.num_instances) == (4, 4)
    for m, ids in ((VISIBLE, 2), (INFRARED, 4)):
        labels = np.arange(len(trainer.run.index[m])) % 6
        loader = trainer.run.loader(m, labels, seed=0)
        views, index = next(iter(loader))
        assert loader.batch_size == ids * 4 and views.shape[:2] == (ids * 4, 2 if m == VISIBLE else 1)
        assert len(np.unique(labels[index.numpy()])) == ids


def test_infrared_jitter_off_gives_stage_one_the_stage_two_view(make_config, synthetic_root, tmp_path):
    from bmil.engine.run import stage_views

    on = make_config(synthetic_root, tmp_path)
    off = make_config(synthetic_root, tmp_path, "data.infrared_jitter=false")
    assert on.data.infrared_jitter
    view = {(jitter, stage): repr(stage_views(cfg, stage)[INFRARED])
            for jitter, cfg in ((True, on), (False, off)) for stage in (1, 2)}
    assert "ColorJitter" in view[(True, 1)] and "ColorJitter" not in view[(True, 2)]
    assert view[(False, 1)] == view[(False, 2)] == view[(True, 2)]
