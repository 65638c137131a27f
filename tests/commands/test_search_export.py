"""bmil extract / search / export: checkpoint loading, the features file, ranking, the
rank-list image, ONNX equality with PyTorch, and the one-sentence errors of the CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmil.commands import extract, search
from bmil.commands.export import require_onnx
from bmil.config import config_to_dict
from bmil.data.transforms import test_transform
from bmil.errors import BmilError, CheckpointError, ConfigError, DatasetError
from bmil.inference import load_model
from bmil.model import build_model
from helpers import flip_averaged_features, run_cli, save_model_checkpoint


def write_checkpoint(cfg, path: Path, seed: int = 0) -> torch.nn.Module:
    """A checkpoint as bmil train writes it (config, signature, model), random weights
    and non-trivial BN statistics, without training."""
    torch.manual_seed(seed)
    model = build_model(depth=cfg.model.depth, non_local=cfg.model.non_local, pretrained="none")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    save_model_checkpoint(cfg, model, path)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory, make_config):
    out = tmp_path_factory.mktemp("ckpt")
    cfg = make_config(synthetic_root, out)
    path = out / "model.pt"
    model = write_checkpoint(cfg, path)
    return path, model, cfg


def by_hand(model, paths, modality, cfg) -> np.ndarray:
    """Flip-averaged, L2-normalised features computed directly from the model."""
    return flip_averaged_features(model, paths, modality, test_transform(cfg.data.height, cfg.data.width))


# ---------------------------------------------------------------- checkpoint → model


def test_load_model_restores_weights_and_config(checkpoint):
    path, model, cfg = checkpoint
    loaded, loaded_cfg = load_model(path)
    assert not loaded.training
    assert config_to_dict(loaded_cfg) == config_to_dict(cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_load_model_errors(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no saved configuration"):
        load_model(tmp_path / "bare.pt")


# ---------------------------------------------------------------- extract and the features file


@pytest.mark.e2e
def test_extract_cli_writes_a_plain_npz(checkpoint, synthetic_root, tmp_path, capsys):
    path, model, cfg = checkpoint
    code, out, _ = run_cli(
        capsys, "extract", "--checkpoint", str(path), "--images", str(synthetic_root / "cam3"),
        "--modality", "infrared", "--out", str(tmp_path / "ir"), "--ids-from-folders", "--device", "cpu",
    )
    assert code == 0 and "infrared images" in out
    expected_paths = sorted(str(p) for p in (synthetic_root / "cam3").rglob("*.jpg"))
    with np.load(tmp_path / "ir.npz", allow_pickle=False) as data:  # no bmil needed to read it
        assert data["features"].dtype == np.float32
        assert list(data["paths"]) == expected_paths
        assert np.all(data["modality"] == 1)
        assert list(data["pids"]) == [Path(p).parent.name for p in expected_paths]  # ids are strings
        np.testing.assert_allclose(np.linalg.norm(data["features"], axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(data["features"][:3], by_hand(model, expected_paths[:3], 1, cfg), atol=1e-5)


def test_features_round_trip_and_foreign_files(tmp_path):
    feats = extract.FeatureSet(
        np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), ["a.jpg", "b.jpg", "c.png", "d.png"],
        np.array([0, 0, 1, 1]), None,
    )
    loaded = extract.load_features(extract.save_features(feats, tmp_path / "f.npz"))
    np.testing.assert_array_equal(loaded.features, feats.features)
    assert loaded.paths == feats.paths and loaded.pids is None
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for name in ("other.npz", "text.npz", "absent.npz"):
        with pytest.raises(DatasetError):
            extract.load_features(tmp_path / name)


def test_rank_gallery_matches_a_brute_force_sort():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(50, 8)).astype(np.float32)
    gallery[7] = gallery[3]  # a tie: the lower index ranks first
    query = rng.normal(size=8).astype(np.float32)
    order, scores = search.rank_gallery(query, gallery, 10)
    cos = [float(g @ query / np.linalg.norm(g) / np.linalg.norm(query)) for g in gallery]
    expected = sorted(range(50), key=lambda i: (-round(cos[i], 5), i))[:10]
    assert order.tolist() == expected
    np.testing.assert_allclose(scores, [cos[i] for i in expected], atol=1e-5)


# ---------------------------------------------------------------- search and the rank list


@pytest.mark.e2e
def test_search_cli_ranks_and_draws(checkpoint, synthetic_root, tmp_path, capsys):
    path, model, cfg = checkpoint
    run_cli(capsys, "extract", "--checkpoint", str(path), "--images", str(synthetic_root / "cam1"),
            "--modality", "visible", "--out", str(tmp_path / "vis.npz"), "--ids-from-folders", "--device", "cpu")
    query = sorted((synthetic_root / "cam3").rglob("*.jpg"))[0]
    query_id = query.parent.name
    top = 6
    code, out, err = run_cli(
        capsys, "search", "--checkpoint", str(path), "--query", str(query), "--gallery", str(tmp_path / "vis.npz"),
        "--top", str(top), "--query-id", str(query_id), "--out", str(tmp_path / "rank.png"), "--device", "cpu",
    )
    assert code == 0, err
    # independent ranking: hand-computed features, brute-force cosine sort
    gallery_paths = sorted(str(p) for p in (synthetic_root / "cam1").rglob("*.jpg"))
    g = by_hand(model, gallery_paths, 0, cfg)
    q = by_hand(model, [str(query)], 1, cfg)[0]
    expected = np.argsort(-(g @ q), kind="stable")[:top]
    lines = [line for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [line.split()[-2 if line.endswith(("match", "wrong")) else -1] for line in lines] == [
        gallery_paths[i] for i in expected
    ]
    image = Image.open(tmp_path / "rank.png").convert("RGB")
    assert image.size == ((top + 1) * (64 + 2 * 4) + top * 6, 128 + 2 * 4 + 30)
    assert image.getpixel((1, 1)) == (40, 90, 200)  # the query's frame
    for slot, i in enumerate(expected, 1):
        same = Path(gallery_paths[i]).parent.name == query_id
        x0 = slot * (64 + 2 * 4 + 6)
        assert image.getpixel((x0 + 1, 1)) == ((0, 170, 0) if same else (220, 0, 0))


# ---------------------------------------------------------------- user errors


@pytest.mark.e2e
def test_cli_errors_are_one_sentence(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    cases = [
        ("extract", "--checkpoint", str(tmp_path / "nope.pt"), "--images", str(tmp_path), "--modality", "visible",
         "--out", str(tmp_path / "f")),
        ("extract", "--checkpoint", str(path), "--images", str(tmp_path / "empty"), "--modality", "visible",
         "--out", str(tmp_path / "f")),
        ("search", "--checkpoint", str(path), "--query", str(tmp_path / "q.jpg"), "--gallery",
         str(tmp_path / "foreign.npz")),
        ("analyze", "--run", str(tmp_path / "empty")),
    ]
    for argv in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="'visible' or 'infrared'"):
        extract.parse_modality("thermal")


# ---------------------------------------------------------------- ONNX


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the export extra")
def test_onnx_export_equals_pytorch(checkpoint, tmp_path, capsys):
    path, model, cfg = checkpoint
    code, out, err = run_cli(capsys, "export", "--checkpoint", str(path), "--format", "onnx",
                             "--out", str(tmp_path), "--no-check")
    assert code == 0, err
    import onnxruntime

    images = torch.randn(3, 3, cfg.data.height, cfg.data.width, generator=torch.Generator().manual_seed(2))
    for modality, name in ((0, "visible"), (1, "infrared")):
        onnx_path = tmp_path / f"model_{name}.onnx"
        assert str(onnx_path) in out
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": images.numpy()})[0]
        normalise = torch.nn.functional.normalize
        with torch.no_grad():  # the test feature: n(n(f) + n(f_flip))
            feats = normalise(model(images, modality), dim=1) + normalise(
                model(torch.flip(images, dims=[3]), modality), dim=1)
        expected = normalise(feats, dim=1).numpy()
        assert got.shape == (3, model.feat_dim)  # batch 3 although exported with 2
        np.testing.assert_allclose(got, expected, atol=1e-4)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model_infrared.onnx")).metadata_props}
    assert meta["bmil.modality"] == "infrared" and meta["bmil.resize"] == cfg.eval.resize
    assert meta["bmil.flip_averaged"] == "true" and meta["bmil.l2_normalised"] == "true"
    assert f"[batch, 3, {cfg.data.height}, {cfg.data.width}]" in meta["bmil.input"]
    assert "0.485, 0.456, 0.406" in meta["bmil.preprocessing"] and f"[batch, {model.feat_dim}]" in meta["bmil.output"]
    # the two stems differ, so the two files must too
    assert not np.allclose(
        *(onnxruntime.InferenceSession(str(tmp_path / f"model_{n}.onnx")).run(None, {"images": images.numpy()})[0]
          for n in ("visible", "infrared")),
        atol=1e-4,
    )


@pytest.mark.e2e
def test_export_without_onnx_is_a_clear_error(checkpoint, monkeypatch, tmp_path, capsys):
    path, _, _ = checkpoint
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(BmilError, match="needs the package"):
        require_onnx()
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path))
    assert code == 2 and "pip install 'bmil[export]'" in err and "Traceback" not in err


# ---------------------------------------------------------------- string ids, modality folders


@pytest.fixture(scope="module")
def named_folder(synthetic_root, tmp_path_factory):
    """ROOT/{visible,infrared}/<camera>/<name>/ with two synthetic people renamed anna and bob."""
    import shutil

    root = tmp_path_factory.mktemp("named")
    people = sorted(p.name for p in (synthetic_root / "cam1").iterdir())[:2]
    for modality, camera in (("visible", "cam1"), ("infrared", "cam3")):
        for name, person in zip(("anna", "bob"), people, strict=True):
            target = root / modality / camera / name
            target.mkdir(parents=True)
            for image in sorted((synthetic_root / camera / person).glob("*.jpg"))[:3]:
                shutil.copy(image, target / image.name)
    return root


@pytest.mark.e2e
def test_string_ids_end_to_end_through_extract_and_search(checkpoint, named_folder, tmp_path, capsys):
    path, model, cfg = checkpoint
    code, out, err = run_cli(capsys, "extract", "--checkpoint", str(path), "--images", str(named_folder),
                             "--out", str(tmp_path / "both.npz"), "--ids-from-folders", "--device", "cpu")
    assert code == 0, err
    assert "6 visible, 6 infrared images" in out
    with np.load(tmp_path / "both.npz", allow_pickle=False) as data:
        assert list(data["pids"]) == ["anna"] * 3 + ["bob"] * 3 + ["anna"] * 3 + ["bob"] * 3
        assert data["modality"].tolist() == [0] * 6 + [1] * 6
    query = sorted((named_folder / "infrared" / "cam3" / "bob").glob("*.jpg"))[0]
    code, out, err = run_cli(capsys, "search", "--checkpoint", str(path), "--query", str(query),
                             "--query-modality", "infrared", "--gallery", str(tmp_path / "both.npz"),
                             "--query-id", "bob", "--top", "6", "--out", str(tmp_path / "rank.png"),
                             "--device", "cpu")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 6  # the mixed gallery: only its 6 visible images are ranked
    for row in rows:
        assert row[2] == "id" and row[3] in ("anna", "bob")
        assert "/visible/" in row[4]
        assert row[5] == ("match" if row[3] == "bob" else "wrong")
    assert sorted(row[3] for row in rows) == ["anna"] * 3 + ["bob"] * 3


def test_integer_ids_of_older_files_read_as_strings(tmp_path):
    np.savez(tmp_path / "old.npz", bmil_features=np.array(1), features=np.eye(3, dtype=np.float32),
             paths=np.array(["a.jpg", "b.jpg", "c.jpg"]), modality=np.zeros(3, np.int64),
             pids=np.array([7, -1, 12], np.int64))
    loaded = extract.load_features(tmp_path / "old.npz")
    assert loaded.pids.tolist() == ["7", "", "12"]
    assert search.match_flags(loaded, np.array([2, 1, 0]), "7") == [False, None, True]


def test_extract_splits_a_mixed_root_by_modality_folder(named_folder):
    visible = extract.images_by_modality(named_folder, 0)
    assert list(visible) == [0]
    assert len(visible[0]) == 6 and all("/visible/" in p for p in visible[0])
    both = extract.images_by_modality(named_folder, None)
    assert sorted(both) == [0, 1] and all("/infrared/" in p for p in both[1])
    # a folder named for its modality needs no --modality, and refuses the other one
    assert list(extract.images_by_modality(named_folder / "infrared", None)) == [1]
    with pytest.raises(ConfigError, match="named infrared"):
        extract.images_by_modality(named_folder / "infrared", 0)
    with pytest.raises(ConfigError, match="--modality"):
        extract.images_by_modality(named_folder / "visible" / "cam1", None)


def test_rank_list_captions_carry_rank_and_ids(synthetic_root, tmp_path):
    from bmil.analysis.rank_list import draw_rank_list

    paths = [str(p) for p in sorted((synthetic_root / "cam1").rglob("*.jpg"))[:3]]
    scores = np.array([0.9, 0.8, 0.7])
    bare = np.asarray(Image.open(draw_rank_list(paths[0], paths, scores, out=tmp_path / "a.png")))
    named = np.asarray(Image.open(draw_rank_list(paths[0], paths, scores, out=tmp_path / "b.png",
                                                 query_id="anna", match_ids=["anna", "bob", "carl"])))
    second_line = slice(128 + 2 * 4 + 2 + 13, None)
    assert (bare[second_line] == 255).all()  # no ids: the second caption line is blank
    for slot in range(4):  # with ids: every cell's second line has text
        x0 = slot * (64 + 2 * 4 + 6)
        assert (named[second_line, x0:x0 + 64] < 128).any(), slot


@pytest.mark.e2e
def test_search_with_a_folder_as_query_says_so(checkpoint, named_folder, tmp_path, capsys):
    path, _, _ = checkpoint
    run_cli(capsys, "extract", "--checkpoint", str(path), "--images", str(named_folder / "visible"),
            "--out", str(tmp_path / "vis.npz"), "--device", "cpu")
    code, _, err = run_cli(capsys, "search", "--checkpoint", str(path), "--query", str(named_folder),
                           "--gallery", str(tmp_path / "vis.npz"), "--device", "cpu")
    assert code == 2 and "is a folder, not an image file" in err and err.count("\n") == 1
