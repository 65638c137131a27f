"""Robustness: degenerate clusterings, a non-finite loss, and bad input through the CLI."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bmil import cli
from bmil.cluster import split_by_modality
from bmil.cluster.association import Association
from bmil.config import save_config
from bmil.data.images import ImageDataset
from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.run import Run, TrainingError
from bmil.engine.run_log import read_metrics
from bmil.engine.trainer import Trainer
from bmil.errors import DatasetError
from bmil.model import build_model, model_signature
from bmil.records import Record


# ------------------------------------------------------------------ degenerate clustering
@pytest.fixture
def trainer(synthetic_root, tmp_path, make_config):
    """A fresh trainer per test (the tests step its model)."""
    return Trainer(make_config(synthetic_root, tmp_path, "train.iterations=1"), progress=False)


def _features(trainer: Trainer) -> np.ndarray:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(trainer.run.records), trainer.run.signature["feat_dim"])).astype(np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def _association(trainer: Trainer, intra: dict[int, np.ndarray], glob: np.ndarray | None) -> Association:
    if glob is None:
        return Association(intra=intra)
    return Association(intra=intra, global_labels=glob, sub=split_by_modality(glob, trainer.run.modality))


def _two_per_modality(trainer: Trainer) -> dict[int, np.ndarray]:
    """Two clusters in each modality: the first and the second half of its images."""
    return {m: (np.arange(len(idx)) >= len(idx) // 2).astype(np.int64) for m, idx in trainer.run.index.items()}


def _run(trainer, assoc, caplog) -> tuple[dict[str, float], str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bmil.engine"):
        losses = trainer.train_epoch(2, _features(trainer), assoc)
    return losses, caplog.text


@pytest.mark.e2e
def test_no_cluster_at_all_skips_the_epoch_with_a_warning(trainer, caplog):
    none = {m: np.full(len(idx), -1) for m, idx in trainer.run.index.items()}
    losses, text = _run(trainer, _association(trainer, none, np.full(len(trainer.run.records), -1)), caplog)
    assert losses == {}
    assert "no visible cluster" in text and "no infrared cluster" in text and "no global cluster" in text


@pytest.mark.e2e
def test_only_single_modality_global_clusters_warn_and_go_on(trainer, caplog):
    # Global cluster = the image's modality-specific half: no cluster holds both modalities.
    # Each image still has one positive (its own sub-cluster) and negatives, so the global
    # loss is well defined; the epoch warns that it only contrasts same-modality prototypes.
    glob = np.empty(len(trainer.run.records), dtype=np.int64)
    for m, idx in trainer.run.index.items():
        glob[idx] = 2 * m + (np.arange(len(idx)) >= len(idx) // 2)
    losses, text = _run(trainer, _association(trainer, _two_per_modality(trainer), glob), caplog)
    assert set(losses) == {"loss/intra", "loss/global"}
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert "no global cluster holds both modalities" in text


@pytest.mark.e2e
def test_one_giant_cluster_skips_the_losses_that_need_two(trainer, caplog):
    giant = {m: np.zeros(len(idx), dtype=np.int64) for m, idx in trainer.run.index.items()}
    whole = np.zeros(len(trainer.run.records), dtype=np.int64)
    losses, text = _run(trainer, _association(trainer, giant, whole), caplog)
    assert losses == {}
    assert "only one visible cluster" in text and "only one global cluster" in text


@pytest.mark.e2e
def test_one_modality_without_clusters_trains_the_other(trainer, caplog):
    labels = _two_per_modality(trainer)
    labels[1] = np.full_like(labels[1], -1)
    before = {k: v.clone() for k, v in trainer.run.model.state_dict().items()}
    losses, text = _run(trainer, _association(trainer, labels, None), caplog)
    assert set(losses) == {"loss/intra"} and np.isfinite(losses["loss/intra"])
    assert "no infrared cluster" in text
    changed = [k for k, v in trainer.run.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("visible_stem") for k in changed)
    assert not any(k.startswith("infrared_stem.") and "running" not in k for k in changed)


# ------------------------------------------------------------------ non-finite loss
@pytest.mark.e2e
def test_non_finite_loss_stops_with_epoch_and_step_and_resumes(synthetic_root, tmp_path, make_config,
                                                               monkeypatch, capsys):
    small = ("train.stage1_epochs=2", "train.stage2_epochs=0", "train.eval_every=5", "train.num_ids=2",
             "train.num_instances=2", "eval.trials=1")
    cfg = make_config(synthetic_root, tmp_path / "run", *small)
    config_file = tmp_path / "tiny.yaml"
    save_config(cfg, config_file)
    original = Run.step

    def poisoned(self, loss, epoch, step):
        return original(self, loss * float("nan") if (epoch, step) == (1, 1) else loss, epoch, step)

    monkeypatch.setattr(Run, "step", poisoned)
    code = cli.main(["-q", "train", "--config", str(config_file)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert err.strip() == (f"error: the loss became non-finite at epoch 1 step 1; {last} holds the end of epoch 0: "
                           "lower train.lr and continue with --resume")
    assert torch.load(last, weights_only=False)["epoch"] == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0]

    monkeypatch.undo()
    lowered = make_config(synthetic_root, tmp_path / "run", *small, "train.lr=1e-4")
    resumed = Trainer(lowered, resume=True, progress=False)
    assert resumed.start_epoch == 1
    assert resumed.run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    resumed.fit()
    assert torch.load(last, weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


@pytest.mark.e2e
def test_non_finite_loss_in_the_first_epoch_says_nothing_was_saved(trainer):
    before = {k: v.clone() for k, v in trainer.run.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"epoch 0 step 3; no epoch has finished yet"):
        trainer.run.step(torch.tensor(float("inf")), 0, 3)
    assert all(torch.equal(v, before[k]) for k, v in trainer.run.model.state_dict().items())  # no step taken


# ------------------------------------------------------------------ bad input through the CLI
@pytest.fixture(scope="module")
def bad_inputs(synthetic_root, tmp_path_factory, make_config):
    """A tiny config file, a dataset copy with one corrupt training image, and checkpoints."""
    base = tmp_path_factory.mktemp("bad_inputs")
    config = base / "tiny.yaml"
    save_config(make_config(synthetic_root, base / "out"), config)
    corrupt_root = base / "corrupt"
    shutil.copytree(synthetic_root, corrupt_root)
    train_id = (corrupt_root / "exp" / "train_id.txt").read_text().split(",")[0].strip()
    victim = sorted((corrupt_root / "cam1" / f"{int(train_id):04d}").iterdir())[0]
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    (base / "empty").mkdir()
    model = build_model(depth=18, non_local=False, pretrained="none")
    depth18 = base / "depth18.pt"
    save_checkpoint({"model": model.state_dict(), "signature": model_signature(model)}, depth18)
    garbage = base / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    not_yaml = base / "broken.yaml"
    not_yaml.write_text("train: [unclosed\n")
    return {"config": str(config), "base": base, "corrupt": corrupt_root, "victim": victim,
            "depth18": depth18, "garbage": garbage, "not_yaml": not_yaml}


SWEEP = {
    "missing config file": ["train", "--config", "{base}/nope.yaml"],
    "config file not YAML": ["train", "--config", "{not_yaml}"],
    "missing dataset root": ["train", "--config", "{config}", "data.dataset=sysu", "data.root={base}/nope"],
    "SYSU layout missing": ["train", "--config", "{config}", "data.dataset=sysu", "data.root={base}/empty"],
    "RegDB layout missing": ["train", "--config", "{config}", "data.dataset=regdb", "data.root={base}/empty"],
    "folder layout missing": ["train", "--config", "{config}", "data.dataset=folder", "data.root={base}/empty"],
    "corrupt image": ["train", "--config", "{config}", "data.dataset=sysu", "data.root={corrupt}"],
    "unknown key": ["train", "--config", "{config}", "train.nope=1"],
    "wrong type": ["train", "--config", "{config}", "train.lr=fast"],
    "wrong choice": ["train", "--config", "{config}", "data.dataset=imagenet"],
    "negative workers": ["train", "--config", "{config}", "data.workers=-2"],
    "missing checkpoint": ["eval", "--config", "{config}", "--checkpoint", "{base}/nope.pt"],
    "garbage checkpoint": ["eval", "--config", "{config}", "--checkpoint", "{garbage}"],
    "other architecture (eval)": ["eval", "--config", "{config}", "model.depth=34", "--checkpoint", "{depth18}"],
    "other architecture (init_from)": ["train", "--config", "{config}", "model.depth=50", "train.init_from={depth18}"],
    "missing data for check-data": ["check-data", "--dataset", "sysu", "{base}/nope"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(SWEEP))
def test_bad_input_gives_one_sentence_and_nonzero_exit(case, bad_inputs, capsys):
    argv = ["-q", *(arg.format(**bad_inputs) for arg in SWEEP[case])]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    if case == "corrupt image":
        assert str(bad_inputs["victim"]) in lines[0]


def test_error_from_a_dataloader_worker_is_still_one_sentence(bad_inputs):
    """DataLoader re-raises a worker's error with the worker's traceback in its message."""
    record = Record(path=str(bad_inputs["victim"]), pid=0, camid=1, modality=0)
    loader = DataLoader(ImageDataset([record], lambda image: torch.zeros(1)), num_workers=1)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what torch does
    sentence = cli.error_sentence(caught.value)
    assert sentence.startswith(f"cannot read image {bad_inputs['victim']}") and "\n" not in sentence

