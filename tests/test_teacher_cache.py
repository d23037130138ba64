"""The teacher-output cache: a second run reads the teacher's outputs from disk and trains the
student to exactly the same weights as a live teacher, also when another method filled it;
partial (SAKD) fills, damage and the cap; the key takes every input that can change a teacher
output and nothing else; runs side by side never break each other's entries."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import onnxruntime
import pytest
import torch
from conftest import ROOT, FakeNet

from kdcompress.config import BaseConfig, DistillConfig, QuantizeConfig, SAKDConfig, TrainConfig
from kdcompress.data.transforms import Geometry
from kdcompress.methods import build_loss
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.ort_teacher import OrtTeacher
from kdcompress.training.selection import FullData
from kdcompress.training.student import teacher_caches
from kdcompress.training.teacher_cache import EVICTED, TeacherCache, cache_key, for_run
from kdcompress.types import ModelOutput, UserError

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


def test_partial_fills_and_damage(tmp_path):
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


def fill(cache: TeacherCache, epoch: int = 0) -> TeacherCache:
    cache.begin_epoch(epoch)
    cache.store(torch.arange(cache.num_samples), ModelOutput(logits=torch.zeros(cache.num_samples, 4)))
    cache.end_epoch()
    return cache


def test_the_cap_evicts_the_least_recently_used_key_never_one_in_use(tmp_path):
    ended = fill(TeacherCache(tmp_path, "ended", 100, frozenset({"logits"})))
    ended.close()  # that run finished
    running = fill(TeacherCache(tmp_path, "running", 100, frozenset({"logits"})))  # another run, mid-sweep
    (tmp_path / f"{EVICTED}gone-1234").mkdir()  # left by an evictor killed while deleting
    os.utime(tmp_path / "running", (0, 0))  # the least recently used key of all
    big = fill(TeacherCache(tmp_path, "big", 1000, frozenset({"logits"}), max_bytes=10_000))  # 16 kB > 10 kB
    assert not (tmp_path / "ended").exists() and not (tmp_path / f"{EVICTED}gone-1234").exists()
    assert running.path(0).exists() and big.path(0).exists()  # in use (and over the cap): kept
    running.close()
    fill(big, 1)
    assert not (tmp_path / "running").exists() and big.path(1).exists()
    again = fill(TeacherCache(tmp_path, "running", 100, frozenset({"logits"})))  # a key may come back
    assert again.cached_epochs() == 1


def test_a_bad_cap_or_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCOMPRESS_CACHE_GB", "four")
    with pytest.raises(UserError, match=r"^KDCOMPRESS_CACHE_GB: 'four' is not a size in gigabytes; allowed: a number"):
        TeacherCache(tmp_path, "k", 10, frozenset({"logits"}))
    assert not (tmp_path / "k").exists()
    monkeypatch.delenv("KDCOMPRESS_CACHE_GB")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="the teacher cache cannot be written there"):
        TeacherCache(tmp_path / "file", "k", 10, frozenset({"logits"}))


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


# ---------------------------------------------------------------- the key


class OtherNet(FakeNet):
    """FakeNet's modules, and code in another file: what an edit of the teacher's architecture looks like."""


INT8 = {"samples": 512, "method": "minmax", "per_channel": True, "seed": 0, "batch_size": 64}
OTHER_INT8 = {"samples": 64, "method": "entropy", "per_channel": False, "seed": 1, "batch_size": 32}
VIEW = {"autocast": "fp32", "seed": 0, "crop_padding": 1, "hflip": True}


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """A teacher checkpoint and a prepared data folder (their bytes are all the key reads of them)."""
    monkeypatch.setenv("KDCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "teacher.pt").write_bytes(b"teacher weights")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.pt").write_bytes(b"training images")
    write_meta(tmp_path, mean=[0.5])
    return tmp_path


def write_meta(folder: Path, mean: list[float], **geometry) -> None:
    meta = {"classes": ["a", "b"], "mean": mean, "std": [0.25], "input_shape": [1, 8, 8], "source": "test",
            "geometry": {**Geometry().as_dict(), **geometry}}
    (folder / "data" / "meta.json").write_text(json.dumps(meta))


def key_of(folder: Path, teacher: torch.nn.Module | None = None, **view) -> str:
    cache = for_run(folder / "teacher.pt", folder / "data", teacher if teacher is not None else FakeNet(),
                    torch.device("cpu"), 8, frozenset({"logits"}), **{**VIEW, **view})
    return cache.folder.name


CHANGES = {  # one input of the teacher's outputs each: (files, monkeypatch) -> for_run's arguments after it changed
    "teacher bytes": lambda d, m: (d / "teacher.pt").write_bytes(b"other weights") and {},
    "teacher code": lambda d, m: {"teacher": OtherNet()},
    "data bytes": lambda d, m: (d / "data" / "train.pt").write_bytes(b"other images") and {},
    "normalisation": lambda d, m: write_meta(d, mean=[0.4]) or {},
    "evaluation crop": lambda d, m: write_meta(d, mean=[0.5], crop_fraction=0.875) or {},
    "training transform": lambda d, m: write_meta(d, mean=[0.5], train_transform="random_resized_crop") or {},
    "crop scale": lambda d, m: write_meta(d, mean=[0.5], crop_scale=0.5) or {},
    "seed": lambda d, m: {"seed": 1},
    "crop padding": lambda d, m: {"crop_padding": 2},
    "flip": lambda d, m: {"hflip": False},
    "precision": lambda d, m: {"autocast": "bf16"},
    "torch version": lambda d, m: m.setattr(torch, "__version__", "0.0.1") or {},
    "hardware": lambda d, m: m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO_AVX") or {},
    "runtime": lambda d, m: {"teacher": OrtTeacher(FakeNet(), [1, 8, 8])},
    "int8 teacher": lambda d, m: {"int8": INT8},
}


@pytest.mark.parametrize("change", CHANGES)
def test_every_input_of_the_teacher_outputs_changes_the_key(run_files, monkeypatch, change):
    before = key_of(run_files)
    assert key_of(run_files) == before  # the same inputs: the same key
    assert key_of(run_files, **CHANGES[change](run_files, monkeypatch)) != before


@pytest.mark.parametrize("setting", sorted(INT8))
def test_every_int8_calibration_setting_changes_the_key(run_files, setting):
    changed = {**INT8, setting: OTHER_INT8[setting]}
    clean = {"seed": None, "crop_padding": 0, "hflip": False}
    assert key_of(run_files, **clean, int8=changed) != key_of(run_files, **clean, int8=INT8)


def test_the_onnxruntime_teacher_keys_its_versions_and_opset_and_not_autocast(run_files, monkeypatch):
    teacher = OrtTeacher(FakeNet(), [1, 8, 8])
    before = key_of(run_files, teacher)
    assert key_of(run_files, teacher, autocast="bf16") == before  # onnxruntime runs fp32 under autocast too
    assert key_of(run_files, OrtTeacher(FakeNet(), [1, 8, 8], opset=20)) != before  # the graph's opset
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert key_of(run_files, teacher) != before


def test_the_seed_of_un_augmented_images_is_not_in_the_key(run_files):
    assert key_of(run_files, seed=0, crop_padding=0, hflip=False) == key_of(run_files, seed=1, crop_padding=0,
                                                                            hflip=False)


def test_the_key_has_no_other_fields():
    base = {"teacher": "t", "model_code": "c", "data": "d", "normalisation": {"mean": [0.5], "std": [0.25]},
            "geometry": Geometry().as_dict(), "seed": 0, "augmentation": {"crop_padding": 1, "hflip": True},
            "runtime": "torch", "versions": {"torch": "2"}, "device": "cpu AVX2", "precision": "fp32", "int8": None}
    assert len({cache_key(**{**base, name: "other"}) for name in base} | {cache_key(**base)}) == len(base) + 1
    with pytest.raises(TypeError):
        cache_key(**base, student="resnet20")


def run_params(**sections) -> dict:
    params = {"base": BaseConfig(), "distill": DistillConfig(sampling="sakd"), "sakd": SAKDConfig(pass_teacher="int8"),
              "quantize": QuantizeConfig(), "methods": {"kd": {"temperature": 4.0}}}
    return {**params, **{name: dataclasses.replace(params[name], **kw) if name != "methods" else kw
                         for name, kw in sections.items()}}


def keys_of(folder: Path, params: dict) -> tuple[str, str]:
    paths = SimpleNamespace(teacher=folder / "teacher.pt", data=folder / "data")
    cache, clean = teacher_caches(params, paths, FakeNet(), torch.device("cpu"), 8, frozenset({"logits"}),
                                  params["distill"].precision)
    return cache.folder.name, clean.folder.name


@pytest.mark.parametrize("irrelevant", [
    {"distill": {"student": "tinycnn"}}, {"methods": {"kd": {"temperature": 8.0}}}, {"distill": {"lr": 0.3}},
    {"distill": {"epochs": 3}}, {"distill": {"batch_size": 32}}, {"distill": {"label_smoothing": 0.1}},
    {"distill": {"method": "dkd"}}, {"sakd": {"ratio": 0.2}}, {"quantize": {"max_drop": 2.0}},
])
def test_settings_that_cannot_change_a_teacher_output_leave_the_keys_alone(run_files, irrelevant):
    assert keys_of(run_files, run_params(**irrelevant)) == keys_of(run_files, run_params())


@pytest.mark.parametrize("relevant, changes", [
    ({"base": {"seed": 1}}, (True, True)),  # the augmentation's seed, and the int8 calibration sample's
    ({"distill": {"precision": "bf16"}}, (True, False)),  # the clean pass runs outside autocast
    ({"distill": {"crop_padding": 0}}, (True, False)),
    ({"quantize": {"samples": 64}}, (False, True)),
    ({"quantize": {"calibration": "entropy"}}, (False, True)),
    ({"sakd": {"pass_teacher": "same"}}, (False, True)),
])
def test_run_settings_of_the_teacher_outputs_change_their_keys(run_files, relevant, changes):
    before, after = keys_of(run_files, run_params()), keys_of(run_files, run_params(**relevant))
    assert tuple(a != b for a, b in zip(before, after)) == changes


# ---------------------------------------------------------------- runs side by side

RUN = """
import sys, time
from pathlib import Path
import torch
from kdcompress.training import teacher_cache
from kdcompress.types import ModelOutput

