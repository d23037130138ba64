"""Metrics against values worked out by hand on tiny fixed examples."""

from __future__ import annotations

import math

import pytest
import torch

from kdcompress.report.metrics import classification_metrics, confusion_matrix, rank_table, reliability_bins

# Three samples, three classes. Logits are log-probabilities, so softmax gives these rows back.
P = [[0.80, 0.15, 0.05],  # label 0: correct, conf 0.80
     [0.10, 0.60, 0.30],  # label 2: wrong (pred 1), conf 0.60
     [0.20, 0.15, 0.65]]  # label 2: correct, conf 0.65
Y = [0, 2, 2]
# Teacher probabilities: preds 0, 2, 2 -> agrees with the student on samples 0 and 2.
Q = [[0.50, 0.25, 0.25],
     [0.20, 0.20, 0.60],
     [0.10, 0.10, 0.80]]


def logits(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


LOGITS, LABELS, TEACHER = logits(P), torch.tensor(Y), logits(Q)


def test_accuracy_nll_brier_entropy():
    m = classification_metrics(LOGITS, LABELS, n_bins=4)
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["top5"] == pytest.approx(1.0)  # k = min(5, 3) = 3: always a hit
    assert m["nll"] == pytest.approx(-(math.log(0.80) + math.log(0.30) + math.log(0.65)) / 3)
    # brier per sample: 0.2^2 + 0.15^2 + 0.05^2 = 0.065; 0.1^2 + 0.6^2 + 0.7^2 = 0.86;
    # 0.2^2 + 0.15^2 + 0.35^2 = 0.185  ->  mean 1.11 / 3 = 0.37
    assert m["brier"] == pytest.approx(0.37)
    h0 = -(0.8 * math.log(0.8) + 0.15 * math.log(0.15) + 0.05 * math.log(0.05))
    h1 = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    h2 = -(0.2 * math.log(0.2) + 0.15 * math.log(0.15) + 0.65 * math.log(0.65))
    assert m["entropy"] == pytest.approx((h0 + h1 + h2) / 3)
    assert "agreement" not in m  # teacher-free: the same call serves the teacher's own metrics


def test_ece_mce():
    # 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]
    # bin 2: samples 1, 2: acc 1/2, conf (0.60 + 0.65) / 2 = 0.625 -> gap 0.125
    # bin 3: sample 0: acc 1, conf 0.80 -> gap 0.2
    # ECE = 2/3 * 0.125 + 1/3 * 0.2 = 0.15; MCE = 0.2
    m = classification_metrics(LOGITS, LABELS, n_bins=4)
    assert m["ece"] == pytest.approx(0.15)
    assert m["mce"] == pytest.approx(0.2)
    # one bin: acc 2/3, conf (0.8 + 0.6 + 0.65) / 3 = 0.68333 -> ECE = MCE = 0.016667
    m1 = classification_metrics(LOGITS, LABELS, n_bins=1)
    assert m1["ece"] == pytest.approx(abs(2 / 3 - 2.05 / 3)) and m1["mce"] == pytest.approx(m1["ece"])


def test_teacher_metrics():
    m = classification_metrics(LOGITS, LABELS, TEACHER)
    assert m["agreement"] == pytest.approx(2 / 3)
    kl = sum(q * math.log(q / p) for qs, ps in zip(Q, P) for q, p in zip(qs, ps)) / 3
    assert m["kl_teacher_student"] == pytest.approx(kl)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    ls = [[math.log(v) for v in row] for row in P]
    lt = [[math.log(v) for v in row] for row in Q]
    assert m["logit_cosine"] == pytest.approx(sum(cos(a, b) for a, b in zip(ls, lt)) / 3)
    # the student against itself
    same = classification_metrics(LOGITS, LABELS, LOGITS)
    assert same["agreement"] == 1.0 and same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-12)
    assert same["logit_cosine"] == pytest.approx(1.0)


