"""Exact resume: a run stopped after any epoch and continued from its resume state ends bitwise
identical to an uninterrupted run (every method, SAKD too); the resume file's key; and the real
thing: the distill stage killed with SIGKILL, then rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, FakeNet, write_fashion_idx, write_params

from kdcompress.config import SAKDConfig, TrainConfig
from kdcompress.io import atomic_write
from kdcompress.methods import LOSSES, build_loss
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.resume import ResumePoint, rng_state, run_key, set_rng_state
from kdcompress.training.selection import FullData
from kdcompress.training.selection.sakd import SAKDSelector

METHODS = sorted(LOSSES)


class Stop(Exception):
    pass


def make_run(name: str, train, sakd: bool):
    seed_everything(0)  # a new process: every model and module is rebuilt from the seed
    loss = build_loss(name)
    teacher = FakeNet(width=8) if loss is not None and loss.needs_teacher or sakd else None
    distiller = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), teacher, loss)
    sakd_cfg = SAKDConfig(ratio=0.5, interval=2, patch_size=4)
    selector = SAKDSelector(sakd_cfg, distiller, train, epochs=3, seed=0) if sakd else FullData(len(train))
    return distiller, selector


@pytest.mark.parametrize("name, sakd", [(m, False) for m in METHODS] + [("kd", True), ("dkd", True)])
def test_resumed_fit_is_bitwise_identical(name, sakd, tiny_loaders):
    train, val = tiny_loaders
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, crop_padding=1, hflip=True)
    distiller, selector = make_run(name, train, sakd)
    full = fit(distiller, train, val, selector, cfg)

    saved = []

    def checkpoint(state):
        saved.append(state)
        if state["epoch"] == 0:
            raise Stop  # killed right after the first epoch's state reached the disk

    distiller, selector = make_run(name, train, sakd)
    with pytest.raises(Stop):
        fit(distiller, train, val, selector, cfg, checkpoint=checkpoint)
    torch.manual_seed(1234)  # whatever the new process did before, the state decides
    distiller, selector = make_run(name, train, sakd)
    resumed = fit(distiller, train, val, selector, cfg, resume=saved[0], checkpoint=saved.append)

    assert [s["epoch"] for s in saved] == [0, 1, 2]
    for key, value in full.last_state["student"].items():
        assert torch.equal(value, resumed.last_state["student"][key]), key
    for key, value in full.last_state["loss"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.last_state["loss"][key]), key
    assert all(torch.equal(v, resumed.best_state[k]) for k, v in full.best_state.items())
    assert ([{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in full.history]
            == [{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in resumed.history])
    if sakd:
        assert torch.equal(full.last_state["selector"]["alpha"], resumed.last_state["selector"]["alpha"])
    assert all(t.device.type == "cpu" for t in saved[0]["student"].values())


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    atomic_write(tmp_path / "s.pt", lambda f: torch.save(state, f))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_point_key_and_stale_files(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.pt").write_bytes(b"a")
    key = run_key("distill", {"distill": {"lr": 0.1}}, [data])
    assert key == run_key("distill", {"distill": {"lr": 0.1}}, [data])
    assert key != run_key("distill", {"distill": {"lr": 0.2}}, [data])
    assert key != run_key("train_teacher", {"distill": {"lr": 0.1}}, [data])
    (data / "train.pt").write_bytes(b"b")
    assert key != run_key("distill", {"distill": {"lr": 0.1}}, [data])  # input content, not names

    point = ResumePoint(tmp_path / "resume" / "distill.pt", key)
    assert point.load() is None
    point.save({"epoch": 4, "x": torch.ones(2)}, mlflow_run_id="abc")
    assert point.load()["epoch"] == 4 and "continuing after epoch 5" in capsys.readouterr().out
    other = ResumePoint(point.path, "different")
    assert other.load() is None and other.stale_run_id == "abc"
    assert "other params, inputs or code; starting fresh" in capsys.readouterr().out
    point.path.write_bytes(b"garbage")
    assert point.load() is None and "unreadable" in capsys.readouterr().out
    point.clear()
    assert not point.path.exists()


def test_atomic_write_removes_temp_files_of_a_killed_write(tmp_path):
    stale = tmp_path / ".model.pt.k1ll3d.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".other.pt.k1ll3d.tmp"
    other.write_bytes(b"not ours")
    atomic_write(tmp_path / "model.pt", b"whole")
    assert not stale.exists() and other.exists() and (tmp_path / "model.pt").read_bytes() == b"whole"


# ---------------------------------------------------------------- the drill: SIGKILL, then rerun


def _distill(folder, *extra):
    return [sys.executable, "-m", "pipeline.distill", "--params", str(folder / "params.yaml"),
            "--data", str(folder / "artifacts/data"), "--teacher", str(folder / "teacher.pt"),
            "--out", str(folder / "student.pt"), "--resume", str(folder / "resume.pt"),
            "--metrics", str(folder / "distill.json"), "--plots", str(folder / "history.csv"),
            "--rounds", str(folder / "rounds.csv"), *extra]


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir()
    write_fashion_idx(killed / "raw")
    write_params(killed, distill={"student": "tinycnn", "method": "kd", "epochs": 6, "batch_size": 16, "lr": 0.05,
                                  "eval_batch_size": 64, "sampling": "sakd"},
                 sakd={"interval": 2, "patch_size": 4, "pass_teacher": "int8"},
                 teacher={"model": "tinycnn", "epochs": 1})
    for stage, args in (("prepare", ["--out", "artifacts/data"]),
                        ("train_teacher", ["--data", "artifacts/data", "--out", "teacher.pt"])):
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args], cwd=killed, env=env, check=True,
                       capture_output=True)
    shutil.copytree(killed, whole)

    proc = subprocess.Popen(_distill(killed), cwd=killed, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill as soon as epoch 2 of 6 is on disk
        resume = killed / "resume.pt"
        if resume.exists() and torch.load(resume, weights_only=True)["state"]["epoch"] >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "student.pt").exists()
    state = torch.load(killed / "resume.pt", weights_only=True)["state"]
    assert 1 <= state["epoch"] < 5

    rerun = subprocess.run(_distill(killed), cwd=killed, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"continuing after epoch {state['epoch'] + 1}" in rerun.stdout
    assert not (killed / "resume.pt").exists()  # cleared once the outputs are written
    subprocess.run(_distill(whole), cwd=whole, env=env, check=True, capture_output=True)

    a = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(whole / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    metrics = [json.loads((f / "distill.json").read_text()) for f in (killed, whole)]
    assert metrics[0]["val_acc"] == metrics[1]["val_acc"] and metrics[0]["samples_seen"] == metrics[1]["samples_seen"]

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    students = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.data.tags.get("kdcompress.role") == "student"]
    assert len(students) == 2 and {r.info.status for r in students} == {"FINISHED"}  # the killed run was continued
    history = mlflow.MlflowClient().get_metric_history(students[0].info.run_id, "val_acc")
    assert sorted({m.step for m in history}) == list(range(6))


def test_a_run_left_running_is_continued_or_marked_killed(tmp_path, monkeypatch):
    from kdcompress.common import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow

    run = tracking.start_run("student", "killed")
    run_id = run.info.run_id
    mlflow.end_run(status="RUNNING")  # what a SIGKILL leaves behind
    with tracking.start_run("student", "again", run_id=run_id) as again:
        assert again.info.run_id == run_id  # a resumed stage logs into the same run
    with tracking.start_run("student", "fresh", run_id="0" * 32) as fresh:
        assert fresh.info.run_id != run_id  # a run the store lost: a new one
    other = tracking.start_run("student", "stale")
    stale_id = other.info.run_id
    mlflow.end_run(status="RUNNING")
    tracking.mark_killed(stale_id)
    assert mlflow.get_run(stale_id).info.status == "KILLED"
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    tracking.mark_killed(run_id)  # only a run still RUNNING is touched
    assert mlflow.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_resumes_exactly(precision, tiny_loaders):
    """bf16 / fp16 autocast (fp16 with a GradScaler, whose state is part of the resume state)."""
    train, val = tiny_loaders
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=1, hflip=True)
    distiller, selector = make_run("kd", train, False)
    full = fit(distiller, train, val, selector, cfg, precision=precision)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in full.history)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"] * 1.5
    assert all(v.dtype == torch.float32 for v in full.best_state.values() if v.is_floating_point())
    saved = []

    def stop_after_first(state):
        saved.append(state)
        if state["epoch"] == 0:
            raise Stop

    distiller, selector = make_run("kd", train, False)
    with pytest.raises(Stop):
        fit(distiller, train, val, selector, cfg, checkpoint=stop_after_first, precision=precision)
    assert saved[0]["scaler"]["scale"] > 0 if precision == "fp16" else saved[0]["scaler"] == {}
    distiller, selector = make_run("kd", train, False)
    resumed = fit(distiller, train, val, selector, cfg, resume=saved[0], precision=precision)
    assert all(torch.equal(v, resumed.last_state["student"][k]) for k, v in full.last_state["student"].items())
