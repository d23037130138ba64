"""Greedy MAP of SAKD's quality–diversity DPP in the low-rank (Sherman–Morrison) form.

Objective (step 6 of "Sample-level Adaptive Knowledge Distillation for Action Recognition"),
maximised greedily over a set ``A`` of ``k`` items::

    gamma * sum_{i in A} s_i + (1 - gamma) * log det(F_A F_A^T + sigma I)

which, for gamma < 1, is ``(1 - gamma) * log det(L_A)`` for the L-ensemble
``L = diag(q) (F F^T + sigma I) diag(q)``, ``q_i = exp(gamma s_i / (2 (1 - gamma)))``, so both pick
the same items. The marginal gain of item ``i`` given ``A`` is

    gain_i = gamma * s_i + (1 - gamma) * log(sigma + h_i),   h_i = f_i^T P f_i,
    P = (I + F_A^T F_A / sigma)^-1   (d x d; P = I for A empty).

(With ``G = diag(q) F`` and ``delta = sigma q^2`` as in the paper the q factors cancel out of P and
h: ``delta_i + g_i^T P_G g_i = q_i^2 (sigma + f_i^T P f_i)``; working with F directly avoids the
overflow of ``q`` as gamma -> 1 and the division by ``1 - gamma``. gamma = 1 is the limit: top-k by
quality; gamma = 0 is pure diversity.) Adding ``j`` updates, with ``v = P f_j``,
``den = sigma + f_j^T v``: ``P -= v v^T / den`` and ``h_i -= (f_i^T v)^2 / den``.

Exact greedy with that update over all N items costs one N x d mat-vec per pick (memory-bound:
~27k mat-vecs of 54k x 64 for SAKD's default sizes). Because every ``h_i`` only decreases
(P shrinks in the Loewner order), a stored ``h_i`` is an upper bound of the current one, which
allows a *lazy* greedy that picks exactly the same items: the exact gains are maintained only for
a candidate block ``C`` (the ``block`` best items by upper bound, made exact in batches of
``(F_C P) . F_C``), and the best candidate is taken while its exact gain is >= the best upper bound
outside ``C``; otherwise the block is refilled. Time O(N k d) worst case, O(N d + d^2) memory.

With k >> d the diversity term fades after ~d picks (log(sigma + h_i) flattens towards
log(sigma) for every item as P shrinks in all directions the data occupies) and later picks follow
quality: that is inherent to log-det diversity, not an artefact of this implementation.
"""

from __future__ import annotations

import math

import torch


def dpp_gains(features: torch.Tensor, quality: torch.Tensor, gamma: float, sigma: float,
              selected: torch.Tensor | None = None) -> torch.Tensor:
    """Exact marginal gains of every item given ``selected`` (reference, O(N d^2 + |A| d^2))."""
    f = features.to(torch.float64)
    d = f.shape[1]
    p = torch.eye(d, dtype=torch.float64, device=f.device)
    if selected is not None and len(selected):
        fa = f[selected]
        p = torch.linalg.inv(p + fa.T @ fa / sigma)
    h = ((f @ p) * f).sum(1)
    return gamma * quality.to(torch.float64) + (1 - gamma) * torch.log(sigma + h)