def test_cosine_and_kl_simple_logits():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    m = classification_metrics(s, torch.tensor([0, 1]), t)
    # cos([1,0],[1,1]) = 1/sqrt(2); cos([0,2],[0,-3]) = -1
    assert m["logit_cosine"] == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    # sample 0: q = (1/2, 1/2), p = (e/(e+1), 1/(e+1)): KL = 1/2 ln((e+1)/(2e)) + 1/2 ln((e+1)/2)
    e = math.e
    kl0 = 0.5 * math.log((e + 1) / (2 * e)) + 0.5 * math.log((e + 1) / 2)
    # sample 1: q = (e^3/(e^3+1), 1/(e^3+1)), p = (1/(1+e^2), e^2/(1+e^2))
    q = (e ** 3 / (e ** 3 + 1), 1 / (e ** 3 + 1))
    p = (1 / (1 + e ** 2), e ** 2 / (1 + e ** 2))
    kl1 = q[0] * math.log(q[0] / p[0]) + q[1] * math.log(q[1] / p[1])
    assert m["kl_teacher_student"] == pytest.approx((kl0 + kl1) / 2)
    assert m["agreement"] == 0.5  # preds student (0, 1), teacher (0, 0)


def test_top5():
    lg = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]] * 2)  # class 4 is 5th best, class 5 is 6th
    m = classification_metrics(lg, torch.tensor([4, 5]))
    assert m["top5"] == 0.5 and m["top1"] == 0.0


def test_reliability_bins():
    rows = reliability_bins(LOGITS, LABELS, n_bins=4)
    assert [r["bin"] for r in rows] == [0, 1, 2, 3]
    assert [r["count"] for r in rows] == [0, 0, 2, 1]
    assert rows[0]["confidence"] is None and rows[0]["accuracy"] is None
    assert rows[2]["lower"] == pytest.approx(0.5) and rows[2]["upper"] == pytest.approx(0.75)
    assert rows[2]["confidence"] == pytest.approx(0.625) and rows[2]["accuracy"] == pytest.approx(0.5)
    assert rows[3]["confidence"] == pytest.approx(0.8) and rows[3]["accuracy"] == 1.0
    assert list(rows[0]) == ["bin", "lower", "upper", "count", "confidence", "accuracy"]


def test_bin_edges_are_upper_inclusive():
    # softmax([0, 0]) = exactly 0.5: with 4 bins it belongs to (0.25, 0.5], i.e. bin 1
    rows = reliability_bins(torch.zeros(1, 2), torch.tensor([0]), n_bins=4)
    assert [r["count"] for r in rows] == [0, 1, 0, 0]
    # ECE of that sample: |1 - 0.5| = 0.5
    assert classification_metrics(torch.zeros(1, 2), torch.tensor([0]), n_bins=4)["ece"] == pytest.approx(0.5)


def test_confusion_matrix():
    pred = torch.tensor([0, 1, 1, 2, 0])
    true = torch.tensor([0, 1, 2, 2, 1])
    cm = confusion_matrix(pred, true, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 0, 0],   # true 0: predicted 0 once
                           [1, 1, 0],   # true 1: predicted 1 once and 0 once
                           [0, 1, 1]]   # true 2: predicted 1 once and 2 once
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_rank_table_ties_min_method():
    rows = {"a": {"acc": 0.9, "ece": 0.05},
            "b": {"acc": 0.9, "ece": 0.02},
            "c": {"acc": 0.8, "ece": 0.05},
            "d": {"acc": 0.95, "ece": 0.01}}
    t = rank_table(rows, {"acc": "max", "ece": "min"})
    # acc: d 0.95 -> 1; a, b 0.9 tie -> 2, 2; c -> 4 (method 'min')
    # ece: d 0.01 -> 1; b 0.02 -> 2; a, c 0.05 tie -> 3, 3
    assert {n: (r["acc_rank"], r["ece_rank"]) for n, r in t.items()} == {
        "a": (2, 3), "b": (2, 2), "c": (4, 3), "d": (1, 1)}
    assert {n: r["avg_rank"] for n, r in t.items()} == {"a": 2.5, "b": 2.0, "c": 3.5, "d": 1.0}


def test_rank_table_missing_values():
    t = rank_table({"a": {"x": 1.0}, "b": {"x": float("nan")}, "c": {}}, {"x": "min"})
    assert t["a"] == {"x_rank": 1, "avg_rank": 1.0}
    assert t["b"] == {"x_rank": None, "avg_rank": None} and t["c"]["x_rank"] is None
    with pytest.raises(ValueError, match="allowed: max, min"):
        rank_table({"a": {"x": 1.0}}, {"x": "best"})


def test_inputs_checked():
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4))
