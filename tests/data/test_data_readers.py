"""Dataset readers on small fake trees in the real layouts."""

from __future__ import annotations

import os
import random

import pytest
from PIL import Image

from bmil.data import (
    INFRARED,
    VISIBLE,
    folder_train,
    llcm_gallery,
    llcm_query,
    llcm_train,
    regdb_test,
    regdb_train,
    sysu_gallery,
    sysu_query,
    sysu_train,
)
from bmil.errors import DatasetError


def write_image(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[os.path.splitext(path)[1].lower()]
    Image.new("RGB", (4, 8), color).save(path, format=fmt)


# ---------------------------------------------------------------- SYSU-MM01

SYSU_TRAIN_IDS, SYSU_VAL_IDS, SYSU_TEST_IDS = [2, 1], [3], [12, 10, 11]
# (pid, camera) -> number of images; absent pairs have no folder.
SYSU_SPEC = {
    (1, 1): 3, (1, 2): 2, (1, 3): 2, (1, 4): 1, (1, 6): 2,
    (2, 1): 1, (2, 3): 1,
    (3, 2): 2, (3, 6): 3,
    (10, 1): 4, (10, 2): 3, (10, 3): 2, (10, 4): 5, (10, 5): 2, (10, 6): 1,
    (11, 1): 3, (11, 3): 2,
    (12, 2): 6, (12, 5): 4, (12, 6): 3,
    (99, 1): 2, (99, 3): 2,  # in no split file: never read
}


def make_sysu(root, spec=SYSU_SPEC):
    for (pid, cam), n in spec.items():
        for k in range(n):
            write_image(os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg"))
    os.makedirs(os.path.join(root, "exp"), exist_ok=True)
    for name, ids in (("train_id.txt", SYSU_TRAIN_IDS), ("val_id.txt", SYSU_VAL_IDS), ("test_id.txt", SYSU_TEST_IDS)):
        with open(os.path.join(root, "exp", name), "w") as handle:
            handle.write(",".join(map(str, ids)) + " \n")
    return str(root)


def published_gallery_pick(root, id_file, cameras, trial):
    """The published gallery pick (SYSU-MM01's authors', DEEN's for LLCM), written out with the
    global random module seeded by the trial: for each test id of ``root``/``id_file`` in sorted
    order and each camera folder in ``cameras`` that holds it, one random image."""
    random.seed(trial)
    with open(os.path.join(root, id_file)) as handle:
        ids = [f"{int(y):04d}" for y in handle.read().splitlines()[0].split(",")]
    picked = []
    for pid in sorted(ids):
        for cam in cameras:
            folder = os.path.join(root, cam, pid)
            if os.path.isdir(folder):
                picked.append(random.choice(sorted(folder + "/" + name for name in os.listdir(folder))))
    return picked


def published_sysu_gallery(root, mode, trial):
    """The dataset authors' pick."""
    cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    return published_gallery_pick(root, os.path.join("exp", "test_id.txt"), cameras, trial)


def test_sysu_train_reads_train_and_val_ids_on_all_cameras(tmp_path):
    root = make_sysu(tmp_path)
    records = sysu_train(root)
    train_ids = set(SYSU_TRAIN_IDS) | set(SYSU_VAL_IDS)
    expected = {(pid, cam): n for (pid, cam), n in SYSU_SPEC.items() if pid in train_ids}
    assert len(records) == sum(expected.values())
    found = {}
    for r in records:
        found[(r.pid, r.camid)] = found.get((r.pid, r.camid), 0) + 1
        assert os.path.isabs(r.path) and os.path.isfile(r.path)
        assert r.modality == (INFRARED if r.camid in (3, 6) else VISIBLE)
        assert r.path == os.path.join(root, f"cam{r.camid}", f"{r.pid:04d}", os.path.basename(r.path))
    assert found == expected
    assert records == sorted(records, key=lambda r: (r.pid, r.camid, r.path))


def test_sysu_query_is_every_infrared_test_image(tmp_path):
    root = make_sysu(tmp_path)
    records = sysu_query(root)
    expected = [
        os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg")
        for pid in sorted(SYSU_TEST_IDS) for cam in (3, 6) for k in range(SYSU_SPEC.get((pid, cam), 0))
    ]
    assert [r.path for r in records] == expected
    assert {r.modality for r in records} == {INFRARED}
    assert [r.camid for r in records] == [int(p.split(os.sep)[-3][3:]) for p in expected]


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_sysu_gallery_matches_the_published_pick_for_ten_trials(tmp_path, mode):
    root = make_sysu(tmp_path)
    picks = []
    for trial in range(10):
        records = sysu_gallery(root, mode=mode, trial=trial)
        reference = published_sysu_gallery(root, mode, trial)
        assert [os.path.normpath(r.path) for r in records] == [os.path.normpath(p) for p in reference]
        assert [r.pid for r in records] == [int(p.split("/")[-2]) for p in reference]
        assert [r.camid for r in records] == [int(p.split("/")[-3][3:]) for p in reference]
        assert {r.modality for r in records} == {VISIBLE}
        picks.append(tuple(r.path for r in records))
    assert len(set(picks)) > 1  # trials really differ


def test_sysu_gallery_leaves_the_global_random_state_alone(tmp_path):
    root = make_sysu(tmp_path)
    random.seed(123)
    expected = random.random()
    random.seed(123)
    sysu_gallery(root, trial=4)
    assert random.random() == expected


def test_sysu_multi_shot_gallery_samples_up_to_ten_per_camera(tmp_path):
    spec = {(10, 1): 12, (10, 2): 3, (11, 4): 10, (12, 3): 2}
    root = make_sysu(tmp_path, spec)
    for trial in (0, 5):
        records = sysu_gallery(root, mode="all", trial=trial, shots=10)
        rng = random.Random(trial)
        expected = []
        for pid, cam in ((10, 1), (10, 2), (11, 4)):
            names = [f"{k + 1:04d}.jpg" for k in range(spec[(pid, cam)])]
            picked = rng.sample(names, min(10, len(names)))
            expected += [os.path.join(root, f"cam{cam}", f"{pid:04d}", n) for n in picked]
        assert [r.path for r in records] == expected
        assert len(records) == 10 + 3 + 10


def test_sysu_errors_name_the_expected_file(tmp_path):
    root = str(tmp_path)
    with pytest.raises(DatasetError) as error:
        sysu_train(root)
    assert str(error.value) == f"{root}/exp/train_id.txt not found: is {root} the SYSU-MM01 root?"
    with pytest.raises(DatasetError) as error:
        sysu_query(tmp_path / "nowhere")
    assert str(error.value) == f"SYSU-MM01 root {root}/nowhere is not a folder."
    make_sysu(tmp_path)
    with open(os.path.join(root, "exp", "test_id.txt"), "w") as handle:
        handle.write("1,x,3")
    with pytest.raises(DatasetError) as error:
        sysu_gallery(root)
    assert str(error.value) == f"{root}/exp/test_id.txt must hold comma-separated integer ids, found 'x'."
    with pytest.raises(ValueError, match="'all' or 'indoor'"):
        sysu_gallery(root, mode="outdoor")


# ---------------------------------------------------------------- RegDB

REGDB_IDS = [1, 2, 3, 4]


def regdb_split(trial):
    """(train ids, test ids) of a fake trial: a rotation of the four ids."""
    ids = REGDB_IDS[trial % 4:] + REGDB_IDS[: trial % 4]
    return ids[:2], ids[2:]


def make_regdb(root, images_per_id=2):
    root = str(root)
    for pid in REGDB_IDS:
        for k in range(images_per_id):
            write_image(os.path.join(root, "Visible", str(pid), f"v_{pid}_{k}.bmp"))
            write_image(os.path.join(root, "Thermal", str(pid), f"t_{pid}_{k}.bmp"))
    os.makedirs(os.path.join(root, "idx"), exist_ok=True)
    for trial in range(1, 11):
        for split, ids in zip(("train", "test"), regdb_split(trial), strict=True):
            for name, folder, prefix in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                lines = [f"{folder}/{pid}/{prefix}_{pid}_{k}.bmp {pid}" for pid in ids for k in range(images_per_id)]
                with open(os.path.join(root, "idx", f"{split}_{name}_{trial}.txt"), "w") as handle:
                    handle.write("\n".join(lines) + "\n")
    return root


def test_regdb_train_and_test_follow_the_trial_lists(tmp_path):
    root = make_regdb(tmp_path)
    for trial in (1, 3, 10):
        train_ids, test_ids = regdb_split(trial)
        train = regdb_train(root, trial)
        assert [(r.pid, r.camid, r.modality) for r in train] == (
            [(pid, 1, VISIBLE) for pid in train_ids for _ in range(2)]
            + [(pid, 2, INFRARED) for pid in train_ids for _ in range(2)]
        )
        assert train[0].path == os.path.join(root, "Visible", str(train_ids[0]), f"v_{train_ids[0]}_0.bmp")
        assert all(os.path.isfile(r.path) for r in train)
        visible, thermal = regdb_test(root, trial)
        assert {r.pid for r in visible} == {r.pid for r in thermal} == set(test_ids)
        assert {(r.camid, r.modality) for r in visible} == {(1, VISIBLE)}
        assert {(r.camid, r.modality) for r in thermal} == {(2, INFRARED)}
        assert all("/Thermal/" in r.path for r in thermal)


@pytest.mark.parametrize("trial", [0, 11, -1, "3"])
def test_regdb_trial_out_of_range(tmp_path, trial):
    root = make_regdb(tmp_path)
    with pytest.raises(DatasetError) as error:
        regdb_train(root, trial)
    assert str(error.value) == f"RegDB trial must be an integer from 1 to 10, got {trial!r}."


def test_regdb_missing_and_malformed_lists(tmp_path):
    root = make_regdb(tmp_path)
    os.remove(os.path.join(root, "idx", "test_thermal_2.txt"))
    with pytest.raises(DatasetError) as error:
        regdb_test(root, 2)
    assert str(error.value) == f"{root}/idx/test_thermal_2.txt not found: is {root} the RegDB root?"
    with open(os.path.join(root, "idx", "train_visible_4.txt"), "a") as handle:
        handle.write("Visible/9/no_label.bmp\n")
    with pytest.raises(DatasetError) as error:
        regdb_train(root, 4)
    assert str(error.value) == (
        f"{root}/idx/train_visible_4.txt line 5 must read 'relative/path label', found 'Visible/9/no_label.bmp'."
    )


# ---------------------------------------------------------------- LLCM

LLCM_TRAIN = {
    VISIBLE: [("vis/0001/0001_c01_s185535_f7010_vis.jpg", 0), ("vis/0001/0001_c04_s185540_f12_vis.jpg", 0),
              ("vis/0002/0002_c02_s100000_f1_vis.jpg", 1)],
    INFRARED: [("nir/0001/0001_c06_s200656_f4830_nir.jpg", 0), ("nir/0002/0002_c09_s1_f2_nir.jpg", 1)],
}
LLCM_TEST_IDS = [5, 3]
# (folder, camera, pid) -> number of images
LLCM_TEST_SPEC = {
    ("test_vis", 1, 3): 3, ("test_vis", 7, 3): 2, ("test_vis", 2, 5): 4, ("test_vis", 9, 5): 1,
    ("test_nir", 2, 3): 2, ("test_nir", 3, 3): 2, ("test_nir", 9, 5): 3, ("test_nir", 1, 5): 2,
}


def make_llcm(root):
    root = str(root)
    for modality, name in ((VISIBLE, "train_vis.txt"), (INFRARED, "train_nir.txt")):
        for path, _ in LLCM_TRAIN[modality]:
            write_image(os.path.join(root, path))
        os.makedirs(os.path.join(root, "idx"), exist_ok=True)
        with open(os.path.join(root, "idx", name), "w") as handle:
            handle.writelines(f"{path} {label}\n" for path, label in LLCM_TRAIN[modality])
    with open(os.path.join(root, "idx", "test_id.txt"), "w") as handle:
        handle.write(",".join(map(str, LLCM_TEST_IDS)))
    for (folder, cam, pid), n in LLCM_TEST_SPEC.items():
        for k in range(n):
            write_image(os.path.join(root, folder, f"cam{cam}", f"{pid:04d}", f"{pid:04d}_c{cam:02d}_s{k}_f{k}.jpg"))
    return root


def deen_llcm_gallery(root, mode, trial):
    """DEEN's process_gallery_llcm pick (mode 1 visible, 2 near-infrared)."""
    if mode == 1:
        cameras = [f"test_vis/cam{c}" for c in range(1, 10)]
    else:
        cameras = [f"test_nir/cam{c}" for c in (1, 2, 4, 5, 6, 7, 8, 9)]
    return published_gallery_pick(root, os.path.join("idx", "test_id.txt"), cameras, trial)


def test_llcm_train_parses_cameras_from_file_names(tmp_path):
    root = make_llcm(tmp_path)
    records = llcm_train(root)
    assert [(r.pid, r.camid, r.modality) for r in records] == [
        (0, 1, VISIBLE), (0, 4, VISIBLE), (1, 2, VISIBLE), (0, 6, INFRARED), (1, 9, INFRARED)
    ]
    assert records[3].path == os.path.join(root, "nir", "0001", "0001_c06_s200656_f4830_nir.jpg")


def test_llcm_query_is_every_test_image_of_one_modality(tmp_path):
    root = make_llcm(tmp_path)
    infrared = llcm_query(root, INFRARED)
    # test_nir/cam3 is not among DEEN's infrared test cameras: ignored.
    assert [(r.pid, r.camid) for r in infrared] == [(3, 2), (3, 2), (5, 1), (5, 1), (5, 9), (5, 9), (5, 9)]
    assert {r.modality for r in infrared} == {INFRARED}
    visible = llcm_query(root, VISIBLE)
    assert len(visible) == 3 + 2 + 4 + 1
    assert [r.camid for r in visible] == [1, 1, 1, 7, 7, 2, 2, 2, 2, 9]
    assert all(os.path.isfile(r.path) for r in visible + infrared)


@pytest.mark.parametrize("modality", [VISIBLE, INFRARED])
def test_llcm_gallery_matches_deen_for_ten_trials(tmp_path, modality):
    root = make_llcm(tmp_path)
    picks = set()
    for trial in range(10):
        records = llcm_gallery(root, modality, trial)
        reference = deen_llcm_gallery(root, 1 if modality == VISIBLE else 2, trial)
        assert [os.path.normpath(r.path) for r in records] == [os.path.normpath(p) for p in reference]
        assert [r.camid for r in records] == [int(p.split("/")[-3][3:]) for p in reference]
        assert [r.pid for r in records] == [int(p.split("/")[-2]) for p in reference]
        picks.add(tuple(r.path for r in records))
    assert len(picks) > 1


def test_llcm_file_name_without_camera(tmp_path):
    root = make_llcm(tmp_path)
    write_image(os.path.join(root, "vis", "0003", "odd.jpg"))
    with open(os.path.join(root, "idx", "train_vis.txt"), "a") as handle:
        handle.write("vis/0003/odd.jpg 2\n")
    with pytest.raises(DatasetError) as error:
        llcm_train(root)
    assert str(error.value) == (
        f"cannot read the camera of {root}/vis/0003/odd.jpg listed in {root}/idx/train_vis.txt: "
        "expected a file name like 0001_c01_s185535_f7010_vis.jpg."
    )


# ---------------------------------------------------------------- user folders


def test_folder_reader_modalities_cameras_and_extensions(tmp_path):
    root = str(tmp_path)
    write_image(os.path.join(root, "visible", "gate", "day1", "a.JPG"))
    write_image(os.path.join(root, "visible", "gate", "b.png"))
    write_image(os.path.join(root, "visible", "hall", "c.jpeg"))
    write_image(os.path.join(root, "infrared", "gate", "d.BMP"))
    write_image(os.path.join(root, "infrared", "yard", "e.jpg"))
    write_image(os.path.join(root, "infrared", "yard", ".hidden.jpg"))
    with open(os.path.join(root, "visible", "hall", "notes.txt"), "w") as handle:
        handle.write("not an image")
    records = folder_train(root)
    # camera names of both modalities, sorted: gate 0, hall 1, yard 2
    assert [(os.path.relpath(r.path, root), r.camid, r.modality, r.pid) for r in records] == [
        ("visible/gate/b.png", 0, VISIBLE, -1),
        ("visible/gate/day1/a.JPG", 0, VISIBLE, -1),
        ("visible/hall/c.jpeg", 1, VISIBLE, -1),
        ("infrared/gate/d.BMP", 0, INFRARED, -1),
        ("infrared/yard/e.jpg", 2, INFRARED, -1),
    ]
    assert all(os.path.isabs(r.path) for r in records)


def test_folder_reader_errors(tmp_path):
    root = str(tmp_path)
    write_image(os.path.join(root, "visible", "cam", "a.jpg"))
    with pytest.raises(DatasetError) as error:
        folder_train(root)
    assert str(error.value) == f"{root}/infrared not found: put the infrared images in {root}/infrared/<camera>/."
    os.makedirs(os.path.join(root, "infrared", "cam"))
    with pytest.raises(DatasetError) as error:
        folder_train(root)
    assert str(error.value) == f"no images (.jpg, .jpeg, .png, .bmp) found under {root}/infrared."
