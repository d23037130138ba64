"""SAKD selector: schedule, interruptions, bookkeeping of one round, resume, a fit() run, the rank
normalisation and the constant loss scale (our variants), and the cache of the interrupted passes."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import FakeNet

from kdcompress.common import distributed
from kdcompress.config import SAKDConfig, TrainConfig
from kdcompress.methods.kd import KD, kl_per_sample
from kdcompress.runtime import seed_everything
from kdcompress.training.distiller import Distiller, alpha_weights, constant_scale
from kdcompress.training.loop import fit
from kdcompress.training.selection import FullData
from kdcompress.training.selection.build import build_selector
from kdcompress.training.selection.interruptions import (
    _mix32,
    position_noise,
    sample_keys,
    spatial_dropout,
    spatial_shuffle,
)
from kdcompress.training.selection.sakd import SAKDSelector, beta_schedule, normalise
from kdcompress.training.teacher_cache import TeacherCache
from kdcompress.types import UserError


def make_selector(loader, epochs=4, seed=0, models=None, **cfg):
    torch.manual_seed(0)
    student, teacher = models if models is not None else (FakeNet(), FakeNet(width=8))
    distiller = Distiller(student, teacher, KD(4.0), ce_weight=0.1, kd_weight=0.9)
    base = {"ratio": 0.5, "interval": 1, "gamma": 0.5, "patch_size": 4, "loss_scale": "paper", "normalise": "minmax"}
    return SAKDSelector(SAKDConfig(**{**base, **cfg}), distiller, loader, epochs=epochs, temperature=4.0, seed=seed)


def test_beta_schedule():
    assert beta_schedule(0, 20, 0.9, 0.5) == (0.0, 0.0)
    raw, beta = beta_schedule(5, 20, 0.9, 0.5)
    assert raw == pytest.approx(1 - 0.75**0.9) and beta == raw
    raw, beta = beta_schedule(15, 20, 0.9, 0.5)
    assert raw == pytest.approx(1 - 0.25**0.9) and beta == 0.5
    assert beta_schedule(20, 20, 0.9, 0.5) == (1.0, 0.5)
    assert beta_schedule(10, 20, 1.0, 0.8) == pytest.approx((0.5, 0.5))


def test_spatial_dropout_zeroes_exact_count_on_all_channels():
    x = torch.rand(6, 3, 7, 9) + 0.1  # no zeros to start with
    keys = sample_keys(0, 1, torch.arange(6))
    out = spatial_dropout(x, 0.3, keys)
    zero = out == 0
    assert bool((zero.all(1) == zero.any(1)).all())  # a position is zero on every channel or none
    assert zero[:, 0].flatten(1).sum(1).tolist() == [math.floor(0.3 * 63)] * 6
    assert len({tuple(z.flatten().tolist()) for z in zero[:, 0]}) == 6  # a fresh mask per image
    kept = ~zero
    assert torch.equal(out[kept], x[kept])
    assert torch.equal(spatial_dropout(x, 0.0, keys), x)
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)  # per channel
    assert torch.equal(spatial_dropout(x, 0.3, keys, fill), torch.where(zero, fill, x))


@pytest.mark.parametrize("patch", [1, 2, 3])
def test_spatial_shuffle_is_a_permutation_of_positions(patch):
    x = torch.rand(4, 2, 6, 7)
    out = spatial_shuffle(x, patch, sample_keys(1, 3, torch.arange(4)))
    assert not torch.equal(out, x)
    for a, b in zip(x, out):
        pix_a = sorted(map(tuple, a.flatten(1).T.tolist()))  # pixels as channel tuples
        pix_b = sorted(map(tuple, b.flatten(1).T.tolist()))
        assert pix_a == pix_b
    gh, gw = 6 // patch * patch, 7 // patch * patch
    assert torch.equal(out[:, :, :, gw:], x[:, :, :, gw:]) and torch.equal(out[:, :, gh:], x[:, :, gh:])
    if patch > 1:  # whole patches move: every output patch is one of the input's patches
        def patches(t):
            return {tuple(t[:, i:i + patch, j:j + patch].flatten().tolist())
                    for i in range(0, gh, patch) for j in range(0, gw, patch)}
        for a, b in zip(x, out):
            assert patches(a) == patches(b)


def test_position_noise_is_counter_based():
    """32-bit values computed without int64 overflow; a row depends on its key only, and has no ties."""
    keys = torch.tensor([0, 1, 0xFFFFFFFF, 123456789])
    noise = position_noise(keys, 784)
    assert noise.dtype == torch.int64 and int(noise.min()) >= 0 and int(noise.max()) < 2**32
    edge = [0, 1, 2**31 - 1, 2**31, 0xFFFFFFFE, 0xFFFFFFFF, 0xDEADBEEF]
    assert _mix32(torch.tensor(edge)).tolist() == [_mix32(v) for v in edge]  # Python ints never overflow
    assert all(len(set(row.tolist())) == 784 for row in noise)
    assert torch.equal(position_noise(keys[[3, 1]], 784), noise[[3, 1]])
    assert torch.equal(position_noise(keys, 100), noise[:, :100])
    index = torch.arange(1000)
    a = sample_keys(0, 1, index)
    assert len(set(a.tolist())) == 1000 and torch.equal(sample_keys(0, 1, index.flip(0)), a.flip(0))
    assert not (a == sample_keys(0, 2, index)).any() and not (a == sample_keys(1, 1, index)).any()


@pytest.mark.parametrize("epoch", [1, 3])  # dropout, shuffle
def test_interruption_of_a_sample_depends_only_on_seed_round_and_index(tiny_loaders, epoch):
    """Whatever batch (or rank) a sample is in, the same mask; on normalised batches, exactly what the
    interruption of the raw [0, 1] images gives after the loader's normalisation."""
    train, _ = tiny_loaders

    def interruption(sel, epoch):
        return sel.interruption(epoch, *beta_schedule(epoch, sel.epochs, sel.cfg.theta, sel.cfg.eta))

    sel = make_selector(train, seed=5, patch_size=2)
    beta = beta_schedule(epoch, sel.epochs, sel.cfg.theta, sel.cfg.eta)[1]
    regime, transform = interruption(sel, epoch)
    assert regime == ("dropout" if epoch == 1 else "shuffle")
    x, _, idx = next(train.batches())
    out = transform(x, idx)
    assert not torch.equal(out, x)
    parts = [transform(x[i::3], idx[i::3]) for i in range(3)]  # other batches, other sizes
    for i, part in enumerate(parts):
        assert torch.equal(part, out[i::3])
    keys = sample_keys(5, epoch, idx)
    if regime == "dropout":
        raw = next(train.batches(transform=lambda r: spatial_dropout(r, beta, keys)))[0]
    else:
        raw = next(train.batches(transform=lambda r: spatial_shuffle(r, 2, keys)))[0]
    assert torch.equal(out, raw)
    assert not torch.equal(interruption(sel, epoch + 1)[1](x, idx), out)  # the next round
    assert not torch.equal(interruption(make_selector(train, seed=6, patch_size=2), epoch)[1](x, idx), out)


