"""Figures as PNG images (matplotlib, no display): shown by `mlflow ui` (``mlflow.log_figure``) and by
`dvc plots show` as image plots, which render offline, unlike DVC's vega pages that load from a CDN."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kdcompress.io import atomic_write  # noqa: E402


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    path = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def reliability(bins: dict[str, list[dict]]):
    """Reliability diagram: accuracy against confidence per bin, one line per model, and the diagonal."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, rows in bins.items():
        rows = [r for r in rows if r["count"]]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", markersize=3, label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability (test)")
    ax.legend(loc="upper left")
    return fig


def confusion(matrix: np.ndarray, classes: list[str]):
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="Student confusion matrix (test)")
    if n <= 20:
        peak = matrix.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    return fig


def training_curves(history: list[dict], title: str):
    """Loss (left) and train/val accuracy (right) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", markersize=3)
    left.set(xlabel="epoch", ylabel="train loss")
    for key in ("train_acc", "val_acc"):
        right.plot(epochs, [h[key] for h in history], marker="o", markersize=3, label=key)
    right.set(xlabel="epoch", ylabel="accuracy")
    right.legend()
    fig.suptitle(title)
    return fig


def spot_routing(history: list[dict], title: str):
    """Spot-adaptive distillation per epoch: the fraction of samples routed to the teacher at each
    spot (left) and the grafted network's val accuracy beside the student's (right). Empty panels
    with fixed spots, where every sample is distilled at every spot."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    for key in [k for k in (history[0] if history else {}) if k.startswith("routed_")]:
        left.plot(epochs, [h[key] for h in history], marker="o", markersize=3, label=key.removeprefix("routed_"))
    left.set(xlabel="epoch", ylabel="fraction distilled", ylim=(0, 1.05))
    if history and "graft_val_acc" in history[0]:
        for key in ("graft_val_acc", "val_acc"):
            right.plot(epochs, [h[key] for h in history], marker="o", markersize=3, label=key)
    right.set(xlabel="epoch", ylabel="accuracy")
    for ax in (left, right):
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    return fig
