"""Spot-adaptive distillation (distill.spots: adaptive): routing masks, the rescaling, who gets
which gradients, the always-distil policy equals the fixed method, resume, and a 1-epoch fit of
every feature method."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import FakeNet
from torch import nn

from kdcompress.config import RoutingConfig, TrainConfig
from kdcompress.methods import build_loss
from kdcompress.methods.kd import kl_per_sample
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.routing import SpotRouter, rows
from kdcompress.training.selection.full import FullData
from kdcompress.types import UserError

FEATURE_METHODS = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ft", "fsp", "nst", "crd"]


class HalfNet(FakeNet):
    """Its stem halves the input: every map is half the teacher's size (the adapters resize)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.stem = nn.AvgPool2d(2)


def batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def make(name: str, cfg: RoutingConfig = RoutingConfig(init="distil"), student=None, x=None):
    """A fixed-spot distiller and an adaptive twin with identical student, teacher and loss modules."""
    torch.manual_seed(0)
    student = student or HalfNet(num_classes=4, in_channels=1, width=4)
    teacher = FakeNet(num_classes=4, in_channels=1, width=8)
    fixed = Distiller(student, teacher, build_loss(name))
    fixed.setup(batch()[0] if x is None else x)
    adaptive = Distiller(copy.deepcopy(student), teacher, copy.deepcopy(fixed.loss),
                         router=SpotRouter(fixed.loss, cfg))
    adaptive.setup(batch()[0] if x is None else x)
    for d in (fixed, adaptive):
        d.train()
        d.on_epoch_start(0, 1)
    for group in adaptive.auxiliary_param_groups():
        group["lr"] = 0.1
    return fixed, adaptive


def force(router: SpotRouter, distil: bool = True) -> None:
    """A policy that always (or never) distils, whatever the Gumbel noise."""
    with torch.no_grad():
        router.policy.weight.zero_()
        router.policy.bias[0::2] = 1e4 if distil else -1e4
        router.policy.bias[1::2] = 0.0


def outputs(d: Distiller, x):
    return d.student.extract(x), d.teacher_output(x, None)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_always_distil_policy_gives_the_fixed_methods_loss(name):
    fixed, adaptive = make(name)
    force(adaptive.router)
    x, y = batch()
    expected = fixed(x, y)
    got = adaptive(x, y)
    assert torch.allclose(got.per_sample, expected.per_sample, rtol=1e-5, atol=1e-6)
    assert adaptive.router.routed.tolist() == [len(y)] * len(adaptive.router.names)


def test_logit_weight_adds_kd_gated_by_the_output_spot():
    fixed, adaptive = make("at", RoutingConfig(init="distil", logit_weight=0.7, logit_temperature=3.0))
    force(adaptive.router)
    x, y = batch()
    s, t = outputs(fixed, x)
    expected = fixed(x, y).per_sample + 0.7 * kl_per_sample(s.logits, t.logits, 3.0).detach()
    assert torch.allclose(adaptive(x, y).per_sample, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["at", "vid"])
def test_masks_gate_exactly_the_selected_samples_per_sample_terms(name):
    _, d = make(name)
    x, y = batch()
    s, t = outputs(d, x)
    mask = torch.zeros(len(y), len(d.router.names), dtype=torch.bool)
    mask[[1, 4, 7], 0] = True
    mask[[2, 4], 1] = True
    kd = d.router.gated(d.loss, s, t, y, mask)
    # the term of each spot counts exactly on its routed rows; the batch mean is (routed sum) / B,
    # i.e. the mean over the routed samples rescaled by their fraction
    terms = [d.loss.spot_loss(n, s, t, y) for n in d.router.spots]
    expected = sum(mask[:, k] * terms[k] for k in range(len(terms)))
    assert torch.allclose(kd, expected)
    assert torch.allclose(kd.mean(), terms[0][[1, 4, 7]].mean() * 3 / 12 + terms[1][[2, 4]].mean() * 2 / 12)
    first = mask.clone()
    first[:, 1:] = False  # (deeper spots reach stage1 through BN, which mixes the batch)
    grad = torch.autograd.grad(d.router.gated(d.loss, s, t, y, first).sum(), s.features["stage1"])[0]
    assert (grad.flatten(1).abs().sum(1) > 0).tolist() == [i in (1, 4, 7) for i in range(len(y))]


