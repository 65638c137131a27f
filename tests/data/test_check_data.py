"""check_dataset / dataset_counts on small fake trees whose differences are worked out by hand;
the published counts named by ``bmil check-data`` and logged when training starts."""

from __future__ import annotations

import logging
import os
import re
import shutil

import pytest
from PIL import Image

from bmil.datasets import PUBLISHED_COUNTS, check_dataset, compare_counts, dataset_counts
from bmil.errors import DatasetError
from helpers import run_cli


def write_image(path, color=(200, 100, 50)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[os.path.splitext(path)[1]]
    Image.new("RGB", (4, 8), color).save(path, format=fmt)


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def corrupt(path):
    with open(path, "wb") as handle:
        handle.write(b"not an image at all")


# ---------------------------------------------------------------- SYSU-MM01

SYSU_SPEC = {
    (1, 1): 2, (1, 3): 1, (2, 2): 1, (2, 6): 2, (3, 4): 1, (3, 5): 1, (3, 3): 1,
    (7, 1): 2, (7, 3): 2, (8, 6): 1, (8, 2): 1,
}


def make_sysu(root):
    root = str(root)
    for (pid, cam), n in SYSU_SPEC.items():
        for k in range(n):
            write_image(os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg"))
    write_text(os.path.join(root, "exp", "train_id.txt"), "1,2\n")
    write_text(os.path.join(root, "exp", "val_id.txt"), "3,4\n")  # id 4 has no images
    write_text(os.path.join(root, "exp", "test_id.txt"), "7,8\n")
    os.makedirs(os.path.join(root, "cam5", "0002"))  # an empty id folder
    corrupt(os.path.join(root, "cam3", "0007", "0002.jpg"))
    return root


# Worked out from SYSU_SPEC: train ids 1, 2, 3 (4 has no image); visible cams 1, 2, 4, 5:
# 2 + 1 + 1 + 1 = 5; infrared cams 3, 6: 1 + 2 + 1 = 4; test ids 7, 8; queries 2 + 1 = 3.
SYSU_FOUND = {"train ids": 3, "train visible images": 5, "train infrared images": 4, "test ids": 2, "query images": 3}


def test_sysu_counts_and_differences(tmp_path):
    root = make_sysu(tmp_path)
    assert dataset_counts("sysu", root) == SYSU_FOUND
    assert check_dataset("sysu", root, workers=2) == [
        "SYSU-MM01 train ids: found 3, expected 395",
        "SYSU-MM01 train visible images: found 5, expected 22258",
        "SYSU-MM01 train infrared images: found 4, expected 11909",
        "SYSU-MM01 test ids: found 2, expected 96",
        "SYSU-MM01 query images: found 3, expected 3803",
        "SYSU-MM01 id 4 named in exp/val_id.txt has no images",
        f"empty id folder {root}/cam5/0002",
        f"unreadable image {root}/cam3/0007/0002.jpg: not a recognised image format",
    ]


def test_sysu_clean_tree_has_no_difference(tmp_path):
    root = make_sysu(tmp_path)
    write_text(os.path.join(root, "exp", "val_id.txt"), "3")
    os.rmdir(os.path.join(root, "cam5", "0002"))
    write_image(os.path.join(root, "cam3", "0007", "0002.jpg"))
    assert check_dataset("sysu", root, expected=SYSU_FOUND) == []
    assert check_dataset("sysu", root, verify_images=False) == compare_counts("sysu", SYSU_FOUND)


def test_sysu_wrong_root_raises(tmp_path):
    with pytest.raises(DatasetError) as error:
        check_dataset("sysu", tmp_path)
    assert str(error.value) == f"{tmp_path}/exp/train_id.txt not found: is {tmp_path} the SYSU-MM01 root?"


# ---------------------------------------------------------------- RegDB

REGDB_SPLITS = {t: ([1 + t % 4, 1 + (t + 1) % 4], [1 + (t + 2) % 4, 1 + (t + 3) % 4]) for t in range(1, 11)}


def make_regdb(root):
    root = str(root)
    for pid in range(1, 5):
        for k in range(2):
            write_image(os.path.join(root, "Visible", str(pid), f"v{k}.bmp"))
            write_image(os.path.join(root, "Thermal", str(pid), f"t{k}.bmp"))
    for trial, splits in REGDB_SPLITS.items():
        for split, ids in zip(("train", "test"), splits, strict=True):
            for name, folder, prefix in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                lines = "".join(f"{folder}/{pid}/{prefix}{k}.bmp {pid}\n" for pid in ids for k in range(2))
                write_text(os.path.join(root, "idx", f"{split}_{name}_{trial}.txt"), lines)
    return root


def test_regdb_against_published_counts(tmp_path):
    root = make_regdb(tmp_path)
    counts = dataset_counts("regdb", root)
    assert len(counts) == 10 * 2 * 3
    assert counts["trial 4 test ids"] == 2 and counts["trial 9 train thermal images"] == 4
    expected = []
    for trial, splits in REGDB_SPLITS.items():
        for split, ids in zip(("train", "test"), splits, strict=True):
            expected.append(f"RegDB trial {trial} {split} ids: found 2, expected 206")
            expected += [
                f"RegDB trial {trial} {split} {name} images of id {pid}: found 2, expected 10"
                for name in ("visible", "thermal") for pid in ids
            ]
    assert sorted(check_dataset("regdb", root, workers=2)) == sorted(expected)


def test_regdb_missing_images_and_uneven_ids(tmp_path):
    root = make_regdb(tmp_path)
    fake_published = {"train ids": 2, "test ids": 2, "images per id in each list": 2}
    assert check_dataset("regdb", root, expected=fake_published) == []
    # trial 3 trains on ids 4 and 1: drop one thermal line of id 4
    train_thermal_3 = os.path.join(root, "idx", "train_thermal_3.txt")
    with open(train_thermal_3) as handle:
        lines = handle.readlines()
    assert lines[0] == "Thermal/4/t0.bmp 4\n"
    write_text(train_thermal_3, "".join(lines[1:]))
    # Visible/2/v1.bmp is first listed by trial 1's train list (trial 1 trains on ids 2 and 3)
    os.remove(os.path.join(root, "Visible", "2", "v1.bmp"))
    assert check_dataset("regdb", root, expected=fake_published) == [
        "RegDB trial 3 train thermal images of id 4: found 1, expected 2",
        f"missing image {root}/Visible/2/v1.bmp listed in {root}/idx/train_visible_1.txt",
    ]


# ---------------------------------------------------------------- LLCM


def make_llcm(root):
    root = str(root)
    vis = ["vis/0001/0001_c01_s1_f1_vis.jpg 0", "vis/0002/0002_c03_s1_f2_vis.jpg 1", "vis/0002/gone_c03_vis.jpg 1"]
    nir = ["nir/0001/0001_c02_s1_f1_nir.jpg 0", "nir/0003/0003_c05_s1_f1_nir.jpg 2"]
    for line in vis[:2] + nir:
        write_image(os.path.join(root, line.split()[0]))
    write_text(os.path.join(root, "idx", "train_vis.txt"), "\n".join(vis) + "\n")
    write_text(os.path.join(root, "idx", "train_nir.txt"), "\n".join(nir) + "\n")
    write_text(os.path.join(root, "idx", "test_id.txt"), "5,6,9")  # 6 has no image
    write_image(os.path.join(root, "test_vis", "cam1", "0005", "a.jpg"))
    write_image(os.path.join(root, "test_vis", "cam2", "0005", "b.jpg"))
    write_image(os.path.join(root, "test_nir", "cam8", "0009", "c.jpg"))
    os.makedirs(os.path.join(root, "test_vis", "cam4", "0005"))
    return root


def test_llcm_counts_and_differences(tmp_path):
    root = make_llcm(tmp_path)
    assert dataset_counts("llcm", root) == {
        "train ids": 3, "train visible images": 3, "train infrared images": 2,
        "test ids": 2, "test visible images": 2, "test infrared images": 1,
    }
    assert check_dataset("llcm", root, workers=2) == [
        "LLCM train ids: found 3, expected 713",
        "LLCM test ids: found 2, expected 351",
        f"missing image {root}/vis/0002/gone_c03_vis.jpg listed in {root}/idx/train_vis.txt",
        "LLCM id 6 named in idx/test_id.txt has no images",
        f"empty id folder {root}/test_vis/cam4/0005",
    ]


# ---------------------------------------------------------------- folders and names


def test_folder_counts_and_corrupt_image(tmp_path):
    root = str(tmp_path)
    write_image(os.path.join(root, "visible", "a", "1.png"))
    write_image(os.path.join(root, "visible", "b", "2.png"))
    write_image(os.path.join(root, "infrared", "c", "3.png"))
    assert dataset_counts("folder", root) == {"visible images": 2, "infrared images": 1, "cameras": 3}
    assert PUBLISHED_COUNTS["folder"] == {}
    assert check_dataset("folder", root) == []
    corrupt(os.path.join(root, "visible", "b", "2.png"))
    assert check_dataset("folder", root) == [
        f"unreadable image {root}/visible/b/2.png: not a recognised image format"
    ]
    shutil.rmtree(os.path.join(root, "infrared"))
    with pytest.raises(DatasetError, match="infrared not found"):
        check_dataset("folder", root)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DatasetError) as error:
        dataset_counts("market", tmp_path)
    assert str(error.value) == "unknown dataset 'market': expected one of sysu, regdb, llcm, folder."


@pytest.mark.e2e
def test_check_data_names_the_published_counts(synthetic_root, capsys):
    """The synthetic tree has the SYSU-MM01 layout but far fewer ids and images."""
    code, out, _ = run_cli(capsys, "check-data", "--dataset", "sysu", str(synthetic_root))
    assert code == 1
    assert "SYSU-MM01 train ids: found 8, expected 395" in out
    assert re.search(r"train visible images: found \d+, expected 22258", out)
    assert re.search(r"train infrared images: found \d+, expected 11909", out)
    assert re.search(r"query images: found \d+, expected 3803", out)


@pytest.mark.e2e
def test_train_logs_the_counts_it_read_and_warns_on_differences(synthetic_root, tmp_path, make_config, caplog):
    from bmil.engine.trainer import Trainer

    cfg = make_config(synthetic_root, tmp_path, "data.dataset=sysu")
    with caplog.at_level(logging.INFO, logger="bmil"):
        Trainer(cfg, progress=False)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("sysu: train ids 8, train visible images") for m in infos)
    assert any("SYSU-MM01 train ids: found 8, expected 395" in m for m in warnings)
    assert any("expected 22258" in m for m in warnings)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bmil"):
        Trainer(make_config(synthetic_root, tmp_path / "synthetic"), progress=False)
    assert not any("expected" in r.getMessage() for r in caplog.records)  # no published counts


