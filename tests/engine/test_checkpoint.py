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


def test_the_file_is_synced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """Without fsync before the rename, a power cut can leave the new name on empty blocks."""
    calls = []
    real_fsync, real_replace = ckpt.os.fsync, ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    ckpt.save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    assert calls == ["fsync", "replace"]


def test_adam_state_follows_the_parameters_layout_on_load():
    """A checkpoint written from NCHW parameters (the CPU) loaded for channels_last ones (CUDA):
    the moments take the parameters' strides, dtype and device, values unchanged."""
    from bmil.engine.run import adam, align_optimizer_state

    source = torch.nn.Conv2d(3, 4, 3)
    opt = adam(list(source.parameters()), 1e-3, 0.0)
    source(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    saved = opt.state_dict()

    target = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt2 = adam(list(target.parameters()), 1e-3, 0.0)
    opt2.load_state_dict(saved)
    moment = opt2.state[target.weight]["exp_avg"]
    assert not moment.is_contiguous(memory_format=torch.channels_last)  # what load_state_dict leaves
    align_optimizer_state(opt2)
    for param in target.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt2.state[param][key]
            assert value.stride() == param.stride() and value.dtype == param.dtype
    index = {id(p): i for i, p in enumerate(target.parameters())}
    for param in target.parameters():
        expected = saved["state"][index[id(param)]]["exp_avg"]
        assert torch.equal(opt2.state[param]["exp_avg"], expected)
    target(torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
    opt2.step()  # the fused kernel accepts the aligned state


def test_resume_restores_progress_best_scores_and_memories(synthetic_root, tmp_path, make_config):
    """What --resume reads back: start epoch, the best-so-far and last evaluations of each
    stage, the history, weights and optimizer; the checkpoint carries the memories."""
    from bmil.engine.run import StageBest, build_run

    cfg = make_config(synthetic_root, tmp_path / "run")
    run = build_run(cfg)
    run.best = {1: StageBest(0.42, 1, {"all": {"mAP": 0.42}}), 2: StageBest(0.5, 3, {"all": {"mAP": 0.5}})}
    run.last = {1: StageBest(0.4, 1, {"all": {"mAP": 0.4}}), 2: StageBest()}
    run.history = [{"epoch": 1, "stage": 1, "metrics": {"all": {"mAP": 0.42}}}]
    memories = {"intra": {0: {"mean": torch.ones(2, 3)}}, "global": None}
    with torch.no_grad():
        next(run.model.parameters()).add_(1.0)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    state = run.state(1, 1, memories)
    assert state["memories"] is memories
    ckpt.save_checkpoint(state, run.ckpt_dir / "last.pt")

    resumed = build_run(cfg, resume=True)
    assert resumed.start_epoch == 2
    assert resumed.best == run.best and resumed.last == run.last and resumed.history == run.history
    assert all(torch.equal(v, weights[k]) for k, v in resumed.model.state_dict().items())
    saved = ckpt.load_checkpoint(run.ckpt_dir / "last.pt")
    assert torch.equal(saved["memories"]["intra"][0]["mean"], torch.ones(2, 3))


@pytest.mark.cuda
def test_fused_adam_steps_on_cuda_after_loading_a_cpu_state():
    """The crash this guards against: fused Adam on CUDA refuses moments whose layout differs
    from the channels_last parameters they belong to."""
    from bmil.engine.run import adam, align_optimizer_state

    source = torch.nn.Conv2d(3, 4, 3)
    opt = adam(list(source.parameters()), 1e-3, 0.0)
    source(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    target = torch.nn.Conv2d(3, 4, 3).cuda().to(memory_format=torch.channels_last)
    opt2 = adam(list(target.parameters()), 1e-3, 0.0)
    opt2.load_state_dict(opt.state_dict())
    align_optimizer_state(opt2)
    target(torch.randn(2, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)).sum().backward()
    opt2.step()
    assert all(opt2.state[p]["exp_avg"].is_cuda for p in target.parameters())
