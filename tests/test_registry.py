"""The dataset registry, eval directions (their spellings, and what reaches the protocol
runner), the device default of data.workers, apply_overrides, and the one model loader's
mismatch sentences."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import bmil
from bmil.config import Config, apply_overrides, config_to_dict, default_workers, load_config
from bmil.data import DATASETS, PUBLISHED_COUNTS, dataset_names, get_dataset
from bmil.data.registry import eval_direction
from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.datasets import loader_workers
from bmil.errors import CheckpointError, ConfigError, DatasetError
from bmil.inference import load_model
from bmil.model import build_model, model_signature

PACKAGE = Path(bmil.__file__).parent


def string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_engine_and_cli_spell_no_dataset_name():
    files = [*sorted((PACKAGE / "engine").glob("*.py")), PACKAGE / "cli.py"]
    for path in files:
        assert not string_constants(path) & set(DATASETS), path


def test_registry_entries():
    assert dataset_names() == ("synthetic", "sysu", "regdb", "llcm", "folder")
    assert dataset_names(checkable=True) == ("sysu", "regdb", "llcm", "folder")
    assert [n for n, d in DATASETS.items() if d.per_trial] == ["regdb"]
    assert PUBLISHED_COUNTS["sysu"]["query images"] == 3803 and PUBLISHED_COUNTS["regdb"]["train ids"] == 206
    assert PUBLISHED_COUNTS["llcm"] == {"train ids": 713, "test ids": 351}
    with pytest.raises(DatasetError, match="unknown dataset 'synthetic': expected one of sysu, regdb, llcm, folder"):
        get_dataset("synthetic", checkable=True)
    with pytest.raises(ConfigError, match="'data.dataset' must be one of synthetic, sysu, regdb, llcm, folder"):
        load_config(None, ["data.dataset=market"])
    with pytest.raises(ConfigError, match="'data.trial' must be 1..10 for RegDB, got 11"):
        load_config(None, ["data.dataset=regdb", "data.trial=11"])


@pytest.mark.parametrize(("dataset", "asked", "passed"), [
    ("regdb", "v2t", "v2t"), ("regdb", "v2i", "v2t"), ("regdb", "i2v", "t2v"),
    ("llcm", "v2t", "v2i"), ("llcm", "i2v", "i2v"), ("folder", "t2v", "i2v"), ("folder", "both", "both"),
    ("sysu", "v2i", "both"),  # SYSU-MM01 has infrared queries only: the key is ignored, as before
])
def test_eval_direction_spellings(dataset, asked, passed):
    assert eval_direction(load_config(None, [f"data.dataset={dataset}", f"eval.direction={asked}"])) == passed


def test_eval_direction_outside_the_choices_is_refused():
    with pytest.raises(ConfigError, match="'eval.direction' must be one of both, v2t, t2v, v2i, i2v"):
        load_config(None, ["eval.direction=sideways"])


@pytest.mark.parametrize(("dataset", "direction", "passed"), [
    ("regdb", "v2t", "v2t"), ("regdb", "t2v", "t2v"), ("regdb", "both", "both"),
    ("llcm", "v2t", "v2i"), ("llcm", "t2v", "i2v"),
])
def test_eval_direction_reaches_the_protocol(dataset, direction, passed, monkeypatch):
    from bmil import evaluation
    from bmil.engine.datasets import run_protocol

    seen = {}

    def fake(extract, root, **kwargs):
        seen.update(kwargs)
        return ["result"]

    monkeypatch.setattr(evaluation, f"evaluate_{dataset}", fake)
    cfg = load_config(None, [f"data.dataset={dataset}", f"eval.direction={direction}"])
    assert run_protocol(cfg, lambda records: None) == ["result"]
    assert seen["direction"] == passed
    with pytest.raises(ConfigError, match="eval.direction"):
        load_config(None, ["eval.direction=sideways"])


def test_workers_unset_follow_the_device(monkeypatch):
    cfg = Config()
    assert cfg.data.workers is None
    assert loader_workers(cfg, "cpu") == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers(cuda=True) == 4 and loader_workers(cfg, torch.device("cuda", 0)) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(cuda=True) == 8  # at most 8
    assert loader_workers(load_config(None, ["data.workers=3"]), "cpu") == 3  # set by the user: kept
    assert load_config(None, ["data.workers=null"]).data.workers is None
    with pytest.raises(ConfigError, match="'data.workers' expects an integer"):
        load_config(None, ["data.workers=many"])


def test_folder_preset_leaves_workers_to_the_device():
    from bmil.commands import preset_path

    assert load_config(preset_path("folder")).data.workers is None
    assert load_config(preset_path("sysu")).data.workers == 8


def test_apply_overrides_returns_a_validated_copy():
    cfg = load_config(None, ["data.dataset=sysu"])
    changed = apply_overrides(cfg, ["data.root=/elsewhere", "train.lr=1e-3"])
    assert (changed.data.root, changed.train.lr) == ("/elsewhere", 0.001)
    assert config_to_dict(cfg) == config_to_dict(load_config(None, ["data.dataset=sysu"]))  # untouched
    with pytest.raises(ConfigError, match="unknown configuration key 'train.nope'"):
        apply_overrides(cfg, ["train.nope=1"])
    with pytest.raises(ConfigError, match="'data.trial' must be 1..10 for RegDB"):
        apply_overrides(cfg, ["data.dataset=regdb", "data.trial=0"])


def test_load_model_checks_the_users_model_section(tmp_path):
    cfg = load_config(None, ["model.depth=18", "model.non_local=false", "model.pretrained=none"])
    model = build_model(depth=18, non_local=False, pretrained="none")
    path = tmp_path / "m.pt"
    save_checkpoint({"config": config_to_dict(cfg), "signature": model_signature(model),
                     "model": model.state_dict()}, path)
    loaded, saved = load_model(path, expected=cfg.model)
    assert saved.model.depth == 18
    other = load_config(None, ["model.depth=34", "model.non_local=false"]).model
    with pytest.raises(CheckpointError) as err:
        load_model(path, expected=other)
    assert "was trained with depth=18" in str(err.value) and "set model.depth to match it" in str(err.value)
    assert "\n" not in str(err.value)
