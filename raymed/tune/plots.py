"""The report's figures: each method's chosen trial against its trainable parameters (with the Pareto front), and its
learning curves. Drawn with matplotlib's object API (no global state, no display needed)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def pareto_front(points: Sequence[tuple[float, float]], mode: str = "max") -> list[int]:
    """Indices of the points (trainable params, metric) that no other point dominates, by params.

    A point is dominated when another has no more parameters and an equal-or-better metric, and is
    strictly better in one of the two.
    """
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def plot_frontier(path: Path, best: Mapping[str, Mapping[str, Any]], metric: str, mode: str) -> None:
    """Each method's chosen trial: ``metric`` (with its 95% interval when it has one) against trainable parameters,
    and the Pareto front of those points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, points, errors = [], [], []
    for label, t in best.items():
        value, trainable = t["metrics"].get(metric), t["params"]["trainable"]
        if value is None or not trainable:  # no metric, or nothing trained: no place on a log axis
            logger.info("frontier: %s left out (metric %s, trainable %s)", label, value, trainable)
            continue
        names.append(f"{label} (lr {t['lr']})" if t["lr"] is not None else label)
        points.append((float(trainable), float(value)))
        low, high = (t.get("intervals") or {}).get(metric) or (value, value)
        errors.append((float(value) - low, high - float(value)))

    fig = Figure(figsize=(7.5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        front = pareto_front(points, mode)
        xs, ys = zip(*points)
        ax.errorbar(xs, ys, yerr=list(zip(*errors)), fmt="o", color="tab:blue", ecolor="tab:blue", elinewidth=0.8,
                    capsize=2, alpha=0.8, zorder=3, label="chosen lr per method (95% interval)")
        fx, fy = zip(*(points[i] for i in front))
        ax.plot(fx, fy, color="tab:red", drawstyle="steps-post", zorder=2)
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="tab:red", zorder=4, label="Pareto front")
        # Alternate labels above and below, in x order, so that neighbouring labels do not overlap.
        for k, i in enumerate(sorted(range(len(points)), key=lambda i: points[i])):
            dy, va = (6, "bottom") if k % 2 == 0 else (-6, "top")
            ax.annotate(names[i], points[i], textcoords="offset points", xytext=(5, dy), va=va, fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.1)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial reports both the metric\nand its trainable parameters",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{metric} vs trainable parameters (one point per method at its chosen lr)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(path: Path, best: Mapping[str, Mapping[str, Any]], metric: str) -> None:
    """Per method (its chosen trial): the selection metric and the training loss per epoch (epoch 0: zero-shot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_metric, ax_loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    zero_shot_key = metric.replace("eval/", "zeroshot/", 1)
    for label, t in best.items():
        history = t.get("history") or []
        points = [(h["epoch"], h[metric]) for h in history if h.get(metric) is not None]
        if points and t["metrics"].get(zero_shot_key) is not None:
            points.insert(0, (0, t["metrics"][zero_shot_key]))
        if points:
            ax_metric.plot(*zip(*points), marker="o", ms=3, label=label)
        losses = [(h["epoch"], h["loss"]) for h in history if h.get("loss") is not None]
        if losses:
            ax_loss.plot(*zip(*losses), marker="o", ms=3, label=label)
    ax_metric.set(xlabel="epoch (0 = zero-shot)", ylabel=metric, title=f"{metric} per epoch (chosen trial per method)")
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="training loss per epoch")
    for ax in (ax_metric, ax_loss):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
