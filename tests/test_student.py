"""The distill stage's library function, ``training.student.distill``, called as the stage calls it:
its refusals come before anything is written, and a run writes the checkpoint, metrics, plots and one
finished MLflow run, and fills the teacher cache that the next run of a sweep reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest
from conftest import write_params

from kdcompress.common.checkpoint import read_checkpoint
from kdcompress.config import load_params
from kdcompress.runtime import seed_everything
from kdcompress.training.student import distill
from kdcompress.types import UserError
from models import create_model
from pipeline import prepare, train_teacher


def paths(root) -> SimpleNamespace:
    out = root / "out"
    return SimpleNamespace(data="artifacts/data", teacher="artifacts/teacher/teacher.pt", out=str(out / "student.pt"),
                           resume=str(out / "resume.pt"), metrics=str(out / "distill.json"),
                           plots=str(out / "history.csv"), rounds=str(out / "rounds.csv"),
                           routing=str(out / "routing.csv"))


@pytest.fixture
def trained(project, monkeypatch):
    monkeypatch.setenv("KDCOMPRESS_CACHE_DIR", str(project / "cache"))
    assert prepare.main([]) == 0 and train_teacher.main([]) == 0
    return project


@pytest.mark.parametrize("distill_cfg, message", [
    ({"method": "ce", "sampling": "sakd"}, "distill.sampling: 'sakd' needs a method that distils on the real samples"),
    ({"method": "ce", "kd_weight": 0.5}, "distill.ce_weight / distill.kd_weight: method 'ce' trains on cross-entropy"),
])
def test_refusals_come_before_anything_is_written(project, distill_cfg, message):
    params = load_params(write_params(project, distill=distill_cfg))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        distill(params, paths(project), create_model)
    assert not (project / "out").exists() and not (project / "mlflow.db").exists()


@pytest.mark.slow
def test_a_run_writes_its_outputs_and_the_next_run_reads_the_teacher_cache(trained):
    params = load_params(trained / "params.yaml")
    seed_everything(0, 1)  # as the stage's setup() does
    first = distill(params, paths(trained), create_model)
    assert first["teacher_cache_hit_fraction"] == 0.0
    out = trained / "out"
    checkpoint = read_checkpoint(out / "student.pt")
    assert checkpoint["arch"] == "tinycnn" and checkpoint["info"]["method"] == "kd"
    assert checkpoint["info"]["val_acc"] == first["val_acc"]
    assert json.loads((out / "distill.json").read_text()) == first
    assert len((out / "history.csv").read_text().splitlines()) == 1 + params["distill"].epochs
    assert not (out / "resume.pt").exists()  # cleared once the run finished
    seed_everything(0, 1)
    second = distill(params, paths(trained), create_model)
    assert second["teacher_cache_hit_fraction"] == 1.0 and second["val_acc"] == first["val_acc"]
    runs = mlflow.search_runs(experiment_names=["kdcompress"], filter_string="tags.kdcompress.role = 'student'")
    assert list(runs["status"]) == ["FINISHED", "FINISHED"]


def test_student_init_starts_from_the_file_or_refuses_it_in_one_line(project, capsys):
    """distill.student_init: the head of a file for 5 classes is re-initialised (one note), the rest is
    the file's; 3-channel weights for this 1-channel data are one UserError before anything is written."""
    import torch

    from kdcompress.common.checkpoint import save_checkpoint

    five = create_model("tinycnn", 5, 1)
    save_checkpoint(project / "five.pt", "tinycnn", 5, 1, five.state_dict())
    rgb = create_model("tinycnn", 10, 3)
    torch.save(rgb.state_dict(), project / "rgb.pt")
    distill_cfg = {"student": "tinycnn", "method": "ce", "student_init": "rgb.pt"}
    params = load_params(write_params(project, distill=distill_cfg))
    assert prepare.main([]) == 0
    with pytest.raises(UserError, match=r"rgb.pt.*shape mismatch.*weight"):
        distill(params, paths(project), create_model)
    assert not (project / "out").exists()
    from kdcompress.common.checkpoint import init_weights

    student = create_model("tinycnn", 10, 1)
    assert init_weights(student, project / "five.pt", "distill.student_init")
    assert "re-initialised the classifier head" in capsys.readouterr().out
    shared = [k for k, v in five.state_dict().items() if v.shape == student.state_dict()[k].shape]
    assert shared and all(torch.equal(five.state_dict()[k], student.state_dict()[k]) for k in shared)
