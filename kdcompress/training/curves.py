"""The figures the training stages draw, as PNG images (matplotlib, no display): learning curves and
the spot-routing fractions, shown by `mlflow ui` and by `dvc plots show`."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
