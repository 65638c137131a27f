"""Typed run configuration: dataclasses, YAML presets and dotted command-line overrides.

A configuration is a tree of dataclasses. YAML files and ``key.sub=value`` overrides are
merged into it with validation: an unknown key or a value of the wrong type raises
:class:`~bmil.errors.ConfigError` with one sentence naming the key and what was expected.

The paper's ablation rows M1–M6 are presets of the switches below (``configs/ablation``):

| row | train.global_association | cluster.modality_aware | cluster.subset_ratio | loss.split_prototypes |
|-----|-----|-----|-----|-----|
| M1  | false | –     | 1.0 | – |
| M2  | true  | false | 1.0 | false |
| M3  | true  | true  | 1.0 | false |
| M4  | true  | true  | 0.5 | false |
| M5  | true  | false | 0.5 | true |
| M6  | true  | true  | 0.5 | true |
"""

from __future__ import annotations

import copy
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from bmil.errors import ConfigError


@dataclass
class SyntheticConfig:
    """Size of the embedded synthetic dataset (``data.dataset=synthetic``).

    ``num_ids``: the population, every person the generator draws (``num_train_ids`` of them
    train, the rest are the test set); not ``train.num_ids``, the identities per batch.
    """

    num_ids: int = 120
    num_train_ids: int = 80
    images_per_camera: int = 4
    height: int = 128
    width: int = 64
    seed: int = 0