@pytest.mark.e2e
def test_folder_without_the_camera_level_is_a_problem(tmp_path, capsys):
    """visible/<person>/<image>: the person folders would be read as 14 cameras."""
    root = tmp_path / "flat"
    people = [f"p{i:02d}" for i in range(14)]
    for person in people:
        write_image(str(root / "visible" / person / "0.jpg"))
        write_image(str(root / "infrared" / person / "0.jpg"))
    code, out, _ = run_cli(capsys, "check-data", "--dataset", "folder", str(root))
    assert code == 1 and "no problem found" not in out
    for modality in ("visible", "infrared"):
        assert (f"{root}/{modality} holds 14 camera folders (p00, p01, p02, … (14 in all)) with images directly "
                "in them: they look like person-id folders") in out
    assert "2 problem(s)" in out
    # told that they are cameras, the same folder passes with a warning
    code, out, _ = run_cli(capsys, "check-data", "--dataset", "folder", "--no-ids-from-folders", str(root))
    assert code == 0 and "warning: " in out and "(2 warning(s) above)" in out


def test_folder_mixing_camera_and_person_levels_is_a_problem(tmp_path):
    from bmil.data.check import camera_level_mistakes

    root = tmp_path / "mixed"
    write_image(str(root / "visible" / "door" / "anna" / "0.jpg"))  # camera/person/image
    write_image(str(root / "visible" / "bob" / "0.jpg"))  # person/image: camera level missing
    write_image(str(root / "infrared" / "ir" / "anna" / "0.jpg"))
    assert camera_level_mistakes(root) == [
        f"{root}/visible: camera folder(s) bob hold images directly but door hold only sub-folders: is a camera "
        f"level missing above some person folders? The layout is {root}/visible/<camera>/<person id>/<image> (or, "
        f"without ids, {root}/visible/<camera>/<image>: then pass --no-ids-from-folders)"
    ]
    assert len(check_dataset("folder", root)) == 1  # a plain unlabelled folder passes: see above
