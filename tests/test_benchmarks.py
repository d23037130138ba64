"""The method benchmark keeps one teacher per results file, so a table can be filled in across
restarts and on different machines (benchmarks._runs.pin_teacher)."""

import pytest

from benchmarks import _runs
from kdcompress.io import file_sha


def test_pin_teacher_copies_the_dvc_teacher_once_and_refuses_another(tmp_path, monkeypatch):
    made = tmp_path / "teacher.pt"
    made.write_bytes(b"weights A")
    monkeypatch.setattr(_runs, "TEACHER", str(made))
    results_path = tmp_path / "results" / "methods.json"

    pinned, sha = _runs.pin_teacher({}, results_path)
    assert pinned == tmp_path / "results" / "methods_teacher.pt"
    assert pinned.read_bytes() == b"weights A" and sha == file_sha(made)

    made.write_bytes(b"weights B")  # `dvc repro` on another machine trains other weights
    runs = {"kd/seed0": {"teacher_sha": sha}}
    assert _runs.pin_teacher(runs, results_path) == (pinned, sha)
    assert pinned.read_bytes() == b"weights A"

    pinned.write_bytes(b"weights C")
    with pytest.raises(SystemExit, match="another teacher"):
        _runs.pin_teacher(runs, results_path)
    pinned.unlink()
    with pytest.raises(SystemExit, match="not found, but"):
        _runs.pin_teacher(runs, results_path)
    assert not pinned.exists()  # runs exist: never re-pinned from whatever `dvc repro` made


def test_pin_teacher_needs_a_teacher_to_start(tmp_path, monkeypatch):
    monkeypatch.setattr(_runs, "TEACHER", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="dvc repro train_teacher"):
        _runs.pin_teacher({}, tmp_path / "methods.json")


def test_pin_teacher_makes_a_teacher_from_its_source_only_when_none_is_pinned(tmp_path):
    made = []

    def train():
        made.append(tmp_path / "trained.pt")
        made[-1].write_bytes(b"resnet56 weights")
        return made[-1]

    results_path = tmp_path / "sakd_kd_resnet56_resnet20.json"
    pinned, sha = _runs.pin_teacher({}, results_path, train)
    assert pinned.name == "sakd_kd_resnet56_resnet20_teacher.pt" and pinned.read_bytes() == b"resnet56 weights"
    assert _runs.pin_teacher({"full/seed0": {"teacher_sha": sha}}, results_path, train) == (pinned, sha)
    assert len(made) == 1  # pinned: not trained again
    with pytest.raises(SystemExit, match="^" + str(tmp_path / "none.pt") + ": not found$"):
        _runs.pin_teacher({}, tmp_path / "other.json", lambda: tmp_path / "none.pt")


