"""A labelled user folder (ROOT/{visible,infrared}/<camera>/<person id>/): the reader, the
split files, check-data, the two-direction protocol scored against a slow re-computation
from features made by hand, bmil eval / train on it, and the one-sentence bad inputs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmil.config import config_to_dict, load_config
from bmil.data import INFRARED, VISIBLE, folder_test, folder_train
from bmil.data.transforms import test_transform
from bmil.datasets import check_report
from bmil.engine.checkpoint import save_checkpoint
from bmil.errors import DatasetError
from bmil.evaluation import evaluate_folder
from bmil.model import build_model
from helpers import flip_averaged_features, run_cli, save_model_checkpoint

# (modality, camera, person id) -> image names; odd sizes, PNG and JPEG (any case), one
# infrared camera and two visible ones, string ids; "zed" has visible images only.
LAYOUT = {
    ("visible", "cam_a", "alice"): ["1.png", "2.JPG"],
    ("visible", "cam_b", "alice"): ["3.jpeg"],
    ("visible", "cam_a", "bob"): ["1.jpg"],
    ("visible", "cam_b", "bob"): ["x.png", "y.png"],
    ("visible", "cam_a", "c-3"): ["only.png"],
    ("visible", "cam_b", "zed"): ["z.png"],
    ("infrared", "ir", "alice"): ["1.png", "2.png"],
    ("infrared", "ir", "bob"): ["1.JPEG"],
    ("infrared", "ir", "c-3"): ["a.jpg", "b.png"],
}
SIZES = [(37, 61), (50, 23), (64, 32), (19, 77)]


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = SIZES[seed % len(SIZES)]
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt)


def write_folder(root: Path, layout=LAYOUT) -> Path:
    seed = 0
    for (modality, camera, pid), names in layout.items():
        for name in names:
            write_image(root / modality / camera / pid / name, seed)
            seed += 1
    return root


def paths_of(root: Path, modality: str) -> list[str]:
    return sorted(str(root / m / c / p / n) for (m, c, p), names in LAYOUT.items() if m == modality for n in names)


@pytest.fixture()
def labelled(tmp_path) -> Path:
    return write_folder(tmp_path / "labelled")


# ---------------------------------------------------------------- the reader


def test_reader_ids_cameras_and_modalities(labelled):
    records = folder_train(labelled, ids_from_folders=True)
    names = ["alice", "bob", "c-3", "zed"]  # sorted id names: pid = index
    cameras = ["cam_a", "cam_b", "ir"]  # sorted camera names of both modalities
    expected = sorted(
        (str(labelled / m / c / p / n), names.index(p), cameras.index(c), VISIBLE if m == "visible" else INFRARED)
        for (m, c, p), files in LAYOUT.items() for n in files
    )
    assert sorted((r.path, r.pid, r.camid, r.modality) for r in records) == expected
    assert [r.modality for r in records] == sorted(r.modality for r in records)  # visible first
    unlabelled = folder_train(labelled)  # the same folder without the switch: no ids
    assert sorted(r.path for r in unlabelled) == sorted(e[0] for e in expected)
    assert {r.pid for r in unlabelled} == {-1}


def test_split_files_keep_test_people_out_of_training(labelled, caplog):
    (labelled / "test.txt").write_text("bob\n\n c-3 \n")
    train = folder_train(labelled, ids_from_folders=True)
    test = folder_test(labelled)
    names = ["alice", "bob", "c-3", "zed"]
    assert {names[r.pid] for r in train} == {"alice", "zed"}
    assert {names[r.pid] for r in test} == {"bob", "c-3"}
    assert len(test) == 1 + 2 + 1 + 1 + 2  # bob: 3 visible + 1 infrared; c-3: 1 + 2
    (labelled / "train.txt").write_text("alice\nbob\nghost\n")
    with caplog.at_level(logging.WARNING, logger="bmil"):
        train = folder_train(labelled, ids_from_folders=True)
    assert {names[r.pid] for r in train} == {"alice", "bob"}
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "train.txt have no images: ghost" in text
    assert "in both the training and the test split: bob" in text


def test_without_split_files_the_log_says_train_and_test_overlap(labelled, caplog):
    with caplog.at_level(logging.WARNING, logger="bmil"):
        folder_test(labelled)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "no train.txt / test.txt: training and test images overlap" in text
    assert "have visible images only, so their queries have no match: zed" in text


def test_bad_layouts_are_one_sentence_naming_the_path(tmp_path, caplog):
    root = write_folder(tmp_path / "flat", {("visible", "cam_a", "alice"): ["1.png"],
                                             ("infrared", "ir", "alice"): ["1.png"]})
    write_image(root / "visible" / "0007" / "a.png", 1)  # a person folder directly under visible/
    with pytest.raises(DatasetError) as err:
        folder_train(root, ids_from_folders=True)
    assert str(err.value).startswith(f"{root}/visible/0007 holds images directly")
    assert "is 0007 a person folder without a camera folder above it?" in str(err.value)
    assert f"{root}/visible/<camera>/<person id>/" in str(err.value)
    (root / "visible" / "0007" / "a.png").unlink()
    (root / "visible" / "0007").rmdir()

    (root / "visible" / "cam_a" / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="bmil"):
        records = folder_train(root, ids_from_folders=True)
    assert len(records) == 2
    assert f"empty id folder {root}/visible/cam_a/empty" in " ".join(r.getMessage() for r in caplog.records)

    only_visible = write_folder(tmp_path / "vis_only", {("visible", "cam_a", "alice"): ["1.png"]})
    (only_visible / "infrared" / "ir").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images found under .*/infrared/<camera>/<person id>/"):
        folder_train(only_visible, ids_from_folders=True)


# ---------------------------------------------------------------- check-data


@pytest.mark.e2e
def test_check_data_reports_ids_cameras_and_one_modality_ids(labelled, capsys):
    report = check_report("folder", labelled)
    assert report.counts == {
        "visible images": 8, "infrared images": 5, "visible ids": 4, "infrared ids": 3,
        "ids in both modalities": 3, "fewest images per id": 1, "most images per id": 5,
        "visible cameras": 2, "infrared cameras": 1,
    }
    assert report.problems == []
    assert report.warnings == [
        "1 id(s) have visible images only and can never be matched across modalities: zed"
    ]
    code, out, err = run_cli(capsys, "check-data", "--dataset", "folder", str(labelled))
    assert code == 0 and err == ""
    assert "visible ids: 4" in out and "infrared ids: 3" in out and "visible cameras: 2" in out
    assert "warning: 1 id(s) have visible images only" in out
    assert "published" not in out
    assert "no train.txt / test.txt" in out


@pytest.mark.e2e
def test_check_data_lists_every_bad_input(labelled, capsys):
    write_image(labelled / "visible" / "0009" / "a.png", 3)  # no camera level
    (labelled / "infrared" / "ir" / "nobody").mkdir()  # empty id folder
    victim = labelled / "infrared" / "ir" / "bob" / "1.JPEG"
    victim.write_bytes(b"not an image")
    code, out, err = run_cli(capsys, "check-data", "--dataset", "folder", "--ids-from-folders", str(labelled))
    assert code == 1 and "Traceback" not in out + err
    lines = out.splitlines()
    assert any(line.startswith(f"{labelled}/visible/0009 holds images directly") for line in lines)
    assert f"empty id folder {labelled}/infrared/ir/nobody" in lines
    assert f"unreadable image {victim}: not a recognised image format" in lines
    assert lines[-1] == f"3 problem(s) in {labelled}"
    assert "published" not in out


# ---------------------------------------------------------------- the protocol


def slow_scores(q_feats, q_pids, g_feats, g_pids) -> dict:
    """Plain CMC / AP / INP by a loop over queries (docs/method.md metrics, nothing removed)."""
    ranks1, aps, inps = [], [], []
    for f, pid in zip(q_feats, q_pids, strict=True):
        dist = [1.0 - float(np.dot(f, g)) for g in g_feats]
        order = sorted(range(len(dist)), key=lambda j: (dist[j], j))
        matches = [g_pids[j] == pid for j in order]
        if not any(matches):
            continue
        hits = [i for i, m in enumerate(matches) if m]
        ranks1.append(1.0 if matches[0] else 0.0)
        aps.append(np.mean([(k + 1) / (pos + 1) for k, pos in enumerate(hits)]))
        inps.append(len(hits) / (hits[-1] + 1))
    return {"rank1": np.mean(ranks1), "mAP": np.mean(aps), "mINP": np.mean(inps), "valid": len(aps)}


def test_evaluate_folder_both_directions_match_a_slow_recomputation(labelled):
    rng = np.random.default_rng(0)
    table = {}

    def extract(records):
        out = []
        for r in records:
            table.setdefault(r.path, rng.normal(size=8).astype(np.float32))
            out.append(table[r.path])
        return np.stack(out)

    records = folder_test(labelled)
    results = evaluate_folder(extract, records)
    assert [r.setting for r in results] == ["infrared→visible", "visible→infrared"]
    unit = {p: v / np.linalg.norm(v) for p, v in table.items()}
    for result, (q_mod, g_mod) in zip(results, [(INFRARED, VISIBLE), (VISIBLE, INFRARED)], strict=True):
        queries = [r for r in records if r.modality == q_mod]
        gallery = [r for r in records if r.modality == g_mod]
        expected = slow_scores([unit[r.path] for r in queries], [r.pid for r in queries],
                               [unit[r.path] for r in gallery], [r.pid for r in gallery])
        assert result.protocol == "regdb" and result.num_trials == 1
        assert (result.num_query, result.num_gallery) == (len(queries), len(gallery))
        for key in ("rank1", "mAP", "mINP"):
            assert result.mean[key] == pytest.approx(expected[key], abs=1e-6), key
        assert result.per_trial[0]["num_valid_queries"] == expected["valid"]
    assert results[1].per_trial[0]["num_valid_queries"] == 7  # zed's visible query has no match
    one = evaluate_folder(extract, records, direction="v2i")
    assert [r.setting for r in one] == ["visible→infrared"] and one[0].mean == results[1].mean
    with pytest.raises(ValueError, match="folder direction must be one of"):
        evaluate_folder(extract, records, direction="v2t")


# ---------------------------------------------------------------- bmil eval / bmil train

TINY = ["data.height=64", "data.width=32", "data.workers=0", "model.depth=18", "model.non_local=false",
        "model.pretrained=none", "train.extract_batch=8"]


def by_hand(model, paths, modality) -> np.ndarray:
    transform = test_transform(64, 32, "lanczos")  # bmil eval scores Lanczos-resized images (eval.resize)
    return flip_averaged_features(model, paths, modality, transform)


@pytest.mark.e2e
def test_bmil_eval_scores_both_directions_from_flip_averaged_features(labelled, tmp_path, capsys):
    cfg = load_config(None, ["data.dataset=folder", f"data.root={labelled}", *TINY])
    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none").eval()
    checkpoint = save_model_checkpoint(cfg, model, tmp_path / "model.pt")
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "eval", "--config", "folder", "--checkpoint", str(checkpoint),
                                 f"data.root={labelled}", "data.ids_from_folders=true", f"output={out}", *TINY)
    assert code == 0, err
    assert "folder infrared→visible: protocol `regdb`" in printed
    assert "5 queries, 8 gallery images" in printed and "8 queries, 5 gallery images" in printed
    saved = json.loads((out / "eval_folder_model.json").read_text())["results"]
    names = ["alice", "bob", "c-3", "zed"]
    feats = {m: by_hand(model, paths_of(labelled, m), VISIBLE if m == "visible" else INFRARED)
             for m in ("visible", "infrared")}
    pids = {m: [names.index(Path(p).parent.name) for p in paths_of(labelled, m)] for m in ("visible", "infrared")}
    for result, (q, g) in zip(saved, [("infrared", "visible"), ("visible", "infrared")], strict=True):
        expected = slow_scores(feats[q], pids[q], feats[g], pids[g])
        assert (result["num_query"], result["num_gallery"]) == (len(pids[q]), len(pids[g]))
        assert result["mean"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-5)
        assert result["mean"]["rank1"] == pytest.approx(expected["rank1"], abs=1e-9)


@pytest.mark.e2e
def test_bmil_eval_takes_the_network_and_input_size_from_the_checkpoint(labelled, tmp_path, capsys, caplog):
    """A depth-18, 64×32 checkpoint scored with the folder preset as it is (depth 50, 288×144):
    the same scores as with a configuration that matches it, and a log line saying so."""
    import logging

    cfg = load_config(None, ["data.dataset=folder", f"data.root={labelled}", *TINY])
    torch.manual_seed(0)
    model = build_model(depth=18, non_local=False, pretrained="none").eval()
    checkpoint = save_model_checkpoint(cfg, model, tmp_path / "best_stage2.pt")
    out = tmp_path / "out"
    from bmil import cli

    with caplog.at_level(logging.INFO, logger="bmil"):  # without -q: the INFO line is the point
        code = cli.main(["eval", "--config", "folder", "--checkpoint", str(checkpoint), f"data.root={labelled}",
                         "data.ids_from_folders=true", f"output={out}"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert any("model read from the checkpoint: depth=18" in r.getMessage() and "input 64×32" in r.getMessage()
               for r in caplog.records)
    saved = json.loads((out / "eval_folder_best_stage2.json").read_text())["results"]
    names = ["alice", "bob", "c-3", "zed"]
    feats = {m: by_hand(model, paths_of(labelled, m), VISIBLE if m == "visible" else INFRARED)
             for m in ("visible", "infrared")}
    pids = {m: [names.index(Path(p).parent.name) for p in paths_of(labelled, m)] for m in ("visible", "infrared")}
    expected = slow_scores(feats["infrared"], pids["infrared"], feats["visible"], pids["visible"])
    assert saved[0]["mean"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-5)
    assert str(out / "eval_folder_best_stage2.json") in printed


@pytest.mark.e2e
def test_train_on_a_labelled_folder_evaluates_and_keeps_the_best_model(tmp_path):
    from bmil.commands import preset_path
    from bmil.engine.trainer import Trainer

    layout = {(m, cam, f"p{i}"): [f"{k}.png" for k in range(3)]
              for m, cam in (("visible", "v1"), ("infrared", "i1")) for i in range(6)}
    root = write_folder(tmp_path / "people", layout)
    (root / "test.txt").write_text("p4\np5\n")
    out = tmp_path / "run"
    cfg = load_config(preset_path("folder"), [
        f"data.root={root}", "data.ids_from_folders=true", f"output={out}", *TINY, "data.cache_images=true",
        "cluster.k1=4", "cluster.k2=2", "cluster.min_samples=2", "train.stage1_epochs=2", "train.stage2_epochs=0",
        "train.iterations=1", "train.num_ids=2", "train.num_instances=2", "train.eval_every=1",
        "train.extract_batch=64",
    ])
    trainer = Trainer(cfg, progress=False)
    assert len(trainer.run.records) == 2 * 4 * 3  # p0…p3 only
    trainer.fit()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/infrared→visible/mAP" in r and "eval/visible→infrared/mAP" in r for r in lines)
    assert all("ari/visible" in r for r in lines)  # pseudo-label quality against the folder ids
    assert (out / "checkpoints" / "best_stage1.pt").is_file()
    best = torch.load(out / "checkpoints" / "best_stage1.pt", weights_only=False)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert "optimizer" not in best and "scheduler" not in best and "model" in best and "config" in best
    assert {"optimizer", "scheduler", "rng"} <= last.keys()  # what --resume reads


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_user_errors_exit_nonzero_without_traceback(tmp_path, capsys, command):
    root = tmp_path / "bad"
    write_image(root / "visible" / "0001" / "a.png", 0)  # no camera level
    write_image(root / "infrared" / "ir" / "0001" / "a.png", 1)
    argv = [command, "--config", "folder", f"data.root={root}", "data.ids_from_folders=true",
            f"output={tmp_path / 'out'}", *TINY]
    if command == "eval":
        argv += ["--checkpoint", str(tmp_path / "none.pt")]
        cfg = load_config(None, ["data.dataset=folder", *TINY])
        model = build_model(depth=18, non_local=False, pretrained="none")
        save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict()}, tmp_path / "none.pt")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" not in out + err
    assert err.startswith(f"error: {root}/visible/0001 holds images directly") and err.count("\n") == 1


def test_folder_layout_without_the_switch_is_unlabelled(labelled):
    assert os.path.isdir(labelled / "visible" / "cam_a" / "alice")
    cfg = load_config(None, ["data.dataset=folder", f"data.root={labelled}"])
    from bmil.engine.data_setup import can_score, run_protocol

    assert not can_score(cfg) and run_protocol(cfg, lambda records: None) == []


def test_one_cluster_hint_is_said_once_per_run(tmp_path, caplog):
    from bmil.engine.data_setup import one_cluster_hint

    cfg = load_config(None, ["data.dataset=folder", f"output={tmp_path / 'a'}"])
    with caplog.at_level(logging.WARNING, logger="bmil"):
        for _ in range(3):  # three epochs with one cluster
            one_cluster_hint(cfg, 100)
        one_cluster_hint(load_config(None, ["data.dataset=folder", f"output={tmp_path / 'b'}"]), 100)
    hints = [r.getMessage() for r in caplog.records]
    assert len(hints) == 2  # once per run folder
    assert "lower cluster.k1" in hints[0] and "bmil cluster-scan" in hints[0] and "cluster.k1=30" in hints[0]


def test_one_cluster_advice_follows_from_the_numbers():
    """k1 = 30 on 300 images with 8 ids a batch: 300 / 16 = 18 → lower k1; k1 = 6 is already
    below that, so the advice is eps (never "k1 about 5-15" to a run at k1 = 6)."""
    from bmil.engine.data_setup import one_cluster_advice

    default = load_config(None, ["data.dataset=folder"])
    assert one_cluster_advice(default, 300).startswith("lower cluster.k1 from 30 to about 18 ")
    small = load_config(None, ["data.dataset=folder", "cluster.k1=6", "cluster.eps=0.6", "train.num_ids=8"])
    advice = one_cluster_advice(small, 300)
    assert advice.startswith("cluster.k1=6 is already small for 300 images, so lower cluster.eps from 0.6 "
                             "(e.g. cluster.eps=0.45)")
    assert "k1 from" not in advice and "bmil cluster-scan" in advice
    # a tiny set: never below min_samples
    assert "to about 4 " in one_cluster_advice(default, 40)


def test_few_pseudo_identities_warning_is_said_once_with_what_to_change(caplog):
    from bmil.data import sampler

    warned: set[int] = set()  # what a run shares between its epochs' samplers
    with caplog.at_level(logging.WARNING, logger="bmil"):
        for clusters in (3, 5, 3):  # three epochs, each a new sampler
            sampler.PseudoIdentitySampler(np.arange(clusters * 4) % clusters, num_ids=8, num_instances=4,
                                          iterations=1, warned=warned)
    warnings = [r.getMessage() for r in caplog.records if "pseudo identities" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("only 3 pseudo identities for 8 per batch") and "train.num_ids=3" in warnings[0]