@pytest.mark.parametrize("name", ["rkd", "sp"])
def test_batch_level_terms_run_on_the_routed_rows_and_scale_by_their_fraction(name):
    _, d = make(name)
    x, y = batch()
    s, t = outputs(d, x)
    mask = torch.zeros(len(y), 2, dtype=torch.bool)
    chosen = torch.tensor([0, 3, 5, 9])
    mask[chosen, 0] = True
    kd = d.router.gated(d.loss, s, t, y, mask)
    term = d.loss.spot_loss(d.router.spots[0], rows(s, chosen), rows(t, chosen), y[chosen])[0]
    assert torch.allclose(kd, term.expand(len(y)) * 4 / 12)
    grad = torch.autograd.grad(kd.sum(), s.embedding if name != "sp" else s.features["stage3"])[0]
    assert (grad.flatten(1).abs().sum(1) > 0).tolist() == [i in chosen.tolist() for i in range(len(y))]
    one = torch.zeros_like(mask)
    one[2, 0] = True  # a relation needs two samples: a lone routed sample adds nothing
    assert d.router.gated(d.loss, s, t, y, one).abs().sum() == 0


def test_crd_term_sees_only_the_routed_samples_as_negatives():
    _, d = make("crd")
    d.loss.eval()  # no enqueue: both evaluations see the same (empty) queue
    x, y = batch()
    s, t = outputs(d, x)
    mask = torch.zeros(len(y), 2, dtype=torch.bool)
    chosen = torch.tensor([1, 2, 8])
    mask[chosen, 0] = True
    kd = d.router.gated(d.loss, s, t, y, mask)
    expected = torch.zeros(len(y))
    expected[chosen] = d.loss.spot_loss("embedding", rows(s, chosen), rows(t, chosen), y[chosen])
    assert torch.allclose(kd, expected)
    assert not torch.allclose(kd[chosen], d.loss(s, t, y)[chosen])  # not the full batch's negatives


def test_never_distil_leaves_only_cross_entropy():
    fixed, adaptive = make("at")
    force(adaptive.router, distil=False)
    x, y = batch()
    out = adaptive(x, y)
    ce = torch.nn.functional.cross_entropy(adaptive.student.extract(x).logits, y, reduction="none")
    assert torch.allclose(out.per_sample, adaptive.ce_weight * ce.detach())


@pytest.mark.parametrize("name", ["at", "rkd"])
def test_policy_learns_from_the_graft_only_and_the_student_gets_nothing_from_it(name):
    _, d = make(name)
    x, y = batch()
    before = {k: v.clone() for k, v in d.router.state_dict().items() if isinstance(v, torch.Tensor)}
    out = d(x, y)  # runs one policy step on the grafted forward
    assert all(p.grad is None for p in d.student.parameters())  # nothing from the graft reached the student
    assert all(p.grad is None for p in d.teacher.parameters())
    changed = [k for k, v in d.router.state_dict().items() if isinstance(v, torch.Tensor)
               and k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("policy") for k in changed) and any(k.startswith("hints") for k in changed)
    for p in d.router.parameters():
        p.grad = None
    out.loss.backward()
    assert all(p.grad is None for p in d.router.parameters())  # the student's loss never trains the router
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.requires_grad for p in d.router.parameters())
    assert not set(map(id, d.router.parameters())) & set(map(id, d.trainable_parameters()))