root, key, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
write = teacher_cache.atomic_write
def slow_write(path, content):  # long enough for the other run to write the same file meanwhile
    return write(path, lambda f: (time.sleep(0.1), content(f)))
teacher_cache.atomic_write = slow_write
cache = teacher_cache.TeacherCache(root, key, 100, frozenset({"logits"}), max_bytes=1)  # any other key is over the cap
(root / f"ready-{name}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
for epoch in range(3):
    cache.begin_epoch(epoch)
    cache.store(torch.arange(100), ModelOutput(logits=torch.full((100, 4), float(epoch))))
    cache.end_epoch()  # writes while the other run writes, and evicts every key it may
    time.sleep(0.05)
for epoch in range(3):
    cache.begin_epoch(epoch)
    assert torch.equal(cache.lookup(torch.arange(100)).logits, torch.full((100, 4), float(epoch)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("keys", [("same", "same"), ("one", "two")])
def test_two_runs_side_by_side_both_finish_with_valid_entries(tmp_path, keys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path), key, str(n)], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE, text=True) for n, key in enumerate(keys)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in range(2)) and time.monotonic() < deadline:
        time.sleep(0.02)
    (tmp_path / "go").touch()  # both start their epochs at once
    errors = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    for key in set(keys):
        cache = TeacherCache(tmp_path, key, 100, frozenset({"logits"}))
        for epoch in range(3):
            cache.begin_epoch(epoch)
            assert torch.equal(cache.lookup(torch.arange(100)).logits, torch.full((100, 4), float(epoch)))
    assert not list(tmp_path.rglob("*.tmp"))  # no run left a temporary file
