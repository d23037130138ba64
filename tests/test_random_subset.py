"""distill.sampling: random, the control of SAKD: a uniform seeded subset of round(ratio * N) samples,
redrawn every interval epochs, a pure function of (seed, round) (resume and every process agree), trained
on with the base method's own loss; and a real distill run with it."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from conftest import TINY, FakeNet, write_params
from test_student import paths, trained  # noqa: F401 - trained: the prepared project, its teacher trained

from kdcompress.common import distributed
from kdcompress.config import SAKDConfig, TrainConfig, load_params
from kdcompress.methods.kd import KD
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection.build import build_selector
from kdcompress.training.selection.random_subset import RandomSubset
from kdcompress.training.student import distill
from kdcompress.types import UserError
from models import create_model


class Stop(Exception):
    pass


def subsets(selector: RandomSubset, epochs: int) -> list[list[int]]:
    return [selector.select(e).tolist() for e in range(epochs)]


def test_the_subset_has_round_ratio_n_distinct_samples():
    for n, ratio, k in [(64, 0.5, 32), (10, 0.25, 2), (7, 0.5, 4), (5, 0.01, 1), (5, 1.0, 5)]:
        chosen = RandomSubset(n, ratio, interval=1, seed=0).select(0)
        assert len(chosen) == k and len(set(chosen.tolist())) == k
        assert chosen.tolist() == sorted(chosen.tolist()) and 0 <= int(chosen.min()) and int(chosen.max()) < n


def test_redrawn_at_every_interval_and_different_per_round():
    sel = RandomSubset(1000, 0.5, interval=3, seed=0)
    drawn = subsets(sel, 9)
    assert drawn[0] == drawn[1] == drawn[2] and drawn[3] == drawn[4] == drawn[5] and drawn[6] == drawn[7] == drawn[8]
    assert len({tuple(drawn[e]) for e in (0, 3, 6)}) == 3
    assert [h["epoch"] for h in sel.history] == [0, 3, 6] and [h["round"] for h in sel.history] == [1, 2, 3]
    assert all(h["selected"] == 500 for h in sel.history)
    overlap = len(set(drawn[0]) & set(drawn[3])) / 500
    assert sel.history[0]["overlap_prev"] == 0.0 and sel.history[1]["overlap_prev"] == pytest.approx(overlap)
    assert 0.4 < overlap < 0.6  # independent uniform halves overlap by about half


def test_uniform_over_the_samples():
    """Over 400 rounds every one of 20 samples is picked about half the time (binomial, sd 10)."""
    sel = RandomSubset(20, 0.5, interval=1, seed=0)
    counts = torch.zeros(20)
    for e in range(400):
        counts[sel.select(e)] += 1
    assert counts.sum() == 400 * 10 and int(counts.min()) > 150 and int(counts.max()) < 250


def test_a_pure_function_of_seed_and_round_whatever_ran_before():
    """Every process (DDP rank) builds its own selector, in its own state of the global RNG; a resumed
    run starts at any epoch: all draw the same subsets. Another seed draws others."""
    reference = subsets(RandomSubset(200, 0.5, interval=2, seed=7), 6)
    for rank in range(3):
        torch.manual_seed(1000 + rank)  # what the process did before
        torch.rand(rank + 1)
        assert subsets(RandomSubset(200, 0.5, interval=2, seed=7), 6) == reference
    late = RandomSubset(200, 0.5, interval=2, seed=7)
    assert [late.select(e).tolist() for e in (5, 3)] == [reference[5], reference[3]]
    other = subsets(RandomSubset(200, 0.5, interval=2, seed=8), 6)
    assert all(a != b for a, b in zip(other, reference))


def test_every_rank_of_a_distributed_run_trains_on_the_same_subset(monkeypatch):
    """Simulated ranks: the selector asks no process anything, so each rank's own draw is the same."""
    drawn = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        torch.manual_seed(rank)
        drawn.append(subsets(RandomSubset(100, 0.3, interval=2, seed=1), 4))
    assert drawn[0] == drawn[1]