def test_graft_mixes_per_sample_and_the_penalty_pushes_the_output_to_the_teacher():
    _, d = make("at")
    x, y = batch()
    s, t = outputs(d, x)
    d.student.eval()
    ones = torch.ones(len(y), len(d.router.names))
    with torch.no_grad():
        assert torch.allclose(d.router.graft(d.student, d.teacher, s, t, ones), t.logits, atol=1e-5)
        zeros = torch.zeros_like(ones)
        mixed = ones.clone()
        mixed[:6] = 0
        graft = d.router.graft(d.student, d.teacher, s, t, mixed)
        alone = d.router.graft(d.student, d.teacher, s, t, zeros)
    assert torch.allclose(graft[6:], t.logits[6:], atol=1e-5)  # each row follows its own route
    assert torch.allclose(graft[:6], alone[:6], atol=1e-5)
    force(d.router, distil=False)  # nobody to the teacher: the penalty raises the output's distil logit
    d.student.train()
    bias = d.router.policy.bias.detach().clone()
    d(x, y)
    assert d.router.policy.bias[-2] > bias[-2]


def test_router_state_round_trips_for_resume():
    _, d = make("vid")
    x, y = batch()
    d(x, y)
    d(x, y)
    state = copy.deepcopy(d.router.state_dict())
    _, fresh = make("vid")
    fresh.router.load_state_dict(state)
    for k, v in d.router.state_dict().items():
        assert k not in ("_extra_state",) and torch.equal(v, fresh.router.state_dict()[k]) or k == "_extra_state"
    momentum = [fresh.router.optimizer.state[p]["momentum_buffer"] for p in fresh.router.parameters()]
    expected = [d.router.optimizer.state[p]["momentum_buffer"] for p in d.router.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected))
    torch.manual_seed(3)
    a = d.router.actions(*outputs(d, x))
    torch.manual_seed(3)
    assert torch.equal(a, fresh.router.actions(*outputs(fresh, x)))


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_one_epoch_adaptive_fit_of_every_feature_method(name, tiny_loaders):
    train, val = tiny_loaders
    torch.manual_seed(0)
    loss = build_loss(name)
    d = Distiller(FakeNet(width=4), FakeNet(width=8), loss, router=SpotRouter(loss, RoutingConfig()))
    result = fit(d, train, val, FullData(len(train)), TrainConfig(epochs=1, batch_size=16))
    h = result.history[0]
    assert math.isfinite(h["train_loss"]) and 0 <= h["graft_val_acc"] <= 1
    assert [k for k in h if k.startswith("routed_")] == [f"routed_{n}" for n in d.router.names]
    assert all(0 <= h[f"routed_{n}"] <= 1 for n in d.router.names)
    assert set(result.best_state) == set(d.student.state_dict())  # nothing of the router is exported
    assert result.last_state["router"]


def test_resumed_adaptive_fit_is_bitwise_identical(tiny_loaders):
    train, val = tiny_loaders
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05)

    def run():
        torch.manual_seed(0)
        loss = build_loss("at")
        return Distiller(FakeNet(width=4), FakeNet(width=8), loss, router=SpotRouter(loss, RoutingConfig()))

    full = fit(run(), train, val, FullData(len(train)), cfg)
    saved = []
    cut = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    try:
        fit(run(), train, val, FullData(len(train)), cut, checkpoint=lambda s: saved.append(s) or 1 / 0)
    except ZeroDivisionError:
        pass
    torch.manual_seed(99)
    resumed = fit(run(), train, val, FullData(len(train)), cfg, resume=saved[0])
    for part in ("student", "router"):
        for k, v in full.last_state[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, resumed.last_state[part][k]), (part, k)
    assert full.history[-1]["routed_output"] == resumed.history[-1]["routed_output"]


def test_methods_without_spots_are_refused_in_one_line():
    for name in ("kd", "dkd", "dml", "data_free"):
        with pytest.raises(UserError, match=r"distill.spots: 'adaptive' .* has none; allowed: fixed"):
            SpotRouter(build_loss(name), RoutingConfig())