def default_workers(cuda: bool, loaders: int = 1) -> int:
    """DataLoader workers per loader when ``data.workers`` is not set: 0 without CUDA
    (decoding in the training process leaves the few cores to the model), else
    min(8, CPU cores / (GPU processes on this node × ``loaders`` alive at once)), at least 1,
    so decoding keeps up with the GPU without oversubscribing the node. ``cuda``: the run's
    device is a GPU (the engine knows; this module does not import torch)."""
    if not cuda:
        return 0
    return max(1, min(8, cores_per_process() // max(1, loaders)))


def cores_per_process() -> int:
    """CPU cores of this node divided by the training processes on it (``LOCAL_WORLD_SIZE``,
    set by torchrun; 1 without it), at least 1."""
    import os

    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // local_processes)


@dataclass
class DataConfig:
    """Which images to read and how to feed them.

    ``root``: dataset folder (for ``synthetic`` it is generated there when absent).
    ``trial``: RegDB split 1..10 the model is trained on.
    ``height``/``width``: network input in pixels.
    ``pad``: zero padding in pixels before the random crop (10 at 288×144).
    ``workers``: DataLoader worker processes per loader; unset (null) means
    :func:`default_workers` of the run's device (0 on a CPU, else up to 8). When several
    loaders are alive at once (2 in stage 1, 4 in stage 2) each gets at most
    cores per process / loaders (at least 1), and fewer when /dev/shm cannot hold their
    prefetched batches; the training log says how many.
    ``ids_from_folders``: for ``folder``, read person ids from the layout
    ROOT/{visible,infrared}/<camera>/<person id>/ (scored by ``bmil eval``, never trained on).
    ``cache_images``: keep the decoded training images in memory and, with ``workers`` 0,
    the resized test-time tensors that training's feature extraction reads every epoch
    (about 4·3·H·W bytes an image; for small data sets such as the demo).
    ``augmentation``: ``release`` (the release's views: the visible second view replicates
    one of R, G, B after normalisation and erasing; infrared 3/4 one channel, 1/8 grayscale,
    1/8 unchanged, colour jitter in stage 1 only) or ``legacy`` (bmil's earlier views);
    see :mod:`bmil.data.transforms`.
    ``infrared_jitter``: colour jitter on the stage-1 infrared view (the release's SYSU-MM01
    recipe); false gives stage 1 the stage-2 infrared view (its RegDB recipe has no jitter in
    either stage).
    ``jitter``: how the release views' colour jitter runs: ``pil`` (torchvision's on PIL
    images) or ``tensor`` (the same random draws applied to float tensors, several times
    cheaper; outputs differ from ``pil`` only by PIL's 8-bit rounding, see
    :mod:`bmil.data.jitter`).
    ``resized_cache_gib``: keep the training images resized to height × width (uint8,
    3·H·W bytes an image, 3.96 GiB for SYSU-MM01 at 288×144) in shared memory, read by every
    loader worker in every epoch, when they take at most this many GiB; 0 (default) turns it
    off. The same tensors as without it; a warning says when it does not fit.
    """

    dataset: str = "synthetic"
    root: str = "data/synthetic"
    trial: int = 1
    height: int = 288
    width: int = 144
    channel_aug: bool = True
    augmentation: Literal["release", "legacy"] = "release"
    pad: int = 10
    workers: int | None = None
    ids_from_folders: bool = False
    cache_images: bool = False
    infrared_jitter: bool = True
    jitter: Literal["pil", "tensor"] = "pil"
    resized_cache_gib: float = 0.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """Two-stream ResNet (docs/method.md, "The network"). ``pretrained``: imagenet | none | a file path.

    ``non_local_width``: inner width of the non-local blocks, ``release`` (1 channel, the
    release's ``reduc_ratio // reduc_ratio``) or ``half`` (C/2, the non-local paper's).
    ``gem_learnable``: train the GeM exponent (AGW's variant) instead of the release's fixed p = 3.
    ``width``: channels of the stems and layer1, doubling per layer; 64 is torchvision's ResNet
    (the release's; ImageNet weights exist only for it); 32 costs about a quarter of the compute
    (benchmarks/train_throughput.py), but the demo keeps 64, the network the presets train.
    ``last_stride``: stride of layer4, 1 as in AGW and the release, 2 as in plain ResNet (a
    quarter of layer4's cost, a feature map half as tall and wide).
    """

    depth: int = 50
    width: int = 64
    last_stride: int = 1
    non_local: bool = True
    non_local_width: Literal["release", "half"] = "release"
    gem_learnable: bool = False
    pretrained: str = "imagenet"
    sync_bn: bool = False


@dataclass
class ClusterConfig:
    """Jaccard distance + DBSCAN pseudo labels (docs/method.md, stages 1 and 2).

    ``memory_check``: before each clustering, stop with a clear message when the estimated
    kNN + Jaccard memory exceeds the available memory (``bmil.cluster.memory_check``).
    ``flip``: cluster flip-averaged features (the release's extractor always flips).
    ``global_visible``: which visible images stage 2's global clustering sees: ``left_out``
    (the release: the random visible subset intra clustering left out this epoch, plus all
    infrared images) or ``all`` (every visible image).
    ``knn``: neighbours of the Jaccard distance: ``exact``, ``approximate`` (an inverted file
    per modality, ``bmil.cluster.knn``) or ``auto`` (approximate when a clustering has more than
    ``approximate_above`` images).
    ``nprobe``: lists each query of the approximate kNN searches; empty (None): 32
    (``bmil.cluster.knn.IVF_NPROBE``). More finds more of the true neighbours at
    proportional search time.
    """

    k1: int = 30
    k2: int = 6
    eps: float = 0.6
    min_samples: int = 4
    subset_ratio: float = 0.5
    modality_aware: bool = True
    lqe: Literal["release", "paper"] = "release"
    backend: Literal["torch", "faiss"] = "torch"
    block_size: int = 2048
    flip: bool = True
    global_visible: Literal["left_out", "all"] = "left_out"
    memory_check: bool = True
    knn: Literal["exact", "approximate", "auto"] = "exact"
    approximate_above: int = 100_000
    nprobe: int | None = None


@dataclass
class LossConfig:
    """Prototype memories and contrastive losses.

    ``split_prototypes`` is a clustering switch despite its section: it splits every global
    cluster of stage 2 into one sub-cluster per modality (one global-memory prototype each,
    the split-and-contrast of docs/method.md); false keeps one prototype per global cluster.
    ``global_gradient``: which prototypes the stage-2 global loss takes its gradient against:
    ``release`` (the infrared term against the prototypes the visible batch has already moved,
    the order the release's in-place memory update produces) or ``simultaneous`` (both terms
    against the prototypes as they were); see :class:`bmil.engine.objectives.GlobalObjective`.
    """

    temperature: float = 0.05
    momentum: float = 0.1
    hybrid: bool = True
    mean_margin: float = 0.2
    split_prototypes: bool = True
    num_candidates: int = 50
    global_gradient: Literal["release", "simultaneous"] = "release"


@dataclass
class TrainConfig:
    """The epoch loop. Stage 1 runs ``stage1_epochs``, then stage 2 ``stage2_epochs`` from
    the best stage-1 model; ``init_from`` starts from a checkpoint's weights instead.

    ``amp``: bf16 autocast on CUDA (the release trains in fp32, the default).
    ``channels_last``: extract features in channels_last memory format (faster for ResNet-50
    at 288×144 on a CPU, slower for ResNet-18 at 64×32: benchmarks/extract_throughput.py; training on
    CUDA always uses it).
    ``bn_split``: forward each training batch in this many passes, as the release's
    DataParallel over that many GPUs splits it (2 reproduces its per-BatchNorm batch on one
    GPU; docs/recipes.md); one process only.
    ``eval_every``: evaluate on the test set at the first epoch of a stage and every
    ``eval_every`` epochs after it, and at its last epoch (the release: every 2 epochs).
    ``select_by``: the best model of a stage is the one with the highest test-set ``rank1``
    (the release) or ``mAP`` of the first protocol setting — selection on the test set, which
    the results say; the last epoch's model and scores are kept beside it.
    ``select_last``: let a stage's last epoch, evaluated even when off the ``eval_every``
    schedule, be selected too (false: the release, whose last epoch, 49, is never evaluated).
    ``stage1_eval_trials``: gallery trials evaluated during stage 1 (the release: trial 0
    only; 0 = ``eval.trials``); stage 2 evaluates ``eval.trials``.
    ``num_ids``: P, the pseudo identities per training batch, ``num_instances`` (K) images
    each; not ``synthetic.num_ids``, the synthetic population.
    ``visible_num_ids``: P of the visible batches when it differs from the infrared one
    (empty: ``num_ids``); the release's RegDB recipe draws 4 visible identities (two views
    each) against 8 infrared ones.
    ``sampler``: how a batch's images of each pseudo identity are drawn: ``camera`` (the
    release: a random anchor, then images from other cameras than the anchor's; one pass over
    the identities in random order) or ``uniform`` (bmil's earlier draw, cameras ignored);
    see :mod:`bmil.data.sampler`.
    """

    stage1_epochs: int = 50
    stage2_epochs: int = 50
    iterations: int = 200
    num_ids: int = 8
    visible_num_ids: int | None = None
    num_instances: int = 16
    sampler: Literal["camera", "uniform"] = "camera"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    lr_step: int = 20
    lr_gamma: float = 0.1
    global_association: bool = True
    separate_global_step: bool = True
    seed: int = 0
    deterministic: bool = False
    init_from: str = ""
    device: str = "auto"
    amp: bool = False
    channels_last: bool = True
    bn_split: int = 1
    eval_every: int = 2
    select_by: Literal["rank1", "mAP"] = "rank1"
    select_last: bool = False
    stage1_eval_trials: int = 1
    extract_batch: int = 128


@dataclass
class EvalConfig:
    """Test protocol options (docs/method.md, "Test protocols").

    ``resize``: how query and gallery images are resized to the network input when scored:
    ``lanczos`` (the release's ``TestData``, PIL ``ANTIALIAS``) or ``bicubic`` (what the
    release, and bmil, use for the clustering features).
    """

    mode: Literal["all", "indoor"] = "all"
    trials: int = 10
    shots: int = 1
    direction: Literal["both", "v2t", "t2v", "v2i", "i2v"] = "both"
    trial: int = 0
    allow_trial_mismatch: bool = False
    resize: Literal["lanczos", "bicubic"] = "lanczos"


@dataclass
class Config:
    """A whole run. ``output``: the run folder (config, metrics, events, checkpoints)."""

    name: str = "bmil"
    output: str = "runs/bmil"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def choices(key: str) -> tuple | None:
    """The values a ``section.key`` may take when its field is annotated ``Literal[...]``
    (e.g. ``choices("cluster.lqe") == ("release", "paper")``), else None: the one list of
    them, which validation, help texts and the owning modules' tests read."""
    node: Any = Config
    for part in key.split("."):
        if not (isinstance(node, type) and is_dataclass(node)):
            return None
        hint = typing.get_type_hints(node).get(part)
        if hint is None:
            return None
        node = hint
    return typing.get_args(node) if typing.get_origin(node) is Literal else None


def _choice_fields(node: Any, prefix: str = "") -> list[tuple[str, Any, tuple]]:
    """(dotted key, value, allowed values) of every ``Literal`` field below ``node``, in field order."""
    out = []
    hints = typing.get_type_hints(type(node))
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            out.extend(_choice_fields(value, f"{prefix}{f.name}."))
        elif typing.get_origin(hints[f.name]) is Literal:
            out.append((prefix + f.name, value, typing.get_args(hints[f.name])))
    return out


def _article(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats, and
    ``None`` (YAML ``null``) for an optional field (``int | None``: unset). A ``Literal``
    field is checked against the type of its values here and against the values
    themselves in :func:`_validate`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        tp = type(args[0])
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, bool, str) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(
            f"configuration key '{key}' expects {_article(tp)}, got {value!r}"
        )
    return value


def _merge(node: Any, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"configuration section '{prefix[:-1]}' expects a mapping, got {values!r}")
    hints = typing.get_type_hints(type(node))
    known = {f.name for f in fields(node)}
    for key, value in values.items():
        dotted = prefix + str(key)
        if key not in known:
            raise ConfigError(
                f"unknown configuration key '{dotted}' (known: {', '.join(sorted(known))})"
            )
        current = getattr(node, key)
        if is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(node, key, _coerce(dotted, value, hints[key]))


def _validate_dataset(cfg: Config) -> None:
    """``data.dataset``, ``data.trial`` and ``eval.direction`` against the dataset registry
    (imported here: ``bmil.data`` loads torch, which importing this module must not)."""
    from bmil.datasets import dataset_names, eval_direction, get_dataset

    if cfg.data.dataset not in dataset_names():
        raise ConfigError(
            f"configuration key 'data.dataset' must be one of {', '.join(dataset_names())}, got {cfg.data.dataset!r}"
        )
    entry = get_dataset(cfg.data.dataset)
    if entry.per_trial and cfg.data.trial not in entry.trials:
        raise ConfigError(
            f"configuration key 'data.trial' must be {entry.trials.start}..{entry.trials.stop - 1} for "
            f"{entry.title}, got {cfg.data.trial}"
        )
    eval_direction(cfg)


def _validate(cfg: Config) -> None:
    _validate_dataset(cfg)
    for key, value, allowed in _choice_fields(cfg):
        if value not in allowed:
            raise ConfigError(
                f"configuration key '{key}' must be one of {', '.join(allowed)}, got {value!r}"
            )
    if cfg.model.depth not in (18, 34, 50):
        raise ConfigError(f"configuration key 'model.depth' must be 18, 34 or 50, got {cfg.model.depth}")
    if not 0.0 < cfg.cluster.subset_ratio <= 1.0:
        raise ConfigError("configuration key 'cluster.subset_ratio' must be in (0, 1]")
    if not 0.0 < cfg.cluster.eps < 1.0:
        raise ConfigError("configuration key 'cluster.eps' must be in (0, 1)")
    if cfg.train.stage1_epochs < 0 or cfg.train.stage2_epochs < 0:
        raise ConfigError("configuration keys 'train.stage1_epochs'/'train.stage2_epochs' must be >= 0")
    if cfg.cluster.nprobe is not None and cfg.cluster.nprobe < 1:
        raise ConfigError(f"configuration key 'cluster.nprobe' must be >= 1 (or empty), got {cfg.cluster.nprobe}")
    if cfg.data.resized_cache_gib < 0:
        raise ConfigError(f"configuration key 'data.resized_cache_gib' must be >= 0 (0: off), "
                          f"got {cfg.data.resized_cache_gib}")
    if cfg.data.workers is not None and cfg.data.workers < 0:
        raise ConfigError(f"configuration key 'data.workers' must be >= 0, got {cfg.data.workers}")
    for key in ("iterations", "num_ids", "num_instances", "extract_batch", "eval_every", "lr_step", "bn_split"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"configuration key 'train.{key}' must be >= 1")
    if cfg.train.visible_num_ids is not None and cfg.train.visible_num_ids < 1:
        raise ConfigError(f"configuration key 'train.visible_num_ids' must be >= 1 (or empty: train.num_ids), "
                          f"got {cfg.train.visible_num_ids}")
    for key in ("num_ids", "visible_num_ids"):
        ids = getattr(cfg.train, key)
        if ids is not None and (ids * cfg.train.num_instances) % cfg.train.bn_split:
            raise ConfigError(
                f"configuration key 'train.bn_split' ({cfg.train.bn_split}) must divide the batch of "
                f"train.{key} × train.num_instances = {ids * cfg.train.num_instances} images"
            )
    if cfg.train.stage1_eval_trials < 0:
        raise ConfigError("configuration key 'train.stage1_eval_trials' must be >= 0 (0: eval.trials)")


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` → ``("train.lr", 0.001)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)
    return key.strip(), value


def _looks_like_float(raw: str) -> bool:
    # YAML 1.1 reads "1e-3" as a string; users mean a number.
    try:
        float(raw)
    except ValueError:
        return False
    return True


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err.__class__.__name__})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file (its ``base:`` key names a file it extends) ← dotted overrides."""
    cfg = Config()
    for layer in _yaml_layers(path) if path else []:
        _merge(cfg, layer, "")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, items: list[str] | tuple[str, ...]) -> Config:
    """A validated copy of ``cfg`` with the ``section.key=value`` ``items`` applied (e.g. a
    checkpoint's saved configuration with ``data.root=/data``); ``cfg`` is left as it is."""
    out = copy.deepcopy(cfg)
    for text in items:
        key, value = parse_override(text)
        _merge(out, _nest(key, value), "")
    _validate(out)
    return out


def _yaml_layers(path: str | Path, depth: int = 0) -> list[dict]:
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [data]
    if depth > 8:
        raise ConfigError(f"config file {path} has too deeply nested 'base:' references")
    base_path = Path(path).parent / base
    return [*_yaml_layers(base_path, depth + 1), data]


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML/JSON serialisable)."""
    return asdict(cfg)


def config_from_dict(values: dict) -> Config:
    """Rebuild a validated :class:`Config` from :func:`config_to_dict` output."""
    cfg = Config()
    _merge(cfg, values, "")
    _validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ClusterConfig",
    "LossConfig",
    "TrainConfig",
    "EvalConfig",
    "SyntheticConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "parse_override",
    "choices",
]