def test_round_bookkeeping(tiny_loaders):
    train, _ = tiny_loaders
    sel = make_selector(train)
    sel.distiller.train()
    k = round(0.5 * len(train))
    first = sel.select(0)
    assert len(first) == k and len(set(first.tolist())) == k
    assert sel.distiller.student.training and not sel.distiller.teacher.training
    assert sel.omega.sum().item() == k and set(sel.omega[first].tolist()) == {1}
    assert torch.equal(sel.select(0), first)  # a second call in the same epoch changes nothing
    assert sel.omega.sum().item() == k
    rec = sel.history[-1]
    assert rec["beta_raw"] == 0.0 and rec["regime"] == "dropout" and rec["selected"] == k
    assert sum(rec[f"class_{c}"] for c in range(4)) == k
    assert torch.bincount(train.labels[first], minlength=4).tolist() == [rec[f"class_{c}"] for c in range(4)]
    for key in ("round_seconds", "difficulty_seconds", "dpp_seconds", "epoch", "beta", "overlap_prev",
                "alpha_mean", "alpha_p10", "alpha_p50", "alpha_p90", "s_hat_mean", "s_hat_p10", "s_hat_p50",
                "s_hat_p90"):
        assert key in rec
    second = sel.select(1)
    assert sel.omega.sum().item() == 2 * k and sel.omega.max().item() <= 2
    both = set(first.tolist()) & set(second.tolist())
    assert sel.history[-1]["overlap_prev"] == pytest.approx(len(both) / k)
    assert sel.history[-1]["beta_raw"] == pytest.approx(1 - 0.75**0.9)


