"""An unlabelled user folder (data/folder.py: ROOT/{visible,infrared}/<camera>/*.png, no person
ids) through configs/folder.yaml: training with finite losses and no metric, ``bmil eval`` saying
why there is no score, ``bmil extract`` and ``bmil search`` on the folder's images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmil import cli
from bmil.config import load_config
from bmil.engine.run_log import read_metrics
from bmil.engine.trainer import Trainer
from helpers import SHORT, finite_losses

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
    from bmil.commands import preset_path

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


@pytest.mark.e2e
def test_folder_preset_trains_with_finite_losses_and_reports_no_metric(folder_run):
    cfg, out, summary, messages = folder_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    losses = finite_losses(out)
    assert "loss/intra" in records[0] and len(losses) >= 2
    assert not any(key.startswith("eval/") or key.endswith("/ari") for r in records for key in r)
    # no model is selected and no last score kept: nothing was evaluated
    assert {k: (v["epoch"], v["metrics"], v["last"]) for k, v in summary.items()} == {
        stage: (-1, {}, {"epoch": -1, "metrics": {}}) for stage in ("stage1", "stage2")}
    assert "no person ids" in " ".join(messages)
    assert not (out / "checkpoints" / "best_stage1.pt").exists()


@pytest.mark.e2e
def test_folder_eval_says_why_there_is_no_score(folder_run, capsys):
    cfg, out, _, _ = folder_run
    code = cli.main(["-q", "eval", "--config", "folder", "--checkpoint", str(out / "checkpoints" / "last.pt"),
                     f"data.root={cfg.data.root}", f"output={out}",
                     "model.depth=18", "model.non_local=false", "model.pretrained=none"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "no evaluation" in printed and "no person ids" in printed
    assert "mAP" not in printed and "nan" not in printed.lower() and "100" not in printed


@pytest.mark.e2e
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
