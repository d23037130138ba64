"""The fast low-rank lazy greedy DPP against a brute-force log-det greedy."""

from __future__ import annotations

import pytest
import torch

from kdcompress.training.selection.dpp import dpp_gains, greedy_dpp


def brute_force_greedy(features: torch.Tensor, quality: torch.Tensor, k: int, gamma: float, sigma: float) -> list[int]:
    """Textbook greedy MAP: at each step the candidate maximising log det(L_{A+i}) by slogdet, with
    L = diag(q) (F F^T + sigma I) diag(q), q_i = exp(gamma s_i / (2 (1 - gamma)))."""
    f, s = features.double(), quality.double()
    n = len(s)
    q = torch.exp(gamma * s / (2 * (1 - gamma)))
    kernel = q[:, None] * (f @ f.T + sigma * torch.eye(n, dtype=torch.float64)) * q[None, :]
    chosen: list[int] = []
    for _ in range(k):
        rest = [i for i in range(n) if i not in chosen]
        subs = torch.stack([kernel[chosen + [i]][:, chosen + [i]] for i in rest])
        sign, logdet = torch.linalg.slogdet(subs)
        assert bool((sign > 0).all())
        chosen.append(rest[int(logdet.argmax())])
    return chosen


def instance(seed: int, n: int, d: int, normalise: bool = True):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g)
    if normalise:
        f = f / f.norm(dim=1, keepdim=True)
    else:  # varied norms: no exact ties in the pure-diversity case
        f = f * (0.5 + torch.rand(n, 1, generator=g))
    return f, torch.rand(n, generator=g)


CASES = [  # (seed, n, d, k, gamma, sigma)
    (0, 30, 4, 15, 0.5, 0.1),
    (1, 40, 5, 20, 0.3, 0.1),
    (2, 60, 8, 30, 0.5, 0.1),
    (3, 50, 6, 25, 0.8, 0.1),
    (4, 45, 4, 22, 0.5, 0.5),
    (5, 36, 7, 18, 0.6, 0.05),
]


@pytest.mark.parametrize("seed,n,d,k,gamma,sigma", CASES)
@pytest.mark.parametrize("block", [1, 4, 512])
def test_matches_brute_force_greedy(seed, n, d, k, gamma, sigma, block):
    f, s = instance(seed, n, d)
    assert k > d
    expected = brute_force_greedy(f, s, k, gamma, sigma)
    got = greedy_dpp(f, s, k, gamma, sigma, block=block)
    assert got.dtype == torch.long
    assert got.tolist() == expected


@pytest.mark.parametrize("seed", [10, 11])
def test_pure_diversity_matches_brute_force(seed):
    f, s = instance(seed, 40, 5, normalise=False)
    assert greedy_dpp(f, s, 20, 0.0, 0.1, block=8).tolist() == brute_force_greedy(f, s, 20, 0.0, 0.1)


def test_each_pick_is_the_exact_argmax_gain():
    f, s = instance(7, 200, 6)
    order = greedy_dpp(f, s, 100, 0.5, 0.1, block=16).tolist()
    for t in (0, 1, 5, 6, 7, 50, 99):
        gains = dpp_gains(f, s, 0.5, 0.1, torch.tensor(order[:t], dtype=torch.long))
        gains[order[:t]] = -float("inf")
        assert int(gains.argmax()) == order[t]


def test_gamma_one_is_top_k_by_quality():
    f, s = instance(3, 50, 6)
    got = greedy_dpp(f, s, 20, 1.0, 0.1)
    assert got.tolist() == torch.argsort(s, descending=True)[:20].tolist()


def test_no_duplicates_and_k_equal_n_selects_all():
    f, s = instance(8, 300, 8)
    got = greedy_dpp(f, s, 150, 0.5, 0.1, block=32)
    assert len(got) == 150 and len(set(got.tolist())) == 150
    every = greedy_dpp(f[:60], s[:60], 60, 0.5, 0.1, block=8)
    assert sorted(every.tolist()) == list(range(60))
    assert len(greedy_dpp(f, s, 0, 0.5, 0.1)) == 0


def test_diversity_beats_quality_on_a_duplicated_cluster():
    # 10 identical high-quality items and 10 distinct lower-quality ones: pure diversity takes one
    # copy of the duplicate, the quality limit takes the 5 best (all duplicates)
    g = torch.Generator().manual_seed(0)
    distinct = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    dup = torch.nn.functional.normalize(torch.ones(1, 16), dim=1).repeat(10, 1)
    f = torch.cat([dup, distinct])
    s = torch.cat([torch.full((10,), 1.0), torch.linspace(0.0, 0.5, 10)])
    diverse = greedy_dpp(f, s, 5, 0.0, 0.01).tolist()
    assert sum(i < 10 for i in diverse) == 1
    assert all(i < 10 for i in greedy_dpp(f, s, 5, 1.0, 0.01).tolist())


def test_bad_arguments():
    f, s = instance(0, 10, 3)
    with pytest.raises(ValueError, match="gamma"):
        greedy_dpp(f, s, 3, 1.5, 0.1)
    with pytest.raises(ValueError, match="sigma"):
        greedy_dpp(f, s, 3, 0.5, 0.0)
    with pytest.raises(ValueError, match="features"):
        greedy_dpp(f, s[:5], 3, 0.5, 0.1)
    with pytest.raises(ValueError, match="finite"):
        greedy_dpp(f, s * float("nan"), 3, 0.5, 0.1)
