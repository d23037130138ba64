"""The KD method zoo: every registered method, through its own forward and through fit()."""

from __future__ import annotations

import copy
import importlib
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeNet

from kdcompress.config import TrainConfig
from kdcompress.methods import LOSSES, build_loss, method_defaults
from kdcompress.methods._features import match_spatial
from kdcompress.methods.dkd import dkd_terms
from kdcompress.methods.kd import kl_per_sample
from kdcompress.methods.schedule import scheduled_value
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.selection.full import FullData
from kdcompress.types import ModelOutput, UserError

METHODS = sorted(name for name in LOSSES if name != "ce")
# Methods whose loss is exactly zero when the student's outputs equal the teacher's (no learned
# adapters between them; FSP only while the channel counts agree, which they do here).
ZERO_WHEN_EQUAL = ["kd", "logit_l2", "fkd", "dkd", "at", "sp", "cc", "rkd", "pkt", "nst", "fsp"]


class HalfResNet(FakeNet):
    """FakeNet on a 2x average-pooled input: its maps are half the teacher's height and width."""

    def extract(self, x):
        return super().extract(F.avg_pool2d(x, 2))


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def make_distiller(name: str, student=None, teacher=None, params=None, ce_weight=0.0, kd_weight=1.0):
    torch.manual_seed(0)
    student = student if student is not None else HalfResNet(num_classes=4, in_channels=1, width=4)
    teacher = teacher if teacher is not None else FakeNet(num_classes=4, in_channels=1, width=8)
    loss = build_loss(name, params)
    return Distiller(student, teacher if loss.needs_teacher else None, loss, ce_weight=ce_weight, kd_weight=kd_weight)


def outputs(logits, features=None, embedding=None):
    return ModelOutput(torch.as_tensor(logits, dtype=torch.float32), features or {}, embedding)


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("name", METHODS)
def test_module_cites_its_paper(name):
    doc = importlib.import_module(LOSSES[name].__module__).__doc__ or ""
    assert re.search(r"\b(19|20)\d\d\b", doc), f"{name}: the module docstring should cite its paper (with a year)"


