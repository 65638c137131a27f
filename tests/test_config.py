"""Configuration: presets, overrides and their validation sentences; each preset against its
row of docs/recipes.md (batch, lr, BatchNorm batch)."""

from __future__ import annotations

import re

import pytest

from bmil.commands import preset_path
from bmil.config import Config, choices, config_from_dict, config_to_dict, load_config, parse_override
from bmil.errors import ConfigError
from helpers import REPO

PRESETS = ["sysu", "regdb", "llcm", "folder", "demo"] + [f"ablation/m{i}" for i in range(1, 7)]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name):
    cfg = load_config(preset_path(name))
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_paper_hyperparameters_in_sysu_and_regdb_presets():
    sysu = load_config(preset_path("sysu"))
    assert (sysu.cluster.k1, sysu.cluster.k2, sysu.cluster.eps, sysu.cluster.min_samples) == (30, 6, 0.6, 4)
    assert (sysu.train.num_ids, sysu.train.num_instances, sysu.train.iterations) == (8, 16, 200)
    assert sysu.train.lr == pytest.approx(3.5e-4) and sysu.train.weight_decay == pytest.approx(5e-4)
    assert sysu.loss.temperature == pytest.approx(0.05) and sysu.loss.momentum == pytest.approx(0.1)
    assert (sysu.data.height, sysu.data.width) == (288, 144)
    regdb = load_config(preset_path("regdb"))
    assert regdb.cluster.eps == pytest.approx(0.3) and regdb.data.dataset == "regdb"


def test_regdb_preset_is_the_release_s_regdb_recipe():
    """run_train_regdb.sh / train_regdb.py: no visible subset split (every image in intra and
    global clustering), eps 0.3 in every DBSCAN, visible batches of batch_size // 2 = 4 × 16
    against infrared 8 × 16, --iters 100, the infrared view without colour jitter in both
    stages; everything else as SYSU-MM01's recipe."""
    regdb, sysu = load_config(preset_path("regdb")), load_config(preset_path("sysu"))
    assert regdb.cluster.subset_ratio == 1.0 and regdb.cluster.eps == pytest.approx(0.3)
    assert (regdb.train.num_ids, regdb.train.visible_num_ids, regdb.train.num_instances) == (8, 4, 16)
    assert regdb.train.iterations == 100 and not regdb.data.infrared_jitter
    assert (sysu.cluster.subset_ratio, sysu.train.visible_num_ids, sysu.train.iterations) == (0.5, None, 200)
    assert sysu.data.infrared_jitter
    same = ("stage1_epochs", "stage2_epochs", "lr", "weight_decay", "lr_step", "lr_gamma", "eval_every", "select_by")
    assert all(getattr(regdb.train, k) == getattr(sysu.train, k) for k in same)
    assert (regdb.cluster.k1, regdb.cluster.k2, regdb.cluster.min_samples) == (30, 6, 4)
    assert regdb.eval.direction == "both" and regdb.eval.trials == 1  # v2t first: the release selects on it


def test_visible_num_ids_is_validated():
    with pytest.raises(ConfigError, match="'train.visible_num_ids' must be >= 1"):
        load_config(None, ["train.visible_num_ids=0"])
    with pytest.raises(ConfigError, match="train.visible_num_ids × train.num_instances"):
        load_config(None, ["train.visible_num_ids=1", "train.num_instances=3", "train.num_ids=2", "train.bn_split=2"])
    assert load_config(None, ["train.visible_num_ids=4"]).train.visible_num_ids == 4


