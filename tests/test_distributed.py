"""DDP on the CPU with gloo: 2 processes with global batch B end with the same weights (within
1e-4; sp's loss, beta = 3000, grows the summation-order differences of its gathered batch to ~3e-5 in
8 steps) as 1 process with batch B, for batch-level methods (rkd on the embedding, sp on a feature
map) that need the gathered global batch, and crd, whose negatives are the global batch and a queue
of earlier global batches; a per-sample method (kd) through the real stage, on two 'machines'.
SAKD's rounds over two processes: test_ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
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
@pytest.mark.parametrize("method", ["rkd", "sp", "crd"])
def test_two_processes_take_the_steps_of_one(method, tmp_path):
    single = train(method)
    mp.spawn(_rank, args=(2, method, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2)
    double = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, value in single["student"].items():
        if value.is_floating_point():
            torch.testing.assert_close(double["student"][key], value, atol=1e-4, rtol=1e-4, msg=key)
        else:
            assert torch.equal(double["student"][key], value), key
    for a, b in zip(single["history"], double["history"]):
        assert a["samples"] == b["samples"]
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5 * max(1.0, a["train_loss"])
        assert a["train_acc"] == b["train_acc"]


@pytest.mark.slow
def test_the_distill_stage_on_two_nodes_trains_as_one_process(tmp_path):
    """The real stage as dvc runs it, ``python -m pipeline.distill``, starting its own workers (gloo):
    two 'machines' on 127.0.0.1 (two launches of one process each, meeting at a c10d rendezvous) end
    with the same student as one process, one MLflow run, files written once.
    (test_launch: the same through dvc repro, its one-line errors and a SIGKILL.)"""
    import os
    import socket
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    write_fashion_idx(tmp_path / "raw")
    write_params(tmp_path, teacher={"model": "tinycnn", "epochs": 1})
    for stage in ("prepare", "train_teacher"):
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=tmp_path, env=env, check=True,
                       capture_output=True)

    def distill(out: str, **base) -> subprocess.Popen:
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump({**params, "base": {**params["base"], **base}}))
        return subprocess.Popen([sys.executable, "-m", "pipeline.distill", "--params", f"{out}.yaml", "--out", out,
                                 "--resume", f"{out}.resume", "--metrics", f"{out}.json"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done(proc: subprocess.Popen) -> tuple[str, str]:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        return out, err

    done(distill("student1.pt"))
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [distill("student2.pt", nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}") for _ in range(2)]
    outputs = [done(node)[0] for node in nodes]
    assert sum("-> student2.pt" in out for out in outputs) == 1  # rank 0 alone, on whichever node it is
    one, two = (torch.load(tmp_path / f"student{n}.pt", weights_only=True)["state_dict"] for n in (1, 2))
    for key, value in one.items():
        torch.testing.assert_close(two[key].float(), value.float(), atol=1e-4, rtol=1e-4, msg=key)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    students = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.data.tags.get("kdcompress.role") == "student"]
    assert len(students) == 2  # one per distill run, not one per process