def greedy_dpp(features: torch.Tensor, quality: torch.Tensor, k: int, gamma: float = 0.5, sigma: float = 0.1,
               *, block: int = 512, dtype: torch.dtype = torch.float64, stats: dict | None = None) -> torch.Tensor:
    """Indices (LongTensor [k], in selection order, on the inputs' device) of the greedy MAP of the
    quality–diversity DPP. ``features`` [N, d] (SAKD passes L2-normalised rows; not required),
    ``quality`` [N] (s_hat), ``0 <= gamma <= 1``, ``sigma > 0`` (ridge). ``block`` is the size of the
    lazily maintained candidate block (speed only, never the result). ``stats``, when given, receives
    counters (refills, exact gain evaluations).

    The loop runs on the CPU wherever the inputs live, on one intra-op thread (restored after): its
    ops are tiny and every pick reads a value back to the host, so on a GPU each step waits for a
    round trip (a 27k-pick round took 79 s on an H200 shared by 9 runs), and with two threads on a
    busy 2-core machine OpenMP wake-ups made single ops 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy_dpp(features.cpu(), quality.cpu(), k, gamma, sigma, block, dtype, stats).to(features.device)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _greedy_dpp(features: torch.Tensor, quality: torch.Tensor, k: int, gamma: float, sigma: float, block: int,
                dtype: torch.dtype, stats: dict | None) -> torch.Tensor:
    if features.dim() != 2 or quality.shape != features.shape[:1]:
        raise ValueError(f"greedy_dpp: features must be [N, d] and quality [N], got {tuple(features.shape)} "
                         f"and {tuple(quality.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"greedy_dpp: gamma must be in [0, 1], got {gamma}")
    if sigma <= 0:
        raise ValueError(f"greedy_dpp: sigma must be > 0, got {sigma}")
    if not (bool(torch.isfinite(features).all()) and bool(torch.isfinite(quality).all())):
        raise ValueError("greedy_dpp: features and quality must be finite (NaN/inf found)")
    n, d = features.shape
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if gamma >= 1.0:  # the limit: quality only (stable: ties keep index order)
        return torch.sort(quality, descending=True, stable=True).indices[:k]

    f = features.to(dtype)
    w = 1.0 - gamma
    base = gamma * quality.to(dtype)  # the quality part of every gain
    neg_inf = torch.tensor(-math.inf, dtype=dtype)
    ub = base + w * torch.log(sigma + (f * f).sum(1))  # upper bound of each gain (exact at P = I)
    fresh = torch.zeros(n, dtype=torch.bool)  # ub exact at the current P
    p = torch.eye(d, dtype=dtype)
    out = torch.empty(k, dtype=torch.long)
    block = max(1, int(block))
    n_refills = n_exact = 0

    cand = cand_list = f_c = h_c = base_c = score_c = None
    tau = math.inf
    t = 0
    while t < k:
        if score_c is not None:
            best_val, best = score_c.max(0)
            best_val = best_val.item()
        if score_c is None or best_val < tau or best_val == -math.inf:
            # -- refill: write the block's exact gains back as bounds, then make the top block exact
            n_refills += 1
            fresh.zero_()
            if cand is not None:  # the block's gains are exact now: keep them as (tight) bounds
                alive = cand[base_c > -math.inf]
                ub[alive] = score_c[base_c > -math.inf]
                fresh[alive] = True
            remaining = n - t
            m = min(block, remaining)
            chunk = m
            while True:
                top = torch.topk(ub, min(m + 1, remaining))
                stale = ~fresh[top.indices[:m]]
                if not bool(stale.any()):
                    break
                # exact gains for the `chunk` best items whose bound is stale (chunk grows geometrically)
                masked = torch.where(fresh, neg_inf, ub)
                idx = torch.topk(masked, min(chunk, remaining - int(fresh.sum()))).indices
                fi = f[idx]
                ub[idx] = base[idx] + w * torch.log(sigma + ((fi @ p) * fi).sum(1))
                fresh[idx] = True
                n_exact += len(idx)
                chunk *= 2
            cand = top.indices[:m]
            tau = top.values[m].item() if remaining > m else -math.inf
            cand_list = cand.tolist()
            f_c = f[cand]
            base_c = base[cand].clone()
            score_c = ub[cand].clone()
            h_c = ((f_c @ p) * f_c).sum(1)
            continue
        # -- pick the best candidate (its exact gain beats every bound outside the block)
        b = best.item()
        j = cand_list[b]
        out[t] = j
        t += 1
        ub[j] = -math.inf
        base_c[b] = -math.inf
        if t == k:
            break
        fj = f[j]
        v = p @ fj
        v = v / torch.sqrt(sigma + fj @ v)
        p.addr_(v, v, alpha=-1.0)
        h_c.sub_((f_c @ v).square_())
        torch.add(h_c.clamp(min=0.0), sigma, out=score_c)
        score_c.log_().mul_(w).add_(base_c)
    if stats is not None:
        stats.update(refills=n_refills, exact_evaluations=n_exact)
    return out