def test_ablation_rows_are_switch_presets():
    rows = {i: load_config(preset_path(f"ablation/m{i}")) for i in range(1, 7)}
    assert not rows[1].train.global_association
    assert all(rows[i].train.global_association for i in range(2, 7))
    assert [rows[i].cluster.modality_aware for i in range(2, 7)] == [False, True, True, False, True]
    assert [rows[i].cluster.subset_ratio for i in range(1, 7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert [rows[i].loss.split_prototypes for i in range(2, 7)] == [False, False, False, True, True]


def test_paper_presets_train_what_the_release_trains():
    """docs/method.md: flip-averaged clustering features, the left-out visible
    half in global clustering, fp32, selection by test-set Rank-1 every 2 epochs (trial 0 in stage 1)."""
    for name in ["sysu", "regdb", "llcm"] + [f"ablation/m{i}" for i in range(1, 7)]:
        cfg = load_config(preset_path(name))
        assert cfg.cluster.flip and cfg.cluster.global_visible == "left_out", name
        assert not cfg.train.amp and cfg.train.bn_split == 1, name
        assert (cfg.train.eval_every, cfg.train.select_by, cfg.train.stage1_eval_trials) == (2, "rank1", 1), name
        assert cfg.model.non_local_width == "release" and not cfg.model.gem_learnable, name
    assert load_config(preset_path("demo")).cluster.flip


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-3", "model.depth=18", "cluster.modality_aware=false", "loss.temperature=1"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.depth == 18 and cfg.cluster.modality_aware is False
    assert cfg.loss.temperature == 1.0 and isinstance(cfg.loss.temperature, float)
    assert parse_override("data.root=/x=y") == ("data.root", "/x=y")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown configuration key 'train.lrr'"),
        ("trian.lr=1", "unknown configuration key 'trian'"),
        ("train.lr=fast", "'train.lr' expects a number"),
        ("model.depth=yes", "'model.depth' expects an integer"),
        ("model.depth=101", "'model.depth' must be 18, 34 or 50"),
        ("cluster.lqe=both", "'cluster.lqe' must be one of release, paper"),
        ("cluster.eps=1.5", "'cluster.eps' must be in (0, 1)"),
        ("cluster.eps=1", "'cluster.eps' must be in (0, 1)"),  # the bound itself: every pair would join
        ("cluster.eps=0", "'cluster.eps' must be in (0, 1)"),
        ("train", "must look like section.key=value"),
        ("train=3", "'train' expects a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_base_and_bad_files(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {lr: 0.01, iterations: 7}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain: {iterations: 3}\n")
    cfg = load_config(child)
    assert cfg.train.lr == pytest.approx(0.01) and cfg.train.iterations == 3
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset"):
        preset_path("nosuchpreset")


def _recipe_rows() -> dict[str, tuple[int, int, int | None, float, int]]:
    """{preset: (ids, instances, visible ids or None, lr, bn batch)} from the table of docs/recipes.md."""
    rows = {}
    pattern = re.compile(r"^\| `([^`]+)`(?: … `[^`]+`)? \| (\d+) × (\d+)(?: \(visible (\d+) × \d+\))? \| "
                         r"([0-9.e-]+) \| (\d+) \|")
    for line in (REPO / "docs" / "recipes.md").read_text().splitlines():
        match = pattern.match(line)
        if match:
            name, ids, instances, visible, lr, bn = match.groups()
            rows[name] = (int(ids), int(instances), None if visible is None else int(visible), float(lr), int(bn))
    return rows


def test_recipes_give_each_preset_its_batch_lr_and_bn_batch():
    rows = _recipe_rows()
    presets = sorted(p.stem for p in (REPO / "src" / "bmil" / "configs").glob("*.yaml"))
    assert set(presets) <= set(rows), f"presets without a recipe: {set(presets) - set(rows)}"
    for name, (ids, instances, visible, lr, bn) in rows.items():
        cfg = load_config(preset_path(name))
        t = cfg.train
        assert (t.num_ids, t.num_instances, t.visible_num_ids, t.lr) == (ids, instances, visible, lr), name
        views = 2 if cfg.data.channel_aug else 1
        assert bn == views * (visible or ids) * instances + ids * instances, name


# ---------------------------------------------------------------- choices: one list, in the field's annotation


def literal_keys(node=None, prefix=""):
    """Every dotted key of a Config field annotated Literal[...], found by walking the fields."""
    import dataclasses
    import typing

    node = Config() if node is None else node
    keys = []
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += literal_keys(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            keys.append(prefix + f.name)
    return keys


def test_config_py_keeps_no_second_list_of_choices():
    source = (REPO / "src" / "bmil" / "config.py").read_text()
    assert "_CHOICES" not in source
    assert len(literal_keys()) == 13
    assert choices("cluster.lqe") == ("release", "paper")
    assert choices("train.lr") is None and choices("data.synthetic.seed") is None and choices("nope.key") is None


@pytest.mark.parametrize("key", literal_keys())
def test_every_choice_is_accepted_and_anything_else_refused_in_one_sentence(key):
    allowed = choices(key)
    for value in allowed:
        overrides = [f"{key}={value}"] + (["data.dataset=regdb"] if key == "eval.direction" else [])
        section, name = key.split(".")
        assert getattr(getattr(load_config(None, overrides), section), name) == value
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=nonsense"])
    assert str(info.value) == f"configuration key '{key}' must be one of {', '.join(allowed)}, got 'nonsense'"
    with pytest.raises(ConfigError, match=f"'{key}' expects a string"):
        load_config(None, [f"{key}=true"])


def test_the_owning_modules_lists_equal_the_configs_choices():
    from bmil.cluster.jaccard import LQE_MODES
    from bmil.cluster.knn import _BACKENDS, KNN_CHOICES
    from bmil.data.transforms import AUGMENTATIONS, JITTERS, TEST_RESIZES
    from bmil.datasets import DIRECTIONS
    from bmil.evaluation.protocols import SCORE_KEYS, SYSU_SETTINGS
    from bmil.model.non_local import NON_LOCAL_WIDTHS

    same_order = {
        "cluster.lqe": LQE_MODES, "cluster.knn": KNN_CHOICES, "cluster.backend": _BACKENDS,
        "model.non_local_width": NON_LOCAL_WIDTHS, "data.augmentation": AUGMENTATIONS, "data.jitter": JITTERS,
        "eval.direction": DIRECTIONS,
    }
    for key, owned in same_order.items():
        assert tuple(owned) == choices(key), key
    assert set(choices("eval.resize")) == set(TEST_RESIZES)  # resize name -> interpolation
    assert set(choices("eval.mode")) == set(SYSU_SETTINGS)  # mode -> setting name
    assert set(choices("train.select_by")) <= set(SCORE_KEYS)  # a score every result has


def test_loading_and_validating_a_config_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from bmil.config import load_config; "
            "load_config(None, ['data.dataset=regdb', 'eval.direction=v2i']); "
            "import bmil.datasets, bmil.records; "
            "assert not {'torch', 'torchvision'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(REPO / "src")})