def test_first_round_alpha_is_s_hat_of_clean_kd_loss(tiny_loaders):
    train, _ = tiny_loaders
    sel = make_selector(train)
    sel.select(0)
    student, teacher = sel.distiller.student, sel.distiller.teacher
    student.eval()
    with torch.no_grad():
        loss = torch.cat([kl_per_sample(student(x), teacher(x), 4.0) for x, _, _ in train.batches()])
    s_hat = (loss - loss.min()) / (loss.max() - loss.min())  # omega = 0: p_i uniform
    assert torch.allclose(sel.s_hat, s_hat, atol=1e-5)
    assert torch.equal(sel.alpha, sel.s_hat)
    idx = torch.tensor([3, 0, 63, 7])
    w = sel.weights(idx)
    assert w.shape == (4,) and w.device == idx.device and w.dtype == torch.float32
    assert torch.equal(w, sel.alpha[idx])


def test_later_rounds_follow_the_update_rules(tiny_loaders, monkeypatch):
    """alpha momentum update, omega-weighted s, feature fusion (dropout) / keeping (shuffle)."""
    train, _ = tiny_loaders
    sel = make_selector(train, epochs=4, momentum=0.1, eps=1.0)
    n = len(train)
    g = torch.Generator().manual_seed(5)
    passes = [(torch.rand(n, generator=g) + 0.1, torch.randn(n, 3, generator=g)) for _ in range(3)]
    calls = []
    monkeypatch.setattr(sel, "difficulty_pass",
                        lambda transform, clean, epoch: calls.append(transform) or passes[len(calls) - 1])

    sel.select(0)
    alpha0 = sel.alpha.clone()
    assert torch.equal(sel.features, passes[0][1])
    omega = sel.omega.clone()
    sel.select(1)  # beta_raw = 1 - 0.75^0.9 < eta: dropout regime
    beta_raw = 1 - 0.75**0.9
    s = passes[1][0].double() / (omega.double() + 1.0)
    s = s / (1.0 / (omega.double() + 1.0)).sum()
    s_hat = ((s - s.min()) / (s.max() - s.min() + 1e-12)).float()
    assert torch.allclose(sel.s_hat, s_hat, atol=1e-6)
    assert torch.allclose(sel.alpha, 0.1 * alpha0 + 0.9 * beta_raw * s_hat, atol=1e-6)
    assert torch.allclose(sel.features, 0.1 * passes[0][1] + 0.9 * passes[1][1])
    fused = sel.features.clone()
    sel.select(3)  # beta_raw = 1 - 0.25^0.9 > eta: shuffle regime, features unchanged
    assert sel.history[-1]["regime"] == "shuffle" and sel.history[-1]["beta"] == 0.5
    assert torch.equal(sel.features, fused)
    assert sel.omega.sum().item() == 3 * sel.k


@pytest.mark.parametrize("rate", ["beta", "one"])
def test_alpha_rate_choices(tiny_loaders, monkeypatch, rate):
    """The rate in alpha = lambda alpha + (1 - lambda) rate s_hat: beta (capped at eta) or 1."""
    train, _ = tiny_loaders
    sel = make_selector(train, epochs=4, momentum=0.1, eps=1.0, alpha_rate=rate, eta=0.2)
    n = len(train)
    g = torch.Generator().manual_seed(5)
    passes = [(torch.rand(n, generator=g) + 0.1, torch.randn(n, 3, generator=g)) for _ in range(2)]
    monkeypatch.setattr(sel, "difficulty_pass", lambda transform, clean, epoch: passes.pop(0))
    sel.select(0)
    alpha0 = sel.alpha.clone()
    sel.select(1)  # beta_raw = 1 - 0.75^0.9 = 0.228 > eta = 0.2: beta = 0.2
    expected = {"beta": 0.2, "one": 1.0}[rate]
    torch.testing.assert_close(sel.alpha, 0.1 * alpha0 + 0.9 * expected * sel.s_hat, atol=1e-6, rtol=1e-5)


