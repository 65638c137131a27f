"""The dataset registry, eval directions (their spellings, and what reaches the protocol
runner), the device default of data.workers, apply_overrides, and the one model loader's
mismatch sentences."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import bmil
from bmil.config import Config, apply_overrides, config_to_dict, default_workers, load_config
from bmil.datasets import DATASETS, PUBLISHED_COUNTS, dataset_names, eval_direction, get_dataset
from bmil.engine.checkpoint import save_checkpoint
from bmil.engine.data_setup import loader_workers
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
    ("llcm", "v2t", "v2i"), ("llcm", "t2v", "i2v"), ("llcm", "both", "both"),
])
def test_eval_direction_reaches_the_protocol(dataset, direction, passed, monkeypatch):
    from bmil import evaluation
    from bmil.engine.data_setup import run_protocol
    from bmil.records import INFRARED, VISIBLE

    seen = {}

    def fake(extract, **kwargs):
        seen.update(kwargs)
        return ["result"]

    monkeypatch.setattr(evaluation, f"evaluate_{dataset}", fake)
    monkeypatch.setattr("bmil.data.regdb.regdb_test", lambda root, trial: ([], []))
    monkeypatch.setattr("bmil.data.llcm.llcm_query", lambda root, modality: [])
    monkeypatch.setattr("bmil.data.llcm.llcm_gallery", lambda root, modality, trial=0: [])
    cfg = load_config(None, [f"data.dataset={dataset}", f"eval.direction={direction}"])
    assert run_protocol(cfg, lambda records: None, trials=3) == ["result"]
    assert seen["direction"] == passed
    if dataset == "llcm":  # only the modalities the direction needs are read
        query, gallery = {"v2i": ({VISIBLE}, {INFRARED}), "i2v": ({INFRARED}, {VISIBLE}),
                          "both": ({VISIBLE, INFRARED}, {VISIBLE, INFRARED})}[passed]
        assert set(seen["queries"]) == query and set(seen["galleries"]) == gallery
        assert all(len(trials) == 3 for trials in seen["galleries"].values())
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


# ---------------------------------------------------------------- a user's own dataset


def _my_reader(root, split):
    """A user's reader: ROOT/<split>/<vis|ir>/<pid>_<camera>_<n>.png -> records."""
    from bmil.records import INFRARED, VISIBLE, Record

    records = []
    for folder, modality in (("vis", VISIBLE), ("ir", INFRARED)):
        for path in sorted((Path(root) / split / folder).glob("*.png")):
            pid, camid, _ = path.stem.split("_")
            records.append(Record(str(path), int(pid), int(camid), modality))
    return records


def _my_test(extract, root, cfg, trials):
    from bmil.evaluation import evaluate_folder

    return evaluate_folder(extract, _my_reader(root, "test"), direction=eval_direction(cfg))


@pytest.fixture
def my_root(tmp_path):
    from PIL import Image

    for split, pids in (("train", (1, 2)), ("test", (3, 4, 5))):
        for folder, camid in (("vis", 1), ("ir", 2)):
            (tmp_path / split / folder).mkdir(parents=True)
            for pid in pids:
                for n in range(2):
                    colour = (40 * pid, 20 * n, 200 - 30 * pid)
                    Image.new("RGB", (8, 16), colour).save(tmp_path / split / folder / f"{pid}_{camid}_{n}.png")
    return tmp_path


@pytest.fixture
def registry():
    """The registry module; whatever a test registers is removed afterwards."""
    from bmil import datasets

    before = dict(datasets.DATASETS)
    yield datasets
    datasets._REGISTRY.clear()  # the registry's own dict, restored for the next tests
    datasets._REGISTRY.update(before)


