"""A training run's set-up (engine/run.py, ``build_run``) on the tiny synthetic dataset: the
records and arrays its SYSU-MM01 layout implies, re-read from the folders here, the
per-modality index and datasets, the optimiser; and resume restoring the optimiser state
exactly (the next step from a resumed run equals the next step of the run it continues)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.run import Run, build_run
from bmil.records import INFRARED, VISIBLE
from conftest import TINY_SYNTHETIC

INFRARED_CAMERAS = (3, 6)


def _expected_images(root: Path) -> list[tuple[str, int, int, int]]:
    """(path, pid, camera, modality) of every training image, from the folders: the ids of
    exp/train_id.txt and exp/val_id.txt, cameras cam1…cam6, cam3 and cam6 infrared."""
    ids = set()
    for name in ("train_id.txt", "val_id.txt"):
        ids |= {int(v) for v in (root / "exp" / name).read_text().replace("\n", ",").split(",") if v.strip()}
    out = []
    for camera in range(1, 7):
        for pid in sorted(ids):
            for path in sorted((root / f"cam{camera}" / f"{pid:04d}").iterdir()):
                out.append((str(path), pid, camera, int(camera in INFRARED_CAMERAS)))
    return out


def test_build_run_holds_the_records_arrays_and_index_the_folders_imply(synthetic_root, tmp_path, make_config):
    cfg = make_config(synthetic_root, tmp_path)
    run = build_run(cfg)
    expected = _expected_images(synthetic_root)
    t = TINY_SYNTHETIC
    # 8 train ids × 3 images × (4 visible + 2 infrared cameras).
    assert len(expected) == t["num_train_ids"] * t["images_per_camera"] * 6 == 144
    by_path = {path: rest for path, *rest in expected}
    assert sorted(str(Path(r.path)) for r in run.records) == sorted(by_path)
    n = len(expected)
    for array in (run.pids, run.camids, run.modality):
        assert array.shape == (n,) and array.dtype == np.int64
    for i, record in enumerate(run.records):
        pid, camera, modality = by_path[str(Path(record.path))]
        assert (run.pids[i], run.camids[i], run.modality[i]) == (pid, camera, modality)
    visible = [i for i, r in enumerate(run.records) if by_path[str(Path(r.path))][2] == VISIBLE]
    infrared = [i for i, r in enumerate(run.records) if by_path[str(Path(r.path))][2] == INFRARED]
    assert (len(visible), len(infrared)) == (96, 48)
    assert run.index[VISIBLE].tolist() == visible and run.index[INFRARED].tolist() == infrared
    for m, positions in ((VISIBLE, visible), (INFRARED, infrared)):
        assert [r.path for r in run.datasets[m].records] == [run.records[i].path for i in positions]
    assert run.labelled
    assert run.signature["depth"] == 18 and run.signature["feat_dim"] == 512
    assert run.start_epoch == 0 and run.train_model is run.model  # one process: no DDP wrapper
    params = [p for p in run.model.parameters() if p.requires_grad]
    (group,) = run.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert group["lr"] == cfg.train.lr and group["weight_decay"] == cfg.train.weight_decay


def _train_steps(run: Run, steps: int) -> None:
    """Optimiser steps on a fixed loss of a fixed batch (no randomness)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 32, generator=g)
    modality = torch.tensor([VISIBLE, INFRARED, VISIBLE, INFRARED])
    run.model.train()
    for step in range(steps):
        run.step(run.model(x, modality).pow(2).mean(), 0, step)


def test_resume_restores_the_optimiser_state_and_the_next_step(synthetic_root, tmp_path, make_config):
    cfg = make_config(synthetic_root, tmp_path, "train.lr_step=1", "train.lr_gamma=0.5")
    run = build_run(cfg)
    _train_steps(run, 2)
    run.scheduler.step()  # epoch 0 ends: lr × 0.5
    save_checkpoint(run.state(0, 1, None), run.ckpt_dir / "last.pt")

    resumed = build_run(cfg, resume=True)
    assert resumed.start_epoch == 1
    assert resumed.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"] == cfg.train.lr * 0.5
    assert resumed.scheduler.last_epoch == run.scheduler.last_epoch == 1
    saved, restored = run.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and len(saved) == len(run.optimizer.param_groups[0]["params"])
    for key, state in saved.items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], restored[key][name]), (key, name)
    # The next step: bit-identical to the uninterrupted run's; a fresh optimiser's differs.
    fresh = build_run(cfg)
    fresh.model.load_state_dict(run.model.state_dict())
    for other in (run, resumed, fresh):
        _train_steps(other, 1)
    weights, fresh_weights = dict(run.model.named_parameters()), dict(fresh.model.named_parameters())
    assert all(torch.equal(p, weights[k]) for k, p in resumed.model.named_parameters())
    assert any(not torch.equal(p, fresh_weights[k]) for k, p in weights.items())