def test_select_runs_rounds_every_interval(tiny_loaders):
    train, _ = tiny_loaders
    sel = make_selector(train, epochs=6, interval=3)
    subsets = [sel.select(e) for e in range(6)]
    assert [h["epoch"] for h in sel.history] == [0, 3]
    assert torch.equal(subsets[0], subsets[2]) and torch.equal(subsets[3], subsets[5])


def test_state_dict_round_trip_gives_the_same_next_selection(tiny_loaders):
    train, _ = tiny_loaders
    a = make_selector(train, seed=3)
    a.select(0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = make_selector(train, seed=99, models=(a.distiller.student, a.distiller.teacher))
    b.load_state_dict(state)
    next_a, next_b = a.select(1), b.select(1)  # dropout round: its masks use the restored seed
    assert a.history[-1]["beta"] > 0
    assert torch.equal(next_a, next_b)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.omega, b.omega) and torch.equal(a.features, b.features)
    assert len(b.history) == 2


def test_fit_trains_only_on_the_selection(tiny_loaders):
    train, val = tiny_loaders
    torch.manual_seed(0)
    teacher, student = FakeNet(width=8), FakeNet()
    distiller = Distiller(student, teacher, KD(4.0), ce_weight=0.1, kd_weight=0.9)
    sakd_cfg = SAKDConfig(ratio=0.5, interval=1, patch_size=4)
    sel = SAKDSelector(sakd_cfg, distiller, train, epochs=3, temperature=4.0, seed=0)
    seen: list[tuple[set, set]] = []
    observe = sel.observe

    def spy(index, per_sample):
        seen.append((set(index.tolist()), set(sel.selection.tolist())))
        observe(index, per_sample)

    sel.observe = spy
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, crop_padding=1, hflip=False)
    result = fit(distiller, train, val, sel, cfg)
    k = round(0.5 * len(train))
    assert [h["samples"] for h in result.history] == [k, k, k]
    assert all(batch <= subset for batch, subset in seen)
    assert [h["selection_selected"] for h in result.history] == [k, k, k]
    assert "selection_round_seconds" in result.history[0] and "selection_regime" not in result.history[0]
    assert len(sel.history) == 3 and sel.omega.sum().item() == 3 * k
    assert result.last_state["selector"]["omega"].sum().item() == 3 * k


def test_build_selector(tiny_loaders):
    train, _ = tiny_loaders
    distiller = Distiller(FakeNet(), FakeNet(), KD(2.5))
    assert isinstance(build_selector("full", SAKDConfig(), distiller, train, epochs=3), FullData)
    sel = build_selector("sakd", SAKDConfig(ratio=0.25, patch_size=4), distiller, train, epochs=3, seed=1)
    assert isinstance(sel, SAKDSelector) and sel.temperature == 2.5 and sel.k == 16
    with pytest.raises(UserError, match="sampling"):
        build_selector("some", SAKDConfig(), distiller, train, epochs=3)
    with pytest.raises(UserError, match="teacher"):
        build_selector("sakd", SAKDConfig(), Distiller(FakeNet()), train, epochs=3)


# ---------------------------------------------------------------- normalise: minmax | rank


def test_normalise_minmax_is_the_papers_and_rank_shares_ties():
    s = torch.tensor([3.0, 1.0, 1.0, 10.0, 2.0], dtype=torch.float64)
    assert torch.equal(normalise(s), ((s - s.min()) / (s.max() - s.min() + 1e-12)).float())
    assert normalise(s, "rank").tolist() == [0.75, 0.125, 0.125, 1.0, 0.5]  # ranks 3, 0.5, 0.5, 4, 2 over 4
    assert normalise(torch.tensor([7.0]), "rank").tolist() == [0.0]
    with pytest.raises(ValueError, match="allowed: minmax, rank"):
        normalise(s, "zscore")


def skewed_rounds(loader, normalise_how: str, rate: str, rounds: int = 3) -> list[dict]:
    """The rounds of a selector whose difficulty passes all see one heavy-tailed (log-normal, sigma 2)
    loss vector."""
    n = len(loader)
    g = torch.Generator().manual_seed(0)
    loss = torch.exp(2.0 * torch.randn(n, generator=g))
    sel = make_selector(loader, epochs=4, normalise=normalise_how, alpha_rate=rate, momentum=0.1)
    sel.difficulty_pass = lambda transform, clean, epoch: (loss.clone(), torch.randn(n, 3, generator=g))
    for epoch in range(rounds):
        sel.select(epoch)
    return sel.history


