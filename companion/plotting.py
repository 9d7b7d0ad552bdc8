"""The course's figure style and the few plots that recur across chapters.

Labels are English (a figure must render on any machine without a CJK font); the Chinese explanation
lives in the caption. Figures are PNG at a modest dpi, so committed notebooks stay small and strict
nbval compares only their ``<Figure ...>`` text.
"""

from __future__ import annotations

import numpy as np

from companion.checks import check_bool, check_float, check_int

#: Colours used for methods across chapters (a method keeps its colour everywhere).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")


def use_house_style() -> None:
    """Apply the course's matplotlib defaults (inline PNG, small figures, light grid)."""
    import matplotlib as mpl

    mpl.rcParams.update({
        "figure.figsize": (5.6, 3.4),
        "figure.dpi": 90,
        "savefig.dpi": 90,
        "figure.autolayout": True,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": mpl.cycler(color=list(PALETTE)),
        "font.size": 10,
        "legend.frameon": False,
        "image.cmap": "viridis",
    })


def roc_plot(ax, curves: dict, log: bool = True, title: str | None = None, floor: float | None = None):
    """Draw ROC curves on ``ax``: ``curves`` maps a label to ``(fpr, tpr)`` arrays.

    ``log=True`` uses log-log axes, which show the low-FPR regime where attacks matter
    (Carlini et al. 2022); the diagonal is chance. On log axes a point with ``fpr == 0`` or
    ``tpr == 0`` has no position: it is dropped, so each curve starts at its first resolvable point
    (``fpr >= 1/negatives``), instead of a straight segment from a clipped origin that no threshold
    produces. ``floor`` is the lower limit of both log axes (default: the decade below the smallest
    positive rate drawn, at most ``1e-4`` and at least ``1e-6``).
    """
    if not isinstance(curves, dict) or not curves:
        raise TypeError("curves must be a non-empty dict of label -> (fpr, tpr)")
    check_bool("log", log)
    if floor is not None:
        floor = check_float("floor", floor, 0, 1, open_minimum=True, open_maximum=True)
    prepared = {}
    for label, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"curves[{label!r}] must be an (fpr, tpr) pair, got {type(pair).__name__}")
        fpr, tpr = np.asarray(pair[0], dtype=float), np.asarray(pair[1], dtype=float)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or len(fpr) == 0:
            raise ValueError(f"curves[{label!r}] must be two 1-D arrays of the same non-zero length, "
                             f"got shapes {fpr.shape} and {tpr.shape}")
        if not (np.isfinite(fpr).all() and np.isfinite(tpr).all()) or fpr.min() < 0 or tpr.min() < 0 \
                or fpr.max() > 1 or tpr.max() > 1:
            raise ValueError(f"curves[{label!r}]: rates must be finite and in [0, 1]")
        if log:
            resolvable = (fpr > 0) & (tpr > 0)
            fpr, tpr = fpr[resolvable], tpr[resolvable]
        prepared[label] = (fpr, tpr)
    if log and floor is None:
        positive = [v.min() for pair in prepared.values() for v in pair if len(v)]
        smallest = min(positive) if positive else 1e-4
        floor = float(np.clip(10 ** np.floor(np.log10(smallest)), 1e-6, 1e-4))
    for label, (fpr, tpr) in prepared.items():
        ax.plot(fpr, tpr, label=label)
    ax.plot([floor if log else 0, 1], [floor if log else 0, 1], ls="--", color="gray", lw=1, label="chance")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    return ax


def loss_curve_plot(ax, losses, smooth: int = 20, label: str = "train loss"):
    """Per-step losses (faint) and their moving average over ``smooth`` steps."""
    losses = np.asarray(losses, dtype=float)
    if losses.ndim != 1 or len(losses) == 0:
        raise ValueError(f"losses must be a non-empty 1-D sequence, got shape {losses.shape}")
    check_int("smooth", smooth, minimum=1)
    steps = np.arange(1, len(losses) + 1)
    line, = ax.plot(steps, losses, alpha=0.25)
    if len(losses) >= smooth:
        kernel = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(losses, kernel, mode="valid"), color=line.get_color(),
                label=f"{label} ({smooth}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(loc="upper right")
    return ax