def test_a_registered_dataset_is_configured_trained_and_scored_like_a_built_in(my_root, registry, tmp_path):
    from bmil.engine.data_setup import can_score, run_protocol, train_records

    mine = registry.Dataset("mine", "my dataset", train=lambda root, cfg: _my_reader(root, "train"),
                            test=_my_test, directions=("i2v", "v2i"))
    assert registry.register_dataset(mine) is mine
    assert registry.dataset_names()[-1] == "mine" and "mine" not in registry.dataset_names(checkable=True)
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  dataset: mine\n  root: {my_root}\neval:\n  direction: v2t\n")
    cfg = load_config(config)

    records = train_records(cfg)
    assert len(records) == 8 and {r.pid for r in records} == {1, 2}
    assert eval_direction(cfg) == "v2i"  # RegDB's spelling mapped onto the dataset's

    def extract(batch):  # a perfect model: one-hot person id
        return np.eye(8, dtype=np.float32)[[r.pid for r in batch]]

    assert can_score(cfg)
    (result,) = run_protocol(cfg, extract)
    assert (result.setting, result.num_query, result.num_gallery) == ("visible→infrared", 6, 6)
    assert result.mean["rank1"] == result.mean["mAP"] == 1.0
    both = run_protocol(apply_overrides(cfg, ["eval.direction=both"]), extract)
    assert [r.setting for r in both] == ["infrared→visible", "visible→infrared"]


def test_a_taken_name_is_refused_in_one_sentence_unless_replaced(registry):
    mine = registry.Dataset("mine", "my dataset", train=lambda root, cfg: [])
    registry.register_dataset(mine)
    for name, title in (("mine", "my dataset"), ("sysu", "SYSU-MM01")):
        with pytest.raises(DatasetError) as err:
            registry.register_dataset(registry.Dataset(name, "another", train=lambda root, cfg: []))
        assert str(err.value) == (f"dataset {name!r} is already registered ({title}): "
                                  "pass replace=True to replace it.")
    other = registry.Dataset("mine", "my other dataset", train=lambda root, cfg: [])
    registry.register_dataset(other, replace=True)
    assert registry.get_dataset("mine") is other and registry.dataset_names().count("mine") == 1
    with pytest.raises(DatasetError, match="direction"):
        registry.register_dataset(registry.Dataset("x", "x", train=lambda root, cfg: [], directions=("up",)))
    with pytest.raises(DatasetError, match="per_trial"):
        registry.register_dataset(registry.Dataset("x", "x", train=lambda root, cfg: [], per_trial=True))
    with pytest.raises(TypeError):
        registry.register_dataset("mine")


def test_unknown_names_still_list_the_registered_ones(registry):
    registry.register_dataset(registry.Dataset("mine", "my dataset", train=lambda root, cfg: []))
    with pytest.raises(ConfigError, match="'data.dataset' must be one of synthetic, sysu, regdb, llcm, folder, mine, "
                                          "got 'market'"):
        load_config(None, ["data.dataset=market"])
    with pytest.raises(DatasetError, match="unknown dataset 'market': expected one of .*folder, mine."):
        registry.get_dataset("market")


@pytest.mark.e2e
def test_bmil_eval_scores_a_registered_dataset(my_root, registry, tmp_path, capsys):
    """A user's script registers its dataset, then runs ``bmil eval`` through ``bmil.cli.main``."""
    import json

    from helpers import run_cli, save_model_checkpoint

    registry.register_dataset(registry.Dataset("mine", "my dataset", train=lambda root, cfg: _my_reader(root, "train"),
                                               test=_my_test, directions=("i2v", "v2i")))
    tiny = ["data.height=32", "data.width=16", "data.workers=0", "model.depth=18", "model.non_local=false",
            "model.pretrained=none", "train.extract_batch=8"]
    cfg = load_config(None, ["data.dataset=mine", f"data.root={my_root}", *tiny])
    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none").eval()
    checkpoint = save_model_checkpoint(cfg, model, tmp_path / "model.pt")
    out = tmp_path / "out"
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  dataset: mine\n  root: {my_root}\noutput: {out}\n")
    code, printed, err = run_cli(capsys, "eval", "--config", str(config), "--checkpoint", str(checkpoint), *tiny)
    assert code == 0, err
    saved = json.loads((out / "eval_mine_model.json").read_text())["results"]
    assert [(r["setting"], r["num_query"], r["num_gallery"]) for r in saved] == [
        ("infrared→visible", 6, 6), ("visible→infrared", 6, 6)]
