"""DDP on the CPU with gloo: 2 processes with global batch B end with the same weights (within
1e-5) as 1 process with batch B, for a per-sample method (kd), batch-level ones (rkd on the
embedding, sp on a feature map) that need the gathered global batch, and crd, whose negatives are
the global batch and a queue of earlier global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, FakeNet, make_split, write_fashion_idx, write_params

from kdcompress.config import TrainConfig
from kdcompress.data.loader import BatchLoader
from kdcompress.methods import build_loss
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData

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
@pytest.mark.parametrize("method", ["kd", "rkd", "sp", "crd"])
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


def first_round() -> dict:
    from kdcompress.config import SAKDConfig
    from kdcompress.training.selection.sakd import SAKDSelector

    seed_everything(0, num_threads=1)
    loader = BatchLoader(make_split(64, seed=0), [0.5], [0.25], batch_size=16)
    distiller = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), FakeNet(width=8), build_loss("kd"))
    selector = SAKDSelector(SAKDConfig(ratio=0.5, interval=2, patch_size=4), distiller, loader, epochs=4)
    selector.select(0)  # the first round: clean images, so sharding changes nothing
    return {"alpha": selector.alpha, "selection": selector.selection, "features": selector.features}


def _sakd_rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.save(first_round(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sakd_round_sharded_over_two_processes_is_the_single_process_round(tmp_path):
    single = first_round()
    mp.spawn(_sakd_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "round")), nprocs=2)
    for rank in (0, 1):  # every rank holds the whole result: gathered scores, the broadcast selection
        got = torch.load(f"{tmp_path / 'round'}.{rank}", weights_only=True)
        assert torch.equal(got["selection"], single["selection"])
        torch.testing.assert_close(got["alpha"], single["alpha"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["features"], single["features"], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_torchrun_runs_the_distill_stage_in_two_processes(tmp_path):
    """The real stage under torchrun (gloo): the same student as one process, one MLflow run, files
    written once; SAKD across processes; a method not supported across processes is one line."""
    import os
    import subprocess
    import sys

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

    write_params(tmp_path, teacher={"model": "tinycnn", "epochs": 1}, sakd={"patch_size": 4, "interval": 1},
                 distill={"student": "tinycnn", "method": "kd", "epochs": 2, "batch_size": 32, "lr": 0.05,
                          "eval_batch_size": 64, "sampling": "sakd"})
    sakd = distill(2, "student_sakd.pt")  # the pass is sharded and gathered, the DPP runs once and is broadcast
    assert sakd.returncode == 0, sakd.stderr[-2000:]
    rounds = (tmp_path / "artifacts/plots/selection_rounds.csv").read_text().splitlines()
    assert len(rounds) == 3 and rounds[1].split(",")[rounds[0].split(",").index("selected")] == str(round(0.5 * 96))
    write_params(tmp_path, teacher={"model": "tinycnn", "epochs": 1},
                 distill={"student": "tinycnn", "method": "data_free", "epochs": 1, "batch_size": 32})
    refused = distill(2, "student_df.pt")
    assert refused.returncode != 0 and not (tmp_path / "student_df.pt").exists()
    assert "base.nproc: 2 processes do not run method 'data_free' yet" in refused.stderr