def test_spot_the_model_cannot_graft_at_is_refused():
    loss = build_loss("at", {"spots": "stage1,stage2"})
    d = Distiller(FakeNet(width=4), FakeNet(width=8), loss, router=SpotRouter(loss, RoutingConfig()))
    d.setup(batch()[0])
    assert d.router.spots == ("stage1", "stage2")
    assert d.router.policy.out_features == 6  # two logits per spot and for the output
    loss = build_loss("at")

    class TwoStages(FakeNet):
        def __init__(self, width):
            super().__init__(width=width)
            del self.stages["stage3"]
            self.head = nn.Linear(2 * width, 4)

    # the method reads stage3 of the teacher only; the graft also needs it in the student
    loss.setup = lambda s, t: None
    with pytest.raises(UserError, match="the student has no 'stage3'; allowed spots: stage1, stage2, embedding"):
        Distiller(TwoStages(4), FakeNet(width=8), loss, router=SpotRouter(loss, RoutingConfig())).setup(batch()[0])


def test_adaptive_spots_compose_with_sakd(tiny_loaders):
    from kdcompress.config import SAKDConfig
    from kdcompress.training.selection.sakd import SAKDSelector

    train, val = tiny_loaders
    torch.manual_seed(0)
    loss = build_loss("vid")
    d = Distiller(FakeNet(width=4), FakeNet(width=8), loss, router=SpotRouter(loss, RoutingConfig()))
    selector = SAKDSelector(SAKDConfig(ratio=0.5, interval=1, patch_size=4), d, train, epochs=2, seed=0)
    result = fit(d, train, val, selector, TrainConfig(epochs=2, batch_size=16))
    assert [h["samples"] for h in result.history] == [32, 32]  # half the training set per epoch
    assert all(math.isfinite(h["train_loss"]) and "routed_output" in h for h in result.history)
    assert len(selector.history) == 2


def test_routing_grafts_torchvision_models_stage_by_stage():
    from models import create_model

    torch.manual_seed(0)
    teacher, student = create_model("tv:resnet18", 4, 1), create_model("tv:mobilenet_v3_small", 4, 1)
    loss = build_loss("at", {"spots": "stage2,stage3,stage4"})
    d = Distiller(student, teacher, loss, router=SpotRouter(loss, RoutingConfig()))
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, 4, (6,))
    d.setup(x)
    d.train()
    d.on_epoch_start(0, 1)
    for group in d.auxiliary_param_groups():
        group["lr"] = 0.1
    policy = d.router.policy.weight.detach().clone()
    d(x, y).loss.backward()
    assert not torch.equal(policy, d.router.policy.weight)  # the graft ran through both torchvision nets
    s, t = outputs(d, x)
    d.student.eval()
    with torch.no_grad():  # all to the teacher: the graft is the teacher
        assert torch.allclose(d.router.graft(student, teacher, s, t, torch.ones(6, 4)), t.logits, atol=1e-4)


def test_policy_start_follows_the_pair_like_the_authors_configs():
    from models import create_model

    def started(teacher_arch, student_arch, init="auto"):
        teacher, student = create_model(teacher_arch, 4, 1), create_model(student_arch, 4, 1)
        loss = build_loss("rkd")
        d = Distiller(student, teacher, loss, router=SpotRouter(loss, RoutingConfig(init=init)))
        d.setup(torch.randn(4, 1, 16, 16))
        return d.router.init, d.router.policy.bias.detach()

    init, bias = started("resnet56", "resnet20")  # one family: distil everywhere at first
    assert init == "distil" and (bias[0::2] - bias[1::2] > 8).all()
    init, bias = started("resnet20", "mobilenet:16")  # across families: even odds
    assert init == "even" and (bias[0::2] - bias[1::2]).abs().max() < 2
    assert started("resnet20", "mobilenet:16", "distil")[0] == "distil"
    assert started("resnet20", "resnet32", "even")[0] == "even"
