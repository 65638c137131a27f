"""Traps that need a training run (issue 9), sections by the module they test: seeds, extreme
modality ratios, the user's own unlabelled folders."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmil import cli
from bmil.config import load_config
from bmil.data.records import INFRARED, VISIBLE
from bmil.engine import trainer as trainer_mod
from bmil.engine.association import Association
from bmil.engine.run_log import read_metrics
from bmil.engine.trainer import Trainer

# One epoch per stage, one step, 2 × 4 images per modality: the smallest run that crosses
# the stage boundary.
SHORT = ("train.stage1_epochs=1", "train.stage2_epochs=1", "train.iterations=1", "train.eval_every=5",
         "train.num_ids=2", "train.num_instances=4")


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

    def record(features, stage, rng):
        assoc = associate(features, stage, rng)
        seen.append(assoc)
        return assoc

    trainer.associate = record
    trainer.fit()
    return trainer.model.state_dict(), seen


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


# ------------------------ engine/run.py, trainer.py: fixed seeds


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
        trainer_mod.seed_everything(seed, 0)
        np.random.seed(parent_numpy)
        loader = torch.utils.data.DataLoader(Draws(), batch_size=1, num_workers=2,
                                             worker_init_fn=trainer_mod.seed_worker)
        return torch.cat(list(loader))

    a = draws(7, parent_numpy=123)
    assert torch.equal(a, draws(7, parent_numpy=456))
    assert not torch.equal(a, draws(8, parent_numpy=123))
    assert not torch.equal(a[0], a[1])  # the two workers draw differently


# ------------------------ trainer.py, objectives.py: extreme modality ratios


def _subsample(records, visible: int, infrared: int):
    """The first ``visible`` visible and ``infrared`` infrared records, taken across ids."""
    out = []
    for modality, count in ((VISIBLE, visible), (INFRARED, infrared)):
        of_modality = [r for r in records if r.modality == modality]
        # every k-th record, so several ids are kept
        step = max(1, len(of_modality) // count)
        out += of_modality[::step][:count]
    return out


def _finite_losses(out: Path) -> list[float]:
    values = []
    for record in read_metrics(out / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith("loss/"):
                assert math.isfinite(value), (record["epoch"], key, value)
                values.append(value)
    return values


@pytest.mark.parametrize(("visible", "infrared"), [(96, 9), (5, 48)], ids=["10to1", "1to10"])
def test_training_survives_extreme_modality_ratios(visible, infrared, synthetic_root, tmp_path, make_config,
                                                   monkeypatch, caplog, no_evaluation):
    from bmil.engine import run as run_mod

    real = run_mod.train_records
    monkeypatch.setattr(run_mod, "train_records", lambda cfg: _subsample(real(cfg), visible, infrared))
    cfg = make_config(synthetic_root, tmp_path, *SHORT, "train.stage1_epochs=0", "train.iterations=2")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, progress=False)
        assert (len(trainer.index[VISIBLE]), len(trainer.index[INFRARED])) == (visible, infrared)
        trainer.fit()
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["stage"] == 2
    assert _finite_losses(tmp_path)
    warnings = caplog.text
    if "loss/intra" not in record:
        assert "intra-modality loss is skipped" in warnings or "no training step" in warnings
    if "loss/global" not in record:
        assert "cross-modality loss is skipped" in warnings or "no cross-modality clustering" in warnings


def test_epoch_whose_global_clusters_each_hold_one_modality(synthetic_root, tmp_path, make_config, monkeypatch,
                                                            caplog, no_evaluation):
    """Every global cluster split into its per-modality parts: the run goes on, says so."""
    from bmil.cluster import split_by_modality
    from bmil.engine import association

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


# ------------------------ data/folder.py through training, eval, extract, search: the user's own folders


PEOPLE = 4
IMAGES_PER_PERSON = 6


def _person_image(person: int, shot: int, infrared: bool, rng: np.random.Generator) -> Image.Image:
    """64×32 image: a person-specific colour and stripe pattern, small per-shot noise."""
    h, w = 64, 32
    colour = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220], [220, 200, 40]][person], dtype=np.float64)
    rows = np.arange(h)[:, None, None]
    stripes = (np.sin(rows * (0.3 + 0.35 * person)) > 0).astype(np.float64)
    image = np.broadcast_to(stripes * colour + (1 - stripes) * (255 - colour), (h, w, 3)).copy()
    if infrared:
        image[:] = image.mean(axis=2, keepdims=True)
    image += rng.normal(0, 6 + shot, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """ROOT/visible/door/*.png and ROOT/infrared/gate/*.png: one camera per modality, no ids."""
    root = tmp_path_factory.mktemp("my_images")
    rng = np.random.default_rng(0)
    for modality, camera in (("visible", "door"), ("infrared", "gate")):
        folder = root / modality / camera
        folder.mkdir(parents=True)
        for person in range(PEOPLE):
            for shot in range(IMAGES_PER_PERSON):
                _person_image(person, shot, modality == "infrared", rng).save(folder / f"{person}_{shot}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(user_folder, tmp_path_factory):
    """configs/folder.yaml on the generated folders, shrunk to a CPU-sized model and run."""
    from bmil.cli import preset_path

    out = tmp_path_factory.mktemp("folder_run")
    cfg = load_config(preset_path("folder"), [
        f"data.root={user_folder}", f"output={out}", "data.height=64", "data.width=32", "data.workers=0",
        "data.cache_images=true", "model.depth=18", "model.non_local=false", "model.pretrained=none",
        "cluster.k1=8", "cluster.k2=3", *SHORT, "train.iterations=2", "train.eval_every=1", "train.extract_batch=64",
    ])
    assert cfg.data.dataset == "folder"
    logger = logging.getLogger("bmil")
    handler = _ListHandler()
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = Trainer(cfg, progress=False).fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return cfg, out, summary, handler.messages


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_folder_preset_trains_with_finite_losses_and_reports_no_metric(folder_run):
    cfg, out, summary, messages = folder_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    losses = _finite_losses(out)
    assert "loss/intra" in records[0] and len(losses) >= 2
    assert not any(key.startswith("eval/") or key.endswith("/ari") for r in records for key in r)
    # no model is selected and no last score kept: nothing was evaluated
    assert {k: (v["epoch"], v["metrics"], v["last"]) for k, v in summary.items()} == {
        stage: (-1, {}, {"epoch": -1, "metrics": {}}) for stage in ("stage1", "stage2")}
    assert "no person ids" in " ".join(messages)
    assert not (out / "checkpoints" / "best_stage1.pt").exists()


def test_folder_eval_says_why_there_is_no_score(folder_run, capsys):
    cfg, out, _, _ = folder_run
    code = cli.main(["-q", "eval", "--config", "folder", "--checkpoint", str(out / "checkpoints" / "last.pt"),
                     f"data.root={cfg.data.root}", f"output={out}",
                     "model.depth=18", "model.non_local=false", "model.pretrained=none"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "no evaluation" in printed and "no person ids" in printed
    assert "mAP" not in printed and "nan" not in printed.lower() and "100" not in printed


def test_extract_and_search_work_on_the_folder_data(folder_run, user_folder, tmp_path, capsys):
    _, out, _, _ = folder_run
    checkpoint = str(out / "checkpoints" / "last.pt")
    features = tmp_path / "gallery.npz"
    code = cli.main(["-q", "extract", "--checkpoint", checkpoint, "--images", str(user_folder / "infrared"),
                     "--modality", "infrared", "--out", str(features), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert f"{PEOPLE * IMAGES_PER_PERSON} infrared images" in capsys.readouterr().out
    query = user_folder / "visible" / "door" / "2_0.png"
    code = cli.main(["-q", "search", "--checkpoint", checkpoint, "--query", str(query), "--gallery", str(features),
                     "--top", "3", "--out", str(tmp_path / "ranks.png"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    ranked = [line for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert len(ranked) == 3 and all("gate" in line and " id " not in line for line in ranked)
    assert (tmp_path / "ranks.png").is_file()