def test_rank_keeps_mean_alpha_at_its_nominal_value_where_minmax_collapses_it(tiny_loaders):
    train, _ = tiny_loaders
    minmax, rank = (skewed_rounds(train, how, "one") for how in ("minmax", "rank"))
    assert [r["alpha_mean"] for r in rank] == pytest.approx([0.5] * 3, abs=1e-6)  # the base method's alpha
    assert all(r["alpha_mean"] < 0.03 for r in minmax)  # 0.022: a few large losses squash the rest to ~0
    assert all(r["alpha_mean"] < 0.03 for r in skewed_rounds(train, "minmax", "beta_raw"))
    # with the paper's rate, rank's mean follows the beta_raw factor: 0.1 * previous + 0.9 * beta_raw * 0.5
    paper_rate = skewed_rounds(train, "rank", "beta_raw")
    expected = 0.5
    for r in paper_rate[1:]:
        expected = 0.1 * expected + 0.9 * r["beta_raw"] * 0.5
        assert r["alpha_mean"] == pytest.approx(expected, abs=1e-6)
    assert paper_rate[1]["alpha_mean"] == pytest.approx(0.1526, abs=1e-4)


# ---------------------------------------------------------------- loss_scale: paper | constant


class CrossEntropyAsKD(KD):
    """A "distillation" term equal to the CE term: the weighted loss is then (total weight) x CE_i."""

    def forward(self, student_out, teacher_out, target):
        return torch.nn.functional.cross_entropy(student_out.logits, target, reduction="none")


def step(alpha, scale: str, loss=None):
    """The loss and the student's gradients of one step on a fixed batch (fresh seeded models)."""
    torch.manual_seed(0)
    d = Distiller(FakeNet(), FakeNet(width=8), loss if loss is not None else KD(4.0), ce_weight=0.1, kd_weight=0.9)
    d.alpha_scale = scale
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    out = d(x, y, alpha)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in d.student.parameters()]


def test_constant_scale_reproduces_the_base_loss_at_alpha_half():
    base_loss, base_grads = step(None, "paper")
    for scale in ("paper", "constant"):
        loss, grads = step(torch.full((16,), 0.5), scale)
        assert torch.equal(loss, base_loss) and all(torch.equal(a, b) for a, b in zip(grads, base_grads)), scale
    assert constant_scale(torch.full((16,), 0.5), 0.1, 0.9).item() == 1.0


