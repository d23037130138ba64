"""Evaluation metrics: pure functions on CPU tensors, computed in float64, returned as Python numbers.

Notation: N samples, C classes, ``p = softmax(logits)`` (T = 1), ``y`` the true labels,
``conf_i = max_c p_ic`` and ``pred_i = argmax_c p_ic`` (the first index on ties).

- top1        = mean_i [pred_i == y_i]
- top5        = mean_i [y_i among the k largest logits], k = min(5, C)
- nll         = mean_i -log p_{i, y_i}                                   (cross-entropy, nats)
- ece         = sum_b |B_b| / N * |acc_b - conf_b|
- mce         = max over non-empty bins b of |acc_b - conf_b|
                (B_b: samples whose conf falls in bin b; n_bins equal-width bins on [0, 1],
                bin b = (b / n_bins, (b + 1) / n_bins], the first bin also holds conf = 0;
                acc_b = mean [pred == y] over B_b, conf_b = mean conf over B_b)
- brier       = mean_i sum_c (p_ic - onehot(y_i)_c)^2                    (range 0..2)
- entropy     = mean_i -sum_c p_ic log p_ic                              (nats)

With teacher logits (teacher probabilities q = softmax(teacher_logits)):

- agreement          = mean_i [argmax student_i == argmax teacher_i]
- kl_teacher_student = mean_i sum_c q_ic (log q_ic - log p_ic)            (KL(q || p), nats, T = 1)
- logit_cosine       = mean_i cos(student logits_i, teacher logits_i)

``classification_metrics(teacher_logits, labels)`` gives the teacher's own metrics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = logits.detach().cpu().to(torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, C] with N, C > 0, got {list(logits.shape)}")
    if labels is None:
        return logits, None
    labels = labels.detach().cpu().to(torch.int64)
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [N] = [{logits.shape[0]}], got {list(labels.shape)}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return logits, labels


def _bin_index(conf: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each confidence (bins (lower, upper], the first one closed at 0) and the n_bins + 1 edges."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # searchsorted(right=False) on the inner edges: number of inner edges strictly below conf
    return torch.searchsorted(edges[1:-1].contiguous(), conf.contiguous(), right=False), edges


def _bin_stats(logits: torch.Tensor, labels: torch.Tensor, n_bins: int):
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(torch.float64)
    idx, edges = _bin_index(conf, n_bins)
    count = torch.bincount(idx, minlength=n_bins).to(torch.float64)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return count, conf_sum, acc_sum, edges


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                           n_bins: int = 15) -> dict[str, float]:
    """top1, top5, nll, ece, mce, brier, entropy; plus agreement, kl_teacher_student and
    logit_cosine when ``teacher_logits`` is given. See the module docstring for the formulas."""
    logits, labels = _check(logits, labels)
    n, c = logits.shape
    log_p = logits.log_softmax(dim=1)
    p = log_p.exp()
    pred = logits.argmax(dim=1)
    k = min(5, c)
    topk = logits.topk(k, dim=1).indices
    out = {
        "top1": (pred == labels).to(torch.float64).mean().item(),
        "top5": (topk == labels[:, None]).any(dim=1).to(torch.float64).mean().item(),
        "nll": F.nll_loss(log_p, labels).item(),
    }
    count, conf_sum, acc_sum, _ = _bin_stats(logits, labels, n_bins)
    nonempty = count > 0
    gap = (acc_sum[nonempty] - conf_sum[nonempty]).abs() / count[nonempty]  # |acc_b - conf_b|
    out["ece"] = (count[nonempty] / n * gap).sum().item()
    out["mce"] = gap.max().item()
    onehot = F.one_hot(labels, c).to(torch.float64)
    out["brier"] = (p - onehot).pow(2).sum(dim=1).mean().item()
    out["entropy"] = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1).mean().item()
    if teacher_logits is not None:
        t, _ = _check(teacher_logits)
        if t.shape != logits.shape:
            raise ValueError(f"teacher_logits {list(t.shape)} and logits {list(logits.shape)} differ in shape")
        log_q = t.log_softmax(dim=1)
        out["agreement"] = (t.argmax(dim=1) == pred).to(torch.float64).mean().item()
        q = log_q.exp()
        kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))  # 0 log 0 = 0
        out["kl_teacher_student"] = kl.sum(dim=1).mean().item()
        out["logit_cosine"] = F.cosine_similarity(logits, t, dim=1, eps=1e-12).mean().item()
    return out


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> list[dict]:
    """One row per confidence bin, for a reliability diagram:
    ``{bin, lower, upper, count, confidence, accuracy}`` (confidence = mean max-probability in the
    bin, accuracy = fraction correct in the bin; bins as in ``ece``). An empty bin has count 0 and
    ``confidence``/``accuracy`` None (JSON null): Vega-Lite (``dvc plots``) skips null points
    instead of drawing a fake point on the diagonal. The last key is ``accuracy``, the y that DVC
    infers when a plot names no y."""
    logits, labels = _check(logits, labels)
    count, conf_sum, acc_sum, edges = _bin_stats(logits, labels, n_bins)
    rows = []
    for b in range(n_bins):
        k = int(count[b].item())
        rows.append({
            "bin": b,
            "lower": edges[b].item(),
            "upper": edges[b + 1].item(),
            "count": k,
            "confidence": conf_sum[b].item() / k if k else None,
            "accuracy": acc_sum[b].item() / k if k else None,
        })
    return rows


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """LongTensor [C, C]: entry [i, j] counts samples of true class i predicted as class j."""
    pred = pred.detach().cpu().to(torch.int64).reshape(-1)
    labels = labels.detach().cpu().to(torch.int64).reshape(-1)
    if pred.shape != labels.shape:
        raise ValueError(f"pred {list(pred.shape)} and labels {list(labels.shape)} differ in length")
    for name, t in (("pred", pred), ("labels", labels)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, got {t.min()}..{t.max()}")
    return torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).view(num_classes,
                                                                                               num_classes)


def rank_table(rows: dict[str, dict[str, float]], prefs: dict[str, str]) -> dict[str, dict[str, float | int | None]]:
    """Rank the named rows on each metric in ``prefs`` ('max': larger is better, 'min': smaller is
    better). Ties share the smallest rank (pandas ``rank(method='min')``): 1 + the number of rows
    strictly better. Returns ``{name: {"<metric>_rank": int, ..., "avg_rank": float}}``. A row
    without the metric (or with NaN) gets rank None, which is left out of its avg_rank (None when
    it has no ranks at all)."""
    for metric, pref in prefs.items():
        if pref not in ("max", "min"):
            raise ValueError(f"prefs[{metric!r}]: {pref!r} is not allowed; allowed: max, min")
    out: dict[str, dict[str, float | int | None]] = {name: {} for name in rows}
    for metric, pref in prefs.items():
        values = {}
        for name, row in rows.items():
            v = row.get(metric)
            if v is not None and not math.isnan(float(v)):
                values[name] = float(v) if pref == "max" else -float(v)  # larger is better from here on
        for name in rows:
            v = values.get(name)
            out[name][f"{metric}_rank"] = None if v is None else 1 + sum(1 for w in values.values() if w > v)
    for ranks in out.values():
        got = [r for r in ranks.values() if r is not None]
        ranks["avg_rank"] = sum(got) / len(got) if got else None
    return out


def evaluation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
               n_bins: int) -> tuple[dict, dict]:
    """The evaluate stage's figures: each model's classification metrics (the student's against the
    teacher too) and its non-empty reliability bins."""
    report = {"teacher": classification_metrics(teacher_logits, labels, n_bins=n_bins),
              "student": classification_metrics(student_logits, labels, teacher_logits, n_bins=n_bins)}
    bins = {role: [b for b in reliability_bins(logits, labels, n_bins) if b["count"] > 0]
            for role, logits in (("teacher", teacher_logits), ("student", student_logits))}
    return report, bins