def test_state_round_trip_continues_the_history_without_repeating_a_round():
    a = RandomSubset(50, 0.5, interval=2, seed=3)
    a.select(0), a.select(1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = RandomSubset(50, 0.5, interval=2, seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.select(1).tolist() == a.select(1).tolist()  # resumed mid-round: the same subset, no new record
    assert len(b.history) == 1
    assert b.select(2).tolist() == a.select(2).tolist() and [h["epoch"] for h in b.history] == [0, 2]


def test_build_selector_makes_it_from_the_sakd_ratio_and_interval(tiny_loaders):
    train, _ = tiny_loaders
    distiller = Distiller(FakeNet(), FakeNet(), KD(4.0))
    sel = build_selector("random", SAKDConfig(ratio=0.25, interval=3), distiller, train, epochs=6, seed=2)
    assert isinstance(sel, RandomSubset) and (sel.k, sel.interval, sel.seed) == (16, 3, 2)
    assert sel.weights(torch.arange(4)) is None  # the base method's fixed weights


def test_fit_trains_on_the_subset_with_the_base_loss_and_resumes_exactly(tiny_loaders):
    train, val = tiny_loaders
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, crop_padding=1, hflip=False)

    def run():
        seed_everything(0)
        distiller = Distiller(FakeNet(), FakeNet(width=8), KD(4.0), ce_weight=0.1, kd_weight=0.9)
        return distiller, RandomSubset(len(train), 0.5, interval=2, seed=0)

    distiller, sel = run()
    seen, forward = [], distiller.forward
    distiller.forward = lambda x, y, alpha=None, index=None: seen.append((index, alpha)) or forward(x, y, alpha, index)
    result = fit(distiller, train, val, sel, cfg)
    assert [h["samples"] for h in result.history] == [32, 32, 32]
    assert all(alpha is None for _, alpha in seen)
    per_epoch = [torch.cat([i for i, _ in seen[e * 2:(e + 1) * 2]]).sort().values for e in range(3)]
    assert torch.equal(per_epoch[0], sel.subset(0)) and torch.equal(per_epoch[1], sel.subset(0))
    assert torch.equal(per_epoch[2], sel.subset(2))
    assert [h.get("selection_epoch") for h in result.history] == [0, None, 2]

    for stop in (0, 1):  # resumed mid-round, and at a round's start
        distiller, sel = run()
        states = []

        def checkpoint(state, stop=stop):
            states.append(state)
            if state["epoch"] == stop:
                raise Stop  # killed right after this epoch's state reached the disk

        with pytest.raises(Stop):
            fit(distiller, train, val, sel, cfg, checkpoint=checkpoint)
        torch.manual_seed(1234)  # whatever the new process did before, the state decides
        distiller, sel = run()
        resumed = fit(distiller, train, val, sel, cfg, resume=states[-1])
        for key, value in result.last_state["student"].items():
            assert torch.equal(value, resumed.last_state["student"][key]), (stop, key)
        assert [h["epoch"] for h in sel.history] == [0, 2]


def test_only_ratio_and_interval_of_sakd_apply_to_random(project):
    sampling = {"distill": {"sampling": "random", "student": "tinycnn", "method": "kd"}}
    params = load_params(write_params(project, sakd={"ratio": 0.25, "interval": 2}, **sampling))
    assert params["distill"].sampling == "random" and params["sakd"].ratio == 0.25
    with pytest.raises(UserError, match=r"^sakd.theta: 2.0 does nothing unless distill.sampling is 'sakd'; "):
        load_params(write_params(project, sakd={"theta": 2.0}, **sampling))


@pytest.mark.slow
@pytest.mark.usefixtures("trained")
def test_a_real_distill_with_a_random_subset(project):
    params = load_params(write_params(project, distill={**TINY["distill"], "sampling": "random", "epochs": 3},
                                      sakd={"ratio": 0.5, "interval": 2}))
    assert params["distill"].student == "tinycnn"
    seed_everything(0, 1)
    summary = distill(params, paths(project), create_model)
    n_train = 96  # 120 training images, val_fraction 0.2
    assert summary["samples_seen"] == 3 * round(0.5 * n_train)
    out = project / "out"
    history = list(csv.DictReader((out / "history.csv").open()))
    assert [int(h["samples"]) for h in history] == [48, 48, 48]
    rounds = list(csv.DictReader((out / "rounds.csv").open()))
    assert [int(r["epoch"]) for r in rounds] == [0, 2] and all(int(r["selected"]) == 48 for r in rounds)