def test_constant_scale_keeps_the_gradient_scale_when_alpha_falls():
    """With KD_i = CE_i the weighted loss is the total weight times CE: at alpha = 0.12 the paper's loss
    and gradients shrink to 2 (0.88 x 0.1 + 0.12 x 0.9) = 0.392 of the base method's; constant keeps them."""
    kd_is_ce = CrossEntropyAsKD()
    base_loss, base_grads = step(None, "paper", kd_is_ce)
    low = torch.full((16,), 0.12)
    paper_loss, paper_grads = step(low, "paper", kd_is_ce)
    constant_loss, constant_grads = step(low, "constant", kd_is_ce)
    torch.testing.assert_close(paper_loss, 0.392 * base_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(constant_loss, base_loss, rtol=1e-6, atol=0)
    for base, paper, constant in zip(base_grads, paper_grads, constant_grads):
        torch.testing.assert_close(paper, 0.392 * base, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(constant, base, rtol=1e-5, atol=1e-7)


def test_constant_scale_makes_any_batchs_weights_total_the_base_methods():
    alpha = 0.5 * torch.rand(16, generator=torch.Generator().manual_seed(2))  # mean below 0.5
    c = constant_scale(alpha, 0.1, 0.9)
    assert c.dtype == torch.float64 and c.item() > 1  # less weight on KD, which weighs 0.9
    assert (c * alpha_weights(alpha.double(), 0.1, 0.9).sum()).item() == pytest.approx(16 * 1.0, rel=1e-12)
    assert constant_scale(torch.rand(8), 1.0, 1.0).item() == pytest.approx(1.0, rel=1e-12)  # feature recipes: 2 always
    assert constant_scale(torch.ones(4), 0.0, 0.0).item() == 1.0  # no weights at all: nothing to rescale
    paper_loss, paper_grads = step(alpha, "paper")
    constant_loss, constant_grads = step(alpha, "constant")
    torch.testing.assert_close(constant_loss, c.float() * paper_loss, rtol=1e-6, atol=0)
    for paper, constant in zip(paper_grads, constant_grads):
        torch.testing.assert_close(constant, c.float() * paper, rtol=1e-5, atol=1e-7)


def test_the_selector_hands_its_loss_scale_to_the_distiller_and_logs_the_papers(tiny_loaders):
    train, _ = tiny_loaders
    assert make_selector(train).distiller.alpha_scale == "paper"
    sel = make_selector(train, loss_scale="constant")
    assert sel.distiller.alpha_scale == "constant"
    sel.select(0)
    picked = sel.alpha[sel.selection]
    assert sel.history[-1]["weight_scale_selected"] == pytest.approx(
        1 / constant_scale(picked, 0.1, 0.9).item(), rel=1e-9)


def scale_of_rank_share(alpha: torch.Tensor) -> torch.Tensor:
    rank, world = distributed.world()
    return constant_scale(alpha.tensor_split(world)[rank], 0.1, 0.9)


@pytest.mark.slow
def test_constant_scale_is_that_of_the_global_batch_on_every_rank(tmp_path):
    from test_ranks import on_two_processes

    alpha = torch.rand(15, generator=torch.Generator().manual_seed(3))
    single = constant_scale(alpha, 0.1, 0.9)
    shares = alpha.tensor_split(2)
    assert constant_scale(shares[0], 0.1, 0.9).item() != pytest.approx(single.item(), rel=1e-3)  # a rank's own differs
    assert [s.item() for s in on_two_processes(scale_of_rank_share, tmp_path, alpha)] == pytest.approx(
        [single.item()] * 2, rel=1e-12)


# ---------------------------------------------------------------- the interrupted passes, cached


class CountingTeacher(FakeNet):
    calls = 0

    def extract(self, x):
        CountingTeacher.calls += 1
        return super().extract(x)


def cached_run(loader, root, epochs=4, cache_interrupted=True, seed=0, **cfg):
    """Four rounds (clean, dropout, dropout, shuffle) with the pass teacher's outputs cached in ``root``:
    (teacher batches run, the selector)."""
    seed_everything(0)
    d = Distiller(FakeNet(), CountingTeacher(width=8), KD(4.0), ce_weight=0.1, kd_weight=0.9)
    clean = TeacherCache(root, "clean", len(loader), frozenset({"logits", "embedding"}))
    sel = SAKDSelector(SAKDConfig(**{"ratio": 0.5, "interval": 1, "patch_size": 4, **cfg}), d, loader, epochs=epochs,
                       seed=seed, clean_cache=clean, cache_interrupted=cache_interrupted)
    CountingTeacher.calls = 0
    for epoch in range(4):
        sel.select(epoch)
    return CountingTeacher.calls, sel


def test_a_second_identical_run_runs_no_teacher_in_its_passes(tiny_loaders, tmp_path):
    train, _ = tiny_loaders
    calls_a, a = cached_run(train, tmp_path)
    calls_b, b = cached_run(train, tmp_path)
    assert [h["regime"] for h in a.history] == ["dropout"] * 3 + ["shuffle"] and a.history[1]["beta"] > 0
    assert calls_a == 4 * train.num_batches() and calls_b == 0
    for x, y in ((a.selection, b.selection), (a.alpha, b.alpha), (a.features, b.features), (a.omega, b.omega)):
        assert torch.equal(x, y)
    assert [h["alpha_selected_mean"] for h in a.history] == [h["alpha_selected_mean"] for h in b.history]
    calls_c, _ = cached_run(train, tmp_path, theta=2.0)  # other interruptions: only the clean round is cached
    assert calls_c == 3 * train.num_batches()
    calls_d, _ = cached_run(train, tmp_path / "other", cache_interrupted=False)
    calls_e, _ = cached_run(train, tmp_path / "other", cache_interrupted=False)
    assert calls_d == 4 * train.num_batches() and calls_e == 3 * train.num_batches()  # off: the clean pass only


def test_the_interrupted_cache_key_holds_what_the_interruptions_depend_on(tiny_loaders, tmp_path):
    train, _ = tiny_loaders

    def key(epochs=4, seed=0, **cfg):
        torch.manual_seed(0)
        d = Distiller(FakeNet(), FakeNet(width=8), KD(4.0))
        clean = TeacherCache(tmp_path, "clean", len(train), frozenset({"logits", "embedding"}))
        sel = SAKDSelector(SAKDConfig(**{"patch_size": 4, **cfg}), d, train, epochs=epochs, seed=seed,
                           clean_cache=clean, cache_interrupted=True)
        assert sel.pass_cache(True) is clean
        return sel.pass_cache(False).folder.name

    base = key()
    changed = [key(epochs=5), key(seed=1), key(theta=2.0), key(eta=0.3), key(shuffle="pixel"), key(patch_size=2)]
    assert len({base, *changed}) == 1 + len(changed)
    same = [key(gamma=0.9), key(sigma=0.5), key(ratio=0.25), key(interval=2), key(momentum=0.5), key(eps=2.0),
            key(alpha_rate="one"), key(loss_scale="constant"), key(normalise="rank")]
    assert set(same) == {base}  # the selection's own settings do not change the images: one cache for the sweep
    assert key(shuffle="pixel", patch_size=2) == key(shuffle="pixel")  # a pixel shuffle has no patch


@pytest.fixture
def trained(project, monkeypatch):
    """test_student's: the tiny project prepared and its teacher trained (imported here when used: the
    stage modules are slow to import)."""
    from pipeline import prepare, train_teacher

    monkeypatch.setenv("KDCOMPRESS_CACHE_DIR", str(project / "cache"))
    assert prepare.main([]) == 0 and train_teacher.main([]) == 0
    return project


@pytest.mark.slow
def test_a_second_identical_distill_runs_no_teacher_in_its_difficulty_passes(trained, monkeypatch, capsys):
    """The real stage function twice, teacher cache on (onnxruntime teacher): rounds at epoch 0 (clean)
    and 2 (dropout); the second run's passes take every teacher output from the cache."""
    from conftest import TINY, write_params
    from test_student import paths

    from kdcompress.config import load_params
    from kdcompress.training.ort_teacher import OrtTeacher
    from kdcompress.training.student import distill
    from models import create_model

    in_pass, teacher_batches = [], []
    real_pass, real_extract = SAKDSelector.difficulty_pass, OrtTeacher.extract

    def counting_pass(self, *args):
        in_pass.append(True)
        try:
            return real_pass(self, *args)
        finally:
            in_pass.pop()

    def counting_extract(self, x):
        if in_pass:
            teacher_batches.append(len(x))
        return real_extract(self, x)

    monkeypatch.setattr(SAKDSelector, "difficulty_pass", counting_pass)
    monkeypatch.setattr(OrtTeacher, "extract", counting_extract)
    distill_cfg = {**TINY["distill"], "sampling": "sakd", "epochs": 4, "teacher_runtime": "onnxruntime"}
    params = load_params(write_params(trained, distill=distill_cfg, sakd={"interval": 2, "patch_size": 4}))
    runs = []
    for _ in range(2):
        teacher_batches.clear()
        seed_everything(0, 1)
        summary = distill(params, paths(trained), create_model)
        rounds = (trained / "out" / "rounds.csv").read_text().splitlines()
        runs.append((sum(teacher_batches), summary, rounds, capsys.readouterr().out))
    (first_seen, first, first_rounds, first_log), (second_seen, second, second_rounds, second_log) = runs
    assert first_seen == 2 * 96 and second_seen == 0  # 96 training images per pass
    assert "(interrupted images of" in first_log and ": 0 rounds stored" in first_log
    assert ": 1 rounds stored" in second_log
    assert second["val_acc"] == first["val_acc"] and second["teacher_cache_hit_fraction"] == 1.0
    header = first_rounds[0].split(",")
    timing = [i for i, name in enumerate(header) if name.endswith("_seconds")]
    assert [[v for i, v in enumerate(r.split(",")) if i not in timing] for r in first_rounds] == [
        [v for i, v in enumerate(r.split(",")) if i not in timing] for r in second_rounds]
