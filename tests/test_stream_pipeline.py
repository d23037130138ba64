"""The pipeline on a folder of photos in the stream storage: prepare writes an index and no pixels, the
stages train and evaluate from files decoded on the fly exactly as from the memory storage, SAKD, spot
routing, the teacher cache, resume and two processes work there, and the shipped predictor's accuracy
on the test folder's files is the reported test accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, FakeNet, write_params, write_photo_folder

from kdcompress.config import TrainConfig
from kdcompress.data.prepared import FileSplit, load_prepared
from kdcompress.data.stream import StreamLoader
from kdcompress.data.transforms import Geometry
from kdcompress.deploy import predict as predictor
from kdcompress.methods import build_loss
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData
from pipeline import distill, evaluate, export, prepare, train_teacher

PHOTOS = {"dataset": "image_folder", "root": "photos", "image_size": 16, "val_fraction": 0.25, "storage": "stream",
          "workers": 1}


@pytest.fixture
def photos(project, monkeypatch):
    """The tiny project (conftest) with a 4-class photo folder and its params in the stream storage."""
    monkeypatch.setenv("KDCOMPRESS_CACHE_DIR", str(project / "cache"))
    write_photo_folder(project / "photos", {"train": 12, "test": 5})
    write_params(project, data=PHOTOS)
    return project


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """One project for the slow tests: the photos prepared in the stream storage and a teacher trained
    on them once; each test runs the stages it is about (and rewrites its params)."""
    root = tmp_path_factory.mktemp("streamed")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("KDCOMPRESS_CACHE_DIR", str(root / "cache"))
        mp.setenv("PYTHONPATH", str(ROOT))  # the workers of base.nproc: 2 run `python -m pipeline.distill` here
        mp.delenv("DVC_ROOT", raising=False)
        write_photo_folder(root / "photos", {"train": 12, "test": 5})
        write_params(root, data=PHOTOS)
        assert prepare.main([]) == 0 and train_teacher.main([]) == 0
        yield root


def stage_args(data: str, tag: str = "") -> dict[str, list[str]]:
    out = f"artifacts{tag}"
    return {
        "prepare": ["--out", data, "--metrics", f"{out}/metrics/prepare.json"],
        "teacher": ["--data", data, "--out", f"{out}/teacher.pt", "--resume", f"{out}/resume_t.pt",
                    "--metrics", f"{out}/teacher.json", "--plots", f"{out}/teacher.csv"],
    }


def test_prepare_writes_an_index_with_content_hashes_and_no_pixels(photos):
    assert prepare.main([]) == 0
    data = photos / "artifacts" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "test.csv", "train.csv", "val.csv"]
    meta = json.loads((data / "meta.json").read_text())
    assert meta["storage"] == "stream" and meta["input_shape"] == [3, 16, 16] and meta["sizes"]["val"] == 12
    assert meta["geometry"]["crop_fraction"] == 0.875  # photos: ImageNet's centre crop by default
    metrics = json.loads((photos / "artifacts" / "metrics" / "prepare.json").read_text())
    assert metrics["storage"] == "stream" and metrics["train"] == 36 and metrics["skipped"] == 0
    before = (data / "train.csv").read_text()
    photo = photos / "photos" / before.splitlines()[1].split(",")[0]  # the first training file
    with open(photo, "ab") as f:  # the same pixels, other bytes: the index changes, so DVC reruns what follows
        f.write(b"\0")
    assert prepare.main([]) == 0 and (data / "train.csv").read_text() != before


def test_auto_storage_streams_what_does_not_fit_the_memory_budget(photos):
    write_params(photos, data={**PHOTOS, "storage": "auto"})
    assert prepare.main([]) == 0
    assert json.loads((photos / "artifacts" / "data" / "meta.json").read_text())["storage"] == "memory"
    write_params(photos, data={**PHOTOS, "storage": "auto", "memory_budget_gb": 1e-6})
    assert prepare.main([]) == 0
    assert json.loads((photos / "artifacts" / "data" / "meta.json").read_text())["storage"] == "stream"


def test_built_in_data_sets_refuse_the_stream_storage(project, capsys):
    write_params(project, data={"storage": "stream"})
    assert prepare.main([]) == 2
    assert capsys.readouterr().err.strip().startswith("error: data.storage: stream reads image files")


@pytest.mark.slow
def test_memory_and_stream_storages_train_the_same_teacher(streamed):
    """The stream storage decodes what the memory storage stores: the same batches, the same weights."""
    write_params(streamed, data={**PHOTOS, "storage": "memory"})
    args = stage_args("artifacts/memory", "/memory")
    assert prepare.main(args["prepare"]) == 0 and train_teacher.main(args["teacher"]) == 0
    write_params(streamed, data=PHOTOS)
    assert [load_prepared(f"artifacts/{s}").storage for s in ("memory", "data")] == ["memory", "stream"]
    memory = torch.load(streamed / "artifacts" / "memory" / "teacher.pt", weights_only=True)["state_dict"]
    stream = torch.load(streamed / "artifacts" / "teacher" / "teacher.pt", weights_only=True)["state_dict"]
    for key, value in memory.items():
        assert torch.equal(value, stream[key]), key


@pytest.mark.slow
def test_the_pipeline_on_streamed_photos_ships_what_it_reports(streamed):
    """distill (twice: the second served by the teacher cache) -> evaluate -> export; predict.py on
    the test folder's files gives the evaluated test accuracy."""
    photos = streamed
    assert distill.main([]) == 0 and distill.main([]) == 0
    assert json.loads((photos / "artifacts" / "metrics" / "distill.json").read_text())[
        "teacher_cache_hit_fraction"] == 1.0
    assert evaluate.main([]) == 0 and export.main([]) == 0
    reported = json.loads((photos / "artifacts" / "metrics" / "evaluate.json").read_text())["student"]["top1"]
    model = predictor.load(photos / "artifacts" / "onnx" / "student.onnx", threads=1)
    classes = json.loads((photos / "artifacts" / "data" / "meta.json").read_text())["classes"]
    results = model.predict_files([photos / "photos" / "test"])
    assert len(results) == 20 and all("top" in r for r in results)
    correct = [r["top"][0]["class"] == classes[int(r["file"].split("/")[-2][1:])] for r in results]
    assert sum(correct) / len(correct) == pytest.approx(reported, abs=1e-9)