@pytest.mark.parametrize("name", METHODS)
def test_finite_student_grads_no_teacher_grads(name):
    """Different channels and spatial sizes (HalfResNet student vs FakeNet width 8 teacher)."""
    d = make_distiller(name)
    x, y = batch()
    d.setup(x)
    d.train()
    gen_before = None
    if name == "data_free":
        gen_before = [p.detach().clone() for p in d.loss.generator.parameters()]
    out = d(x, y)
    assert out.per_sample.shape == (len(x),) and torch.isfinite(out.per_sample).all()
    out.loss.backward()
    student_grads = [p.grad for p in d.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in student_grads)
    assert any(g.abs().sum() > 0 for g in student_grads)
    if d.teacher is not None:
        assert all(not p.requires_grad and p.grad is None for p in d.teacher.parameters())
    if name == "data_free":  # the generator is stepped by its own optimizer inside prepare_batch
        assert any(not torch.equal(a, b) for a, b in zip(gen_before, d.loss.generator.parameters()))
        assert all(p.grad is None for p in d.loss.generator.parameters())
        return
    own = [(n, p) for n, p in d.loss.named_parameters() if p.requires_grad]
    missing = [n for n, p in own if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: loss parameters without a finite gradient: {missing}"
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for _, p in own)
    if d.teacher is not None:
        assert not any(id(p) in trainable for p in d.teacher.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_loss_shape_and_batch_level_broadcast(name):
    d = make_distiller(name)
    x, y = batch()
    d.setup(x)
    d.eval()
    with torch.no_grad():
        s = d.student.extract(x)
        value = d.loss(s, d.loss.teacher_forward(d.teacher, x), y)
    assert value.shape == (len(x),) and torch.isfinite(value).all()
    if d.loss.batch_level:
        assert torch.allclose(value, value[:1].expand_as(value))


@pytest.mark.parametrize("name", [m for m in METHODS if not LOSSES[m].batch_level and m != "crd"])
def test_per_sample_loss_does_not_depend_on_the_rest_of_the_batch(name):
    """(crd is per anchor but contrasts against the batch, by design.)"""
    d = make_distiller(name)
    x, y = batch()
    d.setup(x)
    d.eval()
    with torch.no_grad():
        full = d.loss(d.student.extract(x), d.loss.teacher_forward(d.teacher, x), y)
        half = d.loss(d.student.extract(x[:3]), d.loss.teacher_forward(d.teacher, x[:3]), y[:3])
    torch.testing.assert_close(full[:3], half, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ZERO_WHEN_EQUAL)
def test_zero_when_student_equals_teacher(name):
    torch.manual_seed(0)
    net = FakeNet(num_classes=4, in_channels=1, width=4).eval()
    x, y = batch()
    loss = build_loss(name)
    with torch.no_grad():
        out = net.extract(x)
        loss.setup(out, out)
        value = loss(out, copy.deepcopy(out), y)
    assert value.abs().max() < 1e-5


def test_online_ema_starts_equal_to_the_student():
    d = make_distiller("online_ema", student=FakeNet(width=4))
    x, y = batch()
    d.setup(x)
    d.eval()
    with torch.no_grad():
        assert d.loss(d.student.extract(x), d.loss.teacher_forward(None, x), y).abs().max() < 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_one_epoch_fit_and_resume_state(name, tiny_loaders):
    train, val = tiny_loaders
    torch.manual_seed(0)
    student = FakeNet(num_classes=4, in_channels=1, width=4)
    teacher = FakeNet(width=8)
    loss = build_loss(name)
    d = Distiller(student, teacher if loss.needs_teacher else None, loss, ce_weight=0.1, kd_weight=0.9)
    result = fit(d, train, val, FullData(len(train)), TrainConfig(epochs=1, batch_size=16))
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert set(result.best_state) == set(student.state_dict())  # the exported model is the student alone
    # The loss state (adapters, heads, queues, peers, EMA, generator) reloads into a fresh run.
    fresh = Distiller(FakeNet(width=4), FakeNet(width=8) if loss.needs_teacher else None, build_loss(name))
    fresh.setup(next(train.batches())[0])
    fresh.loss.load_state_dict(result.last_state["loss"])


# ---------------------------------------------------------------- golden values (by hand)


def test_kd_golden_values():
    # p_t = softmax([ln 3, 0]) = [3/4, 1/4], p_s = softmax([0, 0]) = [1/2, 1/2]
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # = 0.1308...
    student = outputs([[0.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0])
    t1 = build_loss("kd", {"temperature": 1.0})(student, outputs([[math.log(3), 0.0], [0.0, 0.0]]), y)
    torch.testing.assert_close(t1, torch.tensor([kl, 0.0]))
    # At T = 2, logits [2 ln 3, 0] soften to the same p_t; the T^2 factor gives 4 * kl.
    t2 = build_loss("kd", {"temperature": 2.0})(student, outputs([[2 * math.log(3), 0.0], [0.0, 0.0]]), y)
    torch.testing.assert_close(t2, torch.tensor([4 * kl, 0.0]))


def test_dkd_golden_values():
    t = 2.0
    student = outputs([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # p_s = [1/3, 1/3, 1/3]
    teacher = outputs([[2 * math.log(2), 0.0, 0.0],  # /T: [ln 2, 0, 0] -> p_t = [1/2, 1/4, 1/4]
                       [2 * math.log(2), 2 * math.log(3), 0.0]])  # /T: [ln 2, ln 3, 0] -> p_t = [2, 3, 1] / 6
    y = torch.tensor([0, 0])
    # Sample 0: b_t = [1/2, 1/2], b_s = [1/3, 2/3]; non-target p^_t = p^_s = [1/2, 1/2]
    tckd0 = t**2 * (0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3)))
    # Sample 1: b_t = [1/3, 2/3] = b_s; non-target p^_t = [3/4, 1/4], p^_s = [1/2, 1/2]
    nckd1 = t**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    loss = build_loss("dkd", {"temperature": t, "alpha": 1.0, "beta": 8.0})
    torch.testing.assert_close(loss(student, teacher, y), torch.tensor([tckd0, 8 * nckd1]))
    loss = build_loss("dkd", {"temperature": t, "alpha": 2.0, "beta": 0.5, "warmup": 4})
    loss.on_epoch_start(0, 10)  # warm-up weight (0 + 1) / 4
    torch.testing.assert_close(loss(student, teacher, y), torch.tensor([0.25 * 2 * tckd0, 0.25 * 0.5 * nckd1]))
    loss.on_epoch_start(5, 10)
    torch.testing.assert_close(loss(student, teacher, y), torch.tensor([2 * tckd0, 0.5 * nckd1]))


def test_dkd_reformulates_kd():
    """DKD paper, eq. (7): KD = TCKD + (1 - p_t[y]) * NCKD (checked against KD's own code)."""
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3, torch.randint(0, 5, (6,), generator=g)
    tckd, nckd = dkd_terms(s, t, y, 2.0)
    p_target = F.softmax(t / 2.0, dim=1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kl_per_sample(s, t, 2.0))


def test_fkd_weights_kd_by_the_students_label_confidence():
    # Student softmax at T = 1 of [ln 3, 0] is [3/4, 1/4]: p_target = 3/4 for y = 0, 1/4 for y = 1.
    student = outputs([[math.log(3), 0.0], [math.log(3), 0.0]])
    teacher = outputs([[0.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    kd = build_loss("kd", {"temperature": 1.0})(student, teacher, y)
    fkd = build_loss("fkd", {"temperature": 1.0, "gamma": 2.0})(student, teacher, y)
    torch.testing.assert_close(fkd, kd * torch.tensor([0.25**2, 0.75**2]))


def test_logit_l2_and_hard_kd_by_hand():
    student, teacher = outputs([[1.0, 3.0]]), outputs([[2.0, 0.0]])
    y = torch.tensor([1])
    torch.testing.assert_close(build_loss("logit_l2")(student, teacher, y), torch.tensor([(1 + 9) / 2]))
    # CE against the teacher's argmax (class 0) and against the label (class 1); log-sum-exp = log(e + e^3)
    lse = math.log(math.e + math.e**3)
    hard = build_loss("hard_kd", {"teacher_weight": 0.75})(student, teacher, y)
    torch.testing.assert_close(hard, torch.tensor([0.75 * (lse - 1.0) + 0.25 * (lse - 3.0)]))


# ---------------------------------------------------------------- temperature schedule


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [4.0, 4.0, 4.0]),
    ("linear", [4.0, 2.5, 1.0]),
    ("cosine", [4.0, 2.5, 1.0]),
])
def test_temperature_schedule_start_middle_end(schedule, expected):
    loss = build_loss("kd", {"temperature": 4.0, "t_schedule": schedule, "t_end": 1.0})
    values = []
    for epoch in (0, 2, 4):
        loss.on_epoch_start(epoch, 5)
        values.append(loss.temperature)
    assert values == pytest.approx(expected)


def test_cosine_schedule_off_the_midpoint():
    # epoch 1 of 5: progress 1/4 -> 1 + 3 * (1 + cos(pi / 4)) / 2
    assert scheduled_value("cosine", 4.0, 1.0, 1, 5) == pytest.approx(1 + 1.5 * (1 + math.sqrt(0.5)))
    assert scheduled_value("linear", 4.0, 1.0, 1, 5) == pytest.approx(3.25)
    assert scheduled_value("linear", 4.0, 1.0, 0, 1) == 4.0  # a single epoch stays at the start


@pytest.mark.parametrize("name", [m for m in METHODS if "t_schedule" in method_defaults(m)])
def test_every_temperature_method_takes_the_schedule(name):
    loss = build_loss(name, {"temperature": 3.0, "t_schedule": "linear", "t_end": 2.0})
    loss.on_epoch_start(9, 10)
    assert loss.temperature == pytest.approx(2.0)


# ---------------------------------------------------------------- parameters and errors


@pytest.mark.parametrize("name", METHODS)
def test_build_loss_rejects_unknown_key(name):
    with pytest.raises(UserError, match=rf"methods\.{name}\.no_such_key: unknown key"):
        build_loss(name, {"no_such_key": 1})


@pytest.mark.parametrize("name", [m for m in METHODS if method_defaults(m)])
def test_build_loss_rejects_wrong_type(name):
    key, default = next(iter(method_defaults(name).items()))
    wrong = 3 if isinstance(default, str) else "three"
    with pytest.raises(UserError, match=rf"methods\.{name}\.{key}: expected"):
        build_loss(name, {key: wrong})


@pytest.mark.parametrize("name, params, message", [
    ("kd", {"t_schedule": "exponential"}, r"methods\.kd\.t_schedule: .*allowed: constant, linear, cosine"),
    ("kd", {"temperature": 0.0}, r"methods\.kd\.temperature: .*out of range"),
    ("dkd", {"warmup": -1}, r"methods\.dkd\.warmup"),
    ("hard_kd", {"teacher_weight": 1.5}, r"methods\.hard_kd\.teacher_weight"),
    ("crd", {"mode": "bank"}, r"methods\.crd\.mode: .*allowed: queue, batch"),
    ("at", {"spots": "stage1,embedding"}, r"methods\.at\.spots: .*spatial feature maps"),
    ("fsp", {"spots": "stage2"}, r"methods\.fsp\.spots: expected at least 2"),
    ("rkd", {"spot": "stage2,stage3"}, r"methods\.rkd\.spot: expected one spot"),
    ("online_ema", {"decay": 1.5}, r"methods\.online_ema\.decay"),
])
def test_build_loss_rejects_bad_values(name, params, message):
    with pytest.raises(UserError, match=message):
        build_loss(name, params)


def test_unknown_spot_fails_at_setup_naming_what_exists():
    d = make_distiller("fitnet", params={"spots": "stage9"})
    expected = r"methods\.fitnet\.spots: .*'stage9'.*available: stage1, stage2, stage3, embedding"
    with pytest.raises(UserError, match=expected):
        d.setup(batch()[0])


def test_unknown_method():
    with pytest.raises(UserError, match="distill.method: unknown method 'nope'"):
        build_loss("nope")


# ---------------------------------------------------------------- method mechanics


def test_match_spatial_pools_the_larger_map():
    a = torch.arange(16.0).view(1, 1, 4, 4)
    b = torch.zeros(1, 3, 2, 2)
    pa, pb = match_spatial(a, b)
    assert pb is b
    torch.testing.assert_close(pa, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def test_feature_methods_build_adapters_for_channel_mismatch():
    d = make_distiller("fitnet", params={"spots": "stage1,embedding"})
    d.setup(batch()[0])
    assert d.loss.regressors["stage1"][0].in_channels == 4 and d.loss.regressors["stage1"][0].out_channels == 8
    assert d.loss.regressors["embedding"][0].in_channels == 16 and d.loss.regressors["embedding"][0].out_channels == 32


def test_crd_queue_fills_during_training_only():
    d = make_distiller("crd", params={"negatives": 12})
    x, y = batch()
    d.setup(x)
    d.train()
    d(x, y).loss.backward()
    assert int(d.loss.queue_len) == 8
    d(x, y).loss.backward()  # wraps around: the queue holds the last 12 embeddings
    assert int(d.loss.queue_len) == 12 and int(d.loss.queue_ptr) == 4
    d.eval()
    with torch.no_grad():
        d(x, y)
    assert int(d.loss.queue_ptr) == 4


def test_dml_peer_is_an_independent_trained_student():
    d = make_distiller("dml", student=FakeNet(width=4))
    x, y = batch()
    d.setup(x)
    d.train()
    peer = d.loss.peer
    assert peer is not d.student
    assert not torch.equal(peer.head.weight, d.student.head.weight)  # re-initialised
    d(x, y).loss.backward()
    assert all(p.grad is not None for p in peer.parameters())
    assert "peer.head.weight" in d.loss.state_dict() and not any("peer" in k for k in d.student.state_dict())


def test_online_ema_tracks_the_student():
    d = make_distiller("online_ema", student=FakeNet(width=4))
    ema = d.loss.ema
    assert not any(p.requires_grad for p in ema.parameters())
    d.train()
    assert not ema.training
    with torch.no_grad():
        d.student.head.weight.add_(1.0)
    d.after_step()  # step 0: a = 0, the EMA copies the student
    torch.testing.assert_close(ema.head.weight, d.student.head.weight)
    before = ema.head.weight.clone()
    with torch.no_grad():
        d.student.head.weight.add_(1.0)
    d.after_step()  # step 1: a = min(0.999, 1 - 1/2) = 0.5
    torch.testing.assert_close(ema.head.weight, 0.5 * before + 0.5 * d.student.head.weight)


def test_data_free_replaces_the_batch_with_teacher_labelled_synthetic_images():
    d = make_distiller("data_free", student=FakeNet(width=4))
    x, y = batch()
    d.setup(x)
    d.train()
    fake, labels = d.loss.prepare_batch(x, y)
    assert fake.shape == x.shape and not fake.requires_grad
    assert not torch.allclose(fake, x)
    cached = d.loss.teacher_forward(d.teacher, fake)  # served from the generator step
    with torch.no_grad():
        fresh = d.teacher.extract(fake)
    torch.testing.assert_close(cached.logits, fresh.logits)
    torch.testing.assert_close(labels, fresh.logits.argmax(1))
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.student.parameters())  # the generator step leaves no grads behind


@pytest.mark.parametrize("name", ["kd", "data_free"])
def test_step_reports_the_labels_it_trained_on(name):
    d = make_distiller(name, student=FakeNet(width=4))
    x, y = batch()
    d.setup(x)
    d.train()
    prepared = []
    prepare = d.loss.prepare_batch
    d.loss.prepare_batch = lambda *b: prepared.append(prepare(*b)) or prepared[-1]
    out = d(x, y)
    # kd trains on the batch's labels; data_free on the teacher's labels of its synthetic batch,
    # and train_acc must be measured against those
    assert torch.equal(out.target, prepared[0][1])
    assert torch.equal(out.target, y) == (name == "kd")


# ---------------------------------------------------------------- SAKD's per-sample strength alpha


@pytest.mark.parametrize("name", [m for m in METHODS if build_loss(m).selects_samples])
def test_alpha_one_half_is_exactly_the_base_method(name):
    """SAKD's loss 2[(1 - a) w_ce CE + a w_kd KD] with a = 0.5 equals w_ce CE + w_kd KD bit for bit."""
    x, y = batch(8)
    d = make_distiller(name, ce_weight=0.3, kd_weight=0.7)
    d.setup(x)
    d.eval()  # no dropout-like randomness between the two calls
    base = d(x, y).per_sample
    half = d(x, y, torch.full((8,), 0.5)).per_sample
    assert torch.equal(base, half)
    ce = F.cross_entropy(d.student(x), y, reduction="none")
    kd = (base - 0.3 * ce) / 0.7
    a = torch.linspace(0, 1, 8)  # other alphas shift weight between the two terms as the formula says
    kd_a = a.mean() if d.loss.batch_level else a
    assert torch.allclose(d(x, y, a).per_sample, 2 * ((1 - a) * 0.3 * ce + kd_a * 0.7 * kd), atol=1e-5, rtol=1e-4)
