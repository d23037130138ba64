"""DDP on the CPU with gloo: 2 processes with global batch B end with the same weights (within
1e-5) as 1 process with batch B, for a per-sample method (kd) and batch-level ones (rkd on the
embedding, sp on a feature map) that need the gathered global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import FakeNet, make_split
from kdcompress.config import TrainConfig
from kdcompress.data import BatchLoader
from kdcompress.distiller import Distiller
from kdcompress.losses import build_loss
from kdcompress.runtime import seed_everything
from kdcompress.selection import FullData
from kdcompress.train import fit

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=1, hflip=True)


def train(method: str) -> dict:
    seed_everything(0, num_threads=1)
    loader = BatchLoader(make_split(64, seed=0), [0.5], [0.25], batch_size=16, crop_padding=1, hflip=True)
    val = BatchLoader(make_split(32, seed=1), [0.5], [0.25], batch_size=32)
    distiller = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), FakeNet(width=8), build_loss(method))
    result = fit(distiller, loader, val, FullData(len(loader)), CFG)
    return {"student": result.last_state["student"], "history": result.history}


def _rank(rank: int, world: int, method: str, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = train(method)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "rkd", "sp"])
def test_two_processes_take_the_steps_of_one(method, tmp_path):
    single = train(method)
    mp.spawn(_rank, args=(2, method, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2)
    double = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, value in single["student"].items():
        if value.is_floating_point():
            torch.testing.assert_close(double["student"][key], value, atol=1e-5, rtol=1e-4, msg=key)
        else:
            assert torch.equal(double["student"][key], value), key
    for a, b in zip(single["history"], double["history"]):
        assert a["samples"] == b["samples"]
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * max(1.0, a["train_loss"])
        assert a["train_acc"] == b["train_acc"]


@pytest.mark.slow
def test_torchrun_runs_the_distill_stage_in_two_processes(tmp_path):
    """The real stage under torchrun (gloo): the same student as one process, one MLflow run, files
    written once; a setting not supported across processes is one line."""
    import os
    import subprocess
    import sys

    from test_pipeline import write_params

    from conftest import ROOT, write_fashion_idx

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    write_fashion_idx(tmp_path / "raw")
    write_params(tmp_path, teacher={"model": "tinycnn", "epochs": 1})
    for stage in ("prepare", "train_teacher"):
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=tmp_path, env=env, check=True,
                       capture_output=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))

    def distill(nproc: int, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "pipeline.distill",
                               "--out", out, "--resume", f"resume{nproc}.pt", "--metrics", f"distill{nproc}.json"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)

    for nproc in (1, 2):
        done = distill(nproc, f"student{nproc}.pt")
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (torch.load(tmp_path / f"student{n}.pt", weights_only=True)["state_dict"] for n in (1, 2))
    for key, value in one.items():
        torch.testing.assert_close(two[key].float(), value.float(), atol=1e-5, rtol=1e-4, msg=key)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    students = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.data.tags.get("kdcompress.role") == "student"]
    assert len(students) == 2  # one per distill run, not one per process

    write_params(tmp_path, teacher={"model": "tinycnn", "epochs": 1}, sakd={"patch_size": 4},
                 distill={"student": "tinycnn", "method": "kd", "epochs": 2, "batch_size": 32, "lr": 0.05,
                          "eval_batch_size": 64, "sampling": "sakd"})
    refused = distill(2, "student_sakd.pt")
    assert refused.returncode != 0 and not (tmp_path / "student_sakd.pt").exists()
    assert "base.nproc: 2 processes do not run sampling 'sakd' yet" in refused.stderr