def test_sakd_pair_takes_two_registry_models():
    import argparse

    from benchmarks.sakd import pair

    assert pair("resnet56:resnet20") == ("resnet56", "resnet20")
    for bad in ("resnet56", "resnet56:resnet20:tinycnn", "resnet57:resnet20", "tv:resnet20"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected TEACHER:STUDENT"):
            pair(bad)


def test_sweeps_keep_their_table_schedule_unless_told_otherwise(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    _runs.sweep_arguments(p, seeds=[0])
    default = p.parse_args(["--out", str(tmp_path)])
    assert _runs.read_sweep(default, "t")[0] == {"distill.epochs": _runs.SWEEP_EPOCHS}
    longer = p.parse_args(["--out", str(tmp_path), "-S", "distill.epochs=30", "-S", "distill.lr=0.2"])
    assert _runs.read_sweep(longer, "t")[0] == {"distill.epochs": 30, "distill.lr": 0.2}


def test_write_params_sets_dotted_keys_and_keeps_the_rest(tmp_path):
    import yaml

    params = _runs.write_params(tmp_path / "run", {"teacher.model": "resnet56", "distill.sakd_extra": 3})
    assert params == yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())
    base = yaml.safe_load(open("params.yaml"))
    assert params["teacher"] == {**base["teacher"], "model": "resnet56"}
    assert params["distill"] == {**base["distill"], "sakd_extra": 3} and params["data"] == base["data"]


def test_plan_skips_finished_runs_and_starts_each_seed_with_the_slowest_methods():
    from benchmarks.methods import plan

    results = {"kd/seed0": {"train_seconds": 450.0}, "data_free/seed0": {"train_seconds": 3600.0},
               "ce/seed0": {"train_seconds": 130.0}, "kd/seed1": {"train_seconds": 440.0}}
    methods = ["ce", "kd", "dkd", "data_free"]
    assert plan(results, methods, [0, 1]) == [("dkd", 0), ("data_free", 1), ("ce", 1), ("dkd", 1)]
    assert plan(results, methods, [1]) == [("data_free", 1), ("ce", 1), ("dkd", 1)]
    assert plan({}, methods, [0], timing=results) == [("data_free", 0), ("kd", 0), ("ce", 0), ("dkd", 0)]


def test_a_method_rerun_is_compared_with_the_same_runs_of_the_committed_table():
    from benchmarks.methods import against

    committed = {"kd/seed0": {"train_seconds": 450.0, "top1": 0.90}, "kd/seed1": {"train_seconds": 440.0, "top1": 0.92},
                 "ce/seed0": {"train_seconds": 130.0, "top1": 0.89}}
    rerun = {"kd/seed0": {"train_seconds": 300.0, "top1": 0.91, "teacher_cache_hit_fraction": 0.0},
             "kd/seed1": {"train_seconds": 140.0, "top1": 0.91, "teacher_cache_hit_fraction": 1.0},
             "ce/seed0": {"train_seconds": 130.0, "top1": 0.89, "teacher_cache_hit_fraction": None},
             "dkd/seed0": {"train_seconds": 150.0, "top1": 0.90}}  # not in the committed table: left out
    rows = against(rerun, committed).splitlines()
    assert "| kd | 2 | 890 | 440 | 0.49x | 91.00 | 91.00 | 0.00 / 1.00 |" in rows
    assert "| ce | 1 | 130 | 130 | 1.00x | 89.00 | 89.00 | - |" in rows
    assert rows[-1] == "| all | | 1020 | 570 | 0.56x | | | |" and not any("dkd" in r for r in rows)


def test_student_sweep_keys_round_trip_to_their_run_folders():
    from benchmarks.students import folder_of, key, parse_key

    for student, seed, tag in (("tinycnn", 0, ""), ("tinycnn:16-48-96", 1, "distill.epochs=20")):
        assert parse_key(key(student, seed, tag)) == (student, tag, seed)
    assert folder_of("mobilenet:16", 0, "") == "students/mobilenet_16_seed0"
    assert folder_of("tinycnn", 2, "distill.epochs=20") == "students/tinycnn_distill.epochs=20_seed2"


def test_spots_table_pairs_fixed_and_adaptive_runs():
    from benchmarks.spots import table

    def run(top1, seconds, routing=None):
        return {"top1": top1, "epoch_seconds": seconds, "jobs": 2, "routing": routing or []}

    last = {"epoch": 9, "routed_stage1": 0.25, "routed_output": 1.0, "graft_val_acc": 0.9}
    results = {"at/fixed/seed0": run(0.90, 10.0), "at/fixed/seed1": run(0.92, 12.0),
               "at/adaptive/seed0": run(0.915, 22.0, [last]), "at/adaptive/seed1": run(0.925, 22.0, [last]),
               "rkd/fixed/seed0": run(0.88, 8.0)}
    step_time = {"methods": {"at": {"ratio": 2.5}}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table(results, step_time).splitlines()
            if line.startswith("| ")}
    assert rows["at"] == ("| at | 2/2 | 91.00 ± 1.41 | 92.00 ± 0.71 | +1.00 | 11 | 22 | 2.00x | 2.50x | "
                          "stage1 0.25, output 1.00 | 90.00 |")
    assert rows["rkd"] == "| rkd | 1/0 | 88.00 ± 0.00 | - | - | 8 | - | - | - | - | - |"


def test_recipe_table_gives_val_test_gap_time_and_cache_hits_per_config():
    from benchmarks.recipe import table

    def run(val, test, seconds, hits):
        return {"val_top1": val, "top1": test, "teacher_top1": 0.93, "ece": 0.01, "train_seconds": seconds,
                "teacher_cache_hit_fraction": hits}

    results = {"default/seed0": run(0.92, 0.91, 100.0, 0.0), "default/seed1": run(0.93, 0.92, 120.0, 1.0),
               "epochs_15/seed0": run(0.925, 0.915, 165.0, 0.67)}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table(results).splitlines() if line.startswith("| ")}
    assert rows["default"] == "| default | 2 | 92.50 ± 0.71 | 91.50 ± 0.71 | 1.50 | 0.0100 | 110 | 0.00 / 1.00 |"
    assert rows["epochs_15"] == "| epochs_15 | 1 | 92.50 ± 0.00 | 91.50 ± 0.00 | 1.50 | 0.0100 | 165 | 0.67 |"
    assert "lr_0.2" not in rows


