"""The teacher-output cache: a second run reads the teacher's outputs from disk and trains the
student to exactly the same weights as a live teacher, also when another method filled it;
partial (SAKD) fills, damage and the cap."""

from __future__ import annotations

import pytest
import torch
from conftest import FakeNet

from kdcompress.config import TrainConfig
from kdcompress.methods import build_loss
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData
from kdcompress.training.teacher_cache import TeacherCache
from kdcompress.types import ModelOutput

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=1, hflip=True)


class CountingNet(FakeNet):
    calls = 0

    def extract(self, x):
        CountingNet.calls += 1
        return super().extract(x)


def run(method, train, val, cache_root=None):
    seed_everything(0)
    loss = build_loss(method)
    d = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), CountingNet(width=8), loss)
    if cache_root is not None:
        d.cache = TeacherCache(cache_root, "k", len(train), loss.teacher_parts())
    CountingNet.calls = 0
    result = fit(d, train, val, FullData(len(train)), CFG)
    return result, CountingNet.calls, d.cache


@pytest.mark.parametrize("method", ["kd", "dkd", "rkd", "crd"])
def test_a_cache_hit_trains_exactly_like_the_live_teacher(method, tiny_loaders, tmp_path):
    train, val = tiny_loaders
    live, live_calls, _ = run(method, train, val)
    first, first_calls, cache = run(method, train, val, tmp_path)
    assert first_calls == live_calls and cache.hits == 0 and "miss" in cache.summary()
    second, second_calls, cache = run(method, train, val, tmp_path)
    assert second_calls == 1  # only setup's probe batch: every training batch came from the cache
    assert cache.misses == 0 and cache.hits == CFG.epochs * len(train) and "hit" in cache.summary()
    for result in (first, second):
        assert all(torch.equal(v, result.last_state["student"][k]) for k, v in live.last_state["student"].items())
    assert cache.cached_epochs() == CFG.epochs


def test_one_fill_serves_logit_and_embedding_methods(tiny_loaders, tmp_path):
    train, val = tiny_loaders
    live, _, _ = run("rkd", train, val)
    run("kd", train, val, tmp_path)  # a logit method fills the entry ...
    shared, calls, cache = run("rkd", train, val, tmp_path)  # ... and an embedding method reads it
    assert calls == 1 and cache.misses == 0
    assert all(torch.equal(v, shared.last_state["student"][k]) for k, v in live.last_state["student"].items())


def test_feature_map_methods_and_teacherless_ones_keep_the_live_teacher():
    assert not TeacherCache.usable(build_loss("at").teacher_parts())
    assert not TeacherCache.usable(build_loss("data_free").teacher_parts())
    assert not TeacherCache.usable(build_loss("dml").teacher_parts())
    assert TeacherCache.usable(build_loss("kd").teacher_parts())
    assert TeacherCache.usable(build_loss("pkt").teacher_parts())


def test_partial_fills_damage_and_the_size_cap(tmp_path):
    out = ModelOutput(logits=torch.arange(12.0).view(3, 4))
    cache = TeacherCache(tmp_path, "a", 10, frozenset({"logits"}))
    cache.begin_epoch(0)
    cache.store(torch.tensor([1, 4, 7]), out)
    cache.end_epoch()
    cache.begin_epoch(0)
    assert torch.equal(cache.lookup(torch.tensor([7, 1])).logits, out.logits[[2, 0]])
    assert cache.lookup(torch.tensor([1, 2])) is None  # sample 2 was never stored: ask the teacher
    cache.path(0).write_bytes(b"damaged")
    cache.begin_epoch(0)
    assert cache.lookup(torch.tensor([1])) is None

    big = TeacherCache(tmp_path, "b", 1000, frozenset({"logits"}), max_bytes=10_000)
    big.begin_epoch(0)
    big.store(torch.arange(1000), ModelOutput(logits=torch.zeros(1000, 4)))
    big.end_epoch()  # 16 kB > 10 kB: the older key goes, the one in use stays
    assert not (tmp_path / "a").exists() and big.path(0).exists()


def test_sakd_first_round_reads_the_clean_pass_from_the_cache(tiny_loaders, tmp_path):
    from kdcompress.config import SAKDConfig
    from kdcompress.training.selection.sakd import SAKDSelector

    train, _ = tiny_loaders
    rounds = []
    for _ in range(2):
        seed_everything(0)
        d = Distiller(FakeNet(num_classes=4, in_channels=1, width=4), CountingNet(width=8), build_loss("kd"))
        cache = TeacherCache(tmp_path, "clean", len(train), frozenset({"logits", "embedding"}))
        sel = SAKDSelector(SAKDConfig(ratio=0.5, interval=2, patch_size=4), d, train, epochs=4, clean_cache=cache)
        CountingNet.calls = 0
        sel.select(0)  # beta_raw = 0: nothing is interrupted
        first = CountingNet.calls
        sel.select(2)  # interrupted images: always the live teacher
        rounds.append((first, CountingNet.calls - first, sel.selection.clone(), sel.alpha.clone(), cache.hits))
    (calls_a, later_a, sel_a, alpha_a, hits_a), (calls_b, later_b, sel_b, alpha_b, hits_b) = rounds
    assert calls_a == train.num_batches() and hits_a == 0
    assert calls_b == 0 and hits_b == len(train)  # the second run's clean pass never ran the teacher
    assert later_a == later_b == train.num_batches()
    assert torch.equal(sel_a, sel_b) and torch.equal(alpha_a, alpha_b)
