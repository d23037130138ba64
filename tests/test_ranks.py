"""Several processes give what one process gives, in every round (gloo on the CPU): SAKD's
interrupted difficulty passes select the same samples with the same alpha and features over four
rounds (clean, dropout, dropout, shuffle), and the logged train_loss stays the single-process one
when the last batch has fewer samples than processes (one rank gets none)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FakeNet, make_split
from test_distributed import CFG

from kdcompress.config import SAKDConfig
from kdcompress.data.loader import BatchLoader
from kdcompress.methods import build_loss
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData
from kdcompress.training.selection.sakd import SAKDSelector

N = 65  # batches of 16 end with a single sample: the second of two processes gets none


def _process(rank: int, world: int, init: str, out: str, fn, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.save(fn(*args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def on_two_processes(fn, tmp_path, *args) -> list:
    """``fn(*args)`` run in 2 gloo processes: every rank's result, in rank order."""
    mp.spawn(_process, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), fn, args), nprocs=2)
    return [torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True) for rank in range(2)]


def sakd_rounds(n: int) -> list[dict]:
    seed_everything(0, num_threads=1)
    loader = BatchLoader(make_split(n, seed=0), [0.5], [0.25], batch_size=16)
    distiller = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), FakeNet(width=8), build_loss("kd"))
    cfg = SAKDConfig(ratio=0.5, interval=1, patch_size=2)
    selector = SAKDSelector(cfg, distiller, loader, epochs=4, seed=3)
    rounds = []
    for epoch in range(4):  # beta_raw 0, 0.23, 0.46 (dropout), 0.71 > eta (shuffle)
        selector.select(epoch)
        rounds.append({"regime": selector.history[-1]["regime"], "beta": selector.history[-1]["beta"],
                       "selection": selector.selection.clone(), "alpha": selector.alpha.clone(),
                       "features": selector.features.clone()})
    return rounds


@pytest.mark.slow
def test_sakd_rounds_on_two_processes_are_the_single_process_rounds(tmp_path):
    single = sakd_rounds(N)
    assert [r["regime"] for r in single] == ["dropout"] * 3 + ["shuffle"]
    assert single[0]["beta"] == 0 and all(r["beta"] > 0 for r in single[1:])
    for rank, rounds in enumerate(on_two_processes(sakd_rounds, tmp_path, N)):
        for i, (got, want) in enumerate(zip(rounds, single)):
            where = f"rank {rank}, round {i}"
            assert torch.equal(got["selection"], want["selection"]), where
            torch.testing.assert_close(got["alpha"], want["alpha"], atol=1e-6, rtol=1e-5, msg=where)
            torch.testing.assert_close(got["features"], want["features"], atol=1e-6, rtol=1e-5, msg=where)


def fit_run(n: int) -> dict:
    seed_everything(0, num_threads=1)
    loader = BatchLoader(make_split(n, seed=0), [0.5], [0.25], batch_size=16, crop_padding=1, hflip=True)
    val = BatchLoader(make_split(32, seed=1), [0.5], [0.25], batch_size=32)
    distiller = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), FakeNet(width=8), build_loss("kd"))
    result = fit(distiller, loader, val, FullData(len(loader)), CFG)
    return {"student": result.last_state["student"], "history": result.history}


@pytest.mark.slow
def test_train_loss_on_two_processes_with_an_empty_rank_in_the_last_batch(tmp_path):
    single = fit_run(N)
    double = on_two_processes(fit_run, tmp_path, N)[0]
    for a, b in zip(single["history"], double["history"], strict=True):
        assert a["samples"] == b["samples"] == N
        assert math.isfinite(b["train_loss"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5, abs=1e-6)
        assert a["train_acc"] == b["train_acc"]
    for key, value in single["student"].items():
        if value.is_floating_point():
            torch.testing.assert_close(double["student"][key], value, atol=1e-5, rtol=1e-4, msg=key)
        else:
            assert torch.equal(double["student"][key], value), key
