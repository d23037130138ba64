"""Figures as PNG images (matplotlib, no display): shown by `mlflow ui` (``mlflow.log_figure``) and by
`dvc plots show` as image plots, which render offline, unlike DVC's vega pages that load from a CDN."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def pareto(pts):
    """Accuracy against batch-1 latency (log scale), students and teachers, fp32 and int8, front joined."""
    fig, ax = plt.subplots(figsize=(8, 5.2))
    style = {("student", "fp32"): ("o", "tab:blue"), ("student", "int8"): ("s", "tab:cyan"),
             ("teacher", "fp32"): ("^", "tab:red"), ("teacher", "int8"): ("v", "tab:orange")}
    for (role, precision), (marker, colour) in style.items():
        group = [p for p in pts if (p.role, p.precision) == (role, precision)]
        if group:
            ax.scatter([p.p50_ms for p in group], [100 * p.val_top1 for p in group], marker=marker, color=colour,
                       facecolors=[colour if p.shippable else "none" for p in group], label=f"{role} {precision}")
    front = sorted((p for p in pts if p.on_front), key=lambda p: p.p50_ms)
    ax.plot([p.p50_ms for p in front], [100 * p.val_top1 for p in front], color="black", linewidth=1,
            label="Pareto front")
    for p in front:
        ax.annotate(f"{p.name.split(' #')[0]} {p.precision}", (p.p50_ms, 100 * p.val_top1), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set(xlabel="onnxruntime batch-1 p50 latency, 1 thread (ms, log scale)", ylabel="val top-1 (%)",
           title="Accuracy vs latency (hollow: int8 that failed the gate)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig
