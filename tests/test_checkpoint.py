"""Atomic checkpoints: an interrupted write never damages the previous file."""

from __future__ import annotations

import pytest
import torch

from bmil.engine import checkpoint as ckpt
from bmil.errors import CheckpointError


def test_round_trip(tmp_path):
    path = tmp_path / "c" / "last.pt"
    ckpt.save_checkpoint({"model": {"w": torch.arange(3.0)}, "epoch": 4}, path)
    state = ckpt.load_checkpoint(path)
    assert state["epoch"] == 4 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, path)

    def dies_halfway(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill during the write

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_checkpoints_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        ckpt.load_checkpoint(foreign)