@pytest.mark.slow
def test_sakd_and_spot_routing_run_on_streamed_photos(streamed):
    photos = streamed
    write_params(photos, data=PHOTOS, distill={"student": "tinycnn", "method": "kd", "epochs": 2, "batch_size": 32,
                                               "lr": 0.05, "eval_batch_size": 64, "sampling": "sakd"},
                 sakd={"interval": 1, "patch_size": 4})
    assert distill.main([]) == 0
    rounds = (photos / "artifacts" / "plots" / "selection_rounds.csv").read_text().splitlines()
    assert len(rounds) == 3  # a header and one row per round (every epoch)
    write_params(photos, data=PHOTOS, distill={"student": "tinycnn", "method": "at", "epochs": 1, "batch_size": 32,
                                               "lr": 0.05, "eval_batch_size": 64, "spots": "adaptive"})
    assert distill.main([]) == 0
    assert len((photos / "artifacts" / "plots" / "spot_routing.csv").read_text().splitlines()) > 1


@pytest.mark.slow
def test_two_processes_distil_streamed_photos(streamed):
    photos = streamed
    write_params(photos, data=PHOTOS, base={"seed": 0, "device": "cpu", "num_threads": 1, "nproc": 2})
    assert distill.main([]) == 0
    summary = json.loads((photos / "artifacts" / "metrics" / "distill.json").read_text())
    assert summary["samples_seen"] == 2 * 36  # two epochs of the 36 training images, split over two processes


def test_a_resumed_fit_on_streamed_files_is_bitwise_identical(tmp_path):
    write_photo_folder(tmp_path, {"train": 6, "val": 3})
    geometry = Geometry(size=12, crop_fraction=0.875, train_transform="random_resized_crop")

    def loader(split: str, **kw) -> StreamLoader:
        files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / split).rglob("*.*"))
        labels = torch.tensor([int(f.split("/")[1][1:]) for f in files])
        return StreamLoader(FileSplit(tmp_path, files, labels), [0.5] * 3, [0.25] * 3, geometry=geometry, workers=1,
                            **kw)

    train, val = loader("train", batch_size=8, hflip=True, seed=3), loader("val", batch_size=16)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05)

    def run():
        torch.manual_seed(0)
        return Distiller(FakeNet(num_classes=4, in_channels=3), FakeNet(num_classes=4, in_channels=3, width=8),
                         build_loss("kd")), FullData(len(train))

    full = fit(*run()[:1], train, val, FullData(len(train)), cfg)
    saved = []

    class Stop(Exception):
        pass

    def checkpoint(state):
        saved.append(state)
        if state["epoch"] == 0:
            raise Stop

    distiller, selector = run()
    with pytest.raises(Stop):
        fit(distiller, train, val, selector, cfg, checkpoint=checkpoint)
    distiller, selector = run()
    resumed = fit(distiller, train, val, selector, cfg, resume=saved[0])
    for key, value in full.last_state["student"].items():
        assert torch.equal(value, resumed.last_state["student"][key]), key