@pytest.mark.slow
def test_sakd_pair_pins_its_own_teacher_and_a_method_rerun_starts_on_the_method_teacher(project):
    """On tiny data: --pair trains the pair's teacher and pins it beside its table; methods --name
    starts another table on methods_teacher.pt and records whether the teacher cache was hit."""
    import json
    import shutil

    from benchmarks import methods, sakd
    from kdcompress.common.checkpoint import read_checkpoint
    from pipeline import prepare

    assert prepare.main([]) == 0
    out = project / "results"
    common = ["--seeds", "0", "--out", str(out), "-S", "distill.epochs=1"]

    sakd.main(["--pair", "smallnet:tinycnn", "--configs", "full", *common])
    pinned = out / "sakd_kd_smallnet_tinycnn_teacher.pt"
    assert read_checkpoint(pinned)["arch"] == "smallnet"
    assert (out / "runs" / "sakd_kd_smallnet_tinycnn" / "teacher" / "teacher.pt").read_bytes() == pinned.read_bytes()
    run = json.loads((out / "sakd_kd_smallnet_tinycnn.json").read_text())["full/seed0"]
    assert run["teacher_sha"] == file_sha(pinned) and run["teacher_cache_hit_fraction"] is None  # cache off

    shutil.copy(pinned, out / "methods_teacher.pt")
    methods.main(["--name", "methods_rerun", "--methods", "kd", *common])
    run = json.loads((out / "methods_rerun.json").read_text())["kd/seed0"]
    assert run["teacher_cache_hit_fraction"] == 0.0 and run["teacher_sha"] == file_sha(pinned)
    evaluation = json.loads((out / "runs" / "methods_rerun" / "kd_seed0" / "evaluate.json").read_text())
    fit = json.loads((out / "runs" / "methods_rerun" / "kd_seed0" / "distill.json").read_text())
    assert run["teacher_top1"] == evaluation["teacher"]["top1"] and run["val_top1"] == fit["val_acc"]
    assert (out / "methods_rerun_teacher.pt").read_bytes() == pinned.read_bytes()
    report = (out / "methods_rerun.md").read_text()
    assert "All 1 runs trained for" in report and "Against the same runs in methods.json" not in report


@pytest.mark.slow
def test_int8_students_runs_every_stage_of_a_student_and_qat_on_it(project):
    """On tiny data: the int8 table's teacher is trained once and pinned, a student goes through distill,
    evaluate, export, quantize, benchmark and ship on its own files, and QAT runs on the worst student."""
    import json

    from benchmarks import int8_students
    from pipeline import prepare

    assert prepare.main([]) == 0
    out = project / "results"
    int8_students.main(["--students", "tinycnn", "--teacher-epochs", "1", "--qat-epochs", "1", "--out", str(out),
                        "-S", "distill.epochs=1"])
    results = json.loads((out / "int8_students.json").read_text())
    run, folder = results["student/tinycnn"], out / "runs" / "int8_students" / "tinycnn"
    assert run["ship"]["test"]["top1"] == run["top1"] and (folder / "ship" / "model.onnx").exists()
    assert run["quantize"]["student"]["search"] and (out / "int8_students_teacher.pt").exists()
    assert results["qat"]["student"] == "tinycnn" and "qat-all" in results["qat"]["report"]["student"]["compared"]
    assert "| `tinycnn` |" in (out / "int8_students.md").read_text()


def test_photo_folder_writes_varied_rgb_jpegs_in_the_image_folder_layout_the_same_bytes_for_a_seed(tmp_path, capsys):
    import numpy as np
    from conftest import write_idx
    from PIL import Image

    from benchmarks.photo_folder import main, safe_name
    from kdcompress.config import DataConfig
    from kdcompress.data.sources import FASHION_CLASSES, load_image_folder

    rng = np.random.default_rng(0)
    labels = {"train": np.array([3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]), "t10k": np.arange(10)}
    for prefix, lbl in labels.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (len(lbl), 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", lbl)
    classes = [safe_name(c) for c in FASHION_CLASSES]
    assert classes[0] == "T-shirt_top" and classes[9] == "Ankle_boot"

    def generate(name: str, seed: int, workers: int) -> dict[str, bytes]:
        out = tmp_path / name
        assert main(["--train", "14", "--test", "10", "--out", str(out), "--seed", str(seed),
                     "--workers", str(workers), "--idx-dir", str(tmp_path)]) == 0
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}

    first = generate("a", seed=0, workers=1)
    assert "train: 14 images from 12 items; items reused cyclically" in capsys.readouterr().out
    # one item of each class in turn (classes 0..9, then the second items of classes 0 and 3), then again
    train_classes = [*range(10), 0, 3, 0, 1]
    expected = {f"train/{classes[c]}/{i}.jpg" for i, c in enumerate(train_classes)}
    expected |= {f"test/{classes[i]}/{i}.jpg" for i in range(10)}
    assert set(first) == expected
    sizes = set()
    for name in first:
        with Image.open(tmp_path / "a" / name) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
            assert 140 <= min(img.size) <= 260 and max(img.size) <= round(260 * 4 / 3)
            sizes.add(img.size)
    assert len(sizes) > 5
    assert first["train/T-shirt_top/12.jpg"] != first["train/T-shirt_top/0.jpg"]  # a reused item, other draws

    assert generate("b", seed=0, workers=2) == first  # the bytes depend on the seed, not on the workers
    other = generate("c", seed=1, workers=1)
    assert set(other) == set(first) and all(other[k] != first[k] for k in first)
    assert main(["--train", "10", "--test", "10", "--out", str(tmp_path / "a"), "--idx-dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--train", "10", "--test", "9", "--out", str(tmp_path / "d"), "--idx-dir", str(tmp_path)]) == 2
    assert "--test 9: fewer images than the 10 classes" in capsys.readouterr().err and not (tmp_path / "d").exists()

    raw = load_image_folder(DataConfig(dataset="image_folder", root=str(tmp_path / "a"), image_size=16))
    assert raw.classes == sorted(classes) and raw.test_labels.tolist() == list(range(10))  # one per class
