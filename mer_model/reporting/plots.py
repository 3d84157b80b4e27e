"""The report figures: confusion matrices, per-subject and per-dataset bars, learning curves (matplotlib, Agg).

Each function writes one PNG and returns its path. Figures are sized from their content (classes, subjects) so that
class names and subject labels stay readable at a glance; every axis is labelled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.model.io import write_with
from mer.model.training.metrics import LABELS

DPI = 110
LEAKY_NOTE = "LEAKY: test labels used (oracle epoch / annotated AUs)"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use (matplotlib is heavy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(metric: str) -> str:
    return LABELS.get(metric, metric)


def _save(fig: Any, path: Path, leaky: bool) -> Path:
    fig.tight_layout()
    if leaky:
        fig.text(0.5, 1.0, LEAKY_NOTE, ha="center", va="bottom", fontsize=9, color="#b00020", weight="bold")
    write_with(path, lambda out: fig.savefig(out, format="png", dpi=DPI, bbox_inches="tight"))
    pyplot().close(fig)
    return path


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "",
                     leaky: bool = False) -> Path:
    """Row-normalised confusion matrix (each row = one true class sums to 100 %), cells show % and the count."""
    plt = pyplot()
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(class_names)
    side = 2.2 + 0.75 * k
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), class_names, rotation=35, ha="right")
    ax.set_yticks(range(k), [f"{n} (n={int(r)})" for n, r in zip(class_names, rows[:, 0])])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.55 else "black"
            ax.text(j, i, f"{100 * share[i, j]:.0f}%\n({int(counts[i, j])})", ha="center", va="center",
                    color=colour, fontsize=9)
    ax.set_title(title or "confusion matrix (row-normalised = recall)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, path, leaky)


def per_subject_bars(per_subject: Mapping[str, Mapping[str, Any]], path: Path, metric: str = "accuracy",
                     leaky: bool = False) -> Path:
    """One horizontal bar per LOSO test subject (its fold's `metric`), coloured by dataset, with the sample count."""
    plt = pyplot()
    subjects = sorted(per_subject)
    values = [_value(per_subject[s].get(metric)) for s in subjects]  # undefined: no bar (NaN), never 0
    datasets = [s.split("/", 1)[0] if "/" in s else "" for s in subjects]
    palette = plt.get_cmap("tab10")
    colours = {d: palette(i % 10) for i, d in enumerate(dict.fromkeys(datasets))}
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.24 * len(subjects)))
    y = np.arange(len(subjects))
    ax.barh(y, values, color=[colours[d] for d in datasets])
    ax.set_yticks(y, [f"{s} (n={per_subject[s].get('n', '?')})" for s in subjects],
                  fontsize=8 if len(subjects) > 30 else 9)
    ax.set_ylim(len(subjects) - 0.4, -0.6)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(f"{metric} on the subject's test fold")
    ax.set_ylabel("test subject (LOSO fold), n = test samples")
    mean = float(np.nanmean(values)) if any(np.isfinite(values)) else float("nan")
    line = ax.axvline(mean, color="black", linestyle="--", linewidth=1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()] if len(colours) > 1 else []
    ax.legend(handles + [line], [*(list(colours) if handles else []), f"mean over subjects {mean:.2f}"],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(f"per-subject {metric}")
    return _save(fig, path, leaky)


def per_dataset_bars(per_dataset: Mapping[str, Mapping[str, Any]], path: Path,
                     metrics: Sequence[str] = ("uf1", "uar", "accuracy"), leaky: bool = False) -> Path:
    """Grouped bars: each dataset of a composite (and `overall` if given) x UF1 / UAR / accuracy."""
    plt = pyplot()
    names = list(per_dataset)
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(names), 4.0))
    for i, metric in enumerate(metrics):
        values = [_value(per_dataset[n].get(metric)) for n in names]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, label=_label(metric))
        ax.bar_label(bars, labels=[f"{v:.2f}" if np.isfinite(v) else "–" for v in values], fontsize=8)
    ax.set_xticks(x, [f"{n}\n(n={per_dataset[n].get('n', '?')})" for n in names])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score (pooled over the dataset's LOSO folds)")
    ax.set_xlabel("dataset")
    ax.legend(ncols=len(metrics), loc="upper center", fontsize=8)
    ax.set_title("per-dataset breakdown")
    return _save(fig, path, leaky)


def _value(value: Any) -> float:
    """A score to plot: NaN (drawn as nothing) where it is undefined, never 0."""
    return float(value) if value is not None else float("nan")


def learning_curves(history: pd.DataFrame, path: Path, leaky: bool = False) -> Path:
    """Mean +- std over folds per epoch: losses (left) and scores (right). Curves on `test_*` exist only under the
    oracle protocol, which is why they are labelled as test-fold curves."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    frame = history.copy()
    if "fold" not in frame:
        frame["fold"] = "all"
    losses = [c for c in ("train_loss", "val_loss", "test_loss") if c in frame]
    scores = [c for c in frame.columns if c.endswith(("_uf1", "_uar", "_accuracy")) and c.startswith(("val_", "test_"))]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 6, 4), squeeze=False)
    folds = frame["fold"].nunique()
    for ax, columns, ylabel in ((axes[0][0], losses, "loss"), *(((axes[0][1], scores, "score"),) if scores else ())):
        for column in columns:
            stats = frame.groupby("epoch")[column].agg(["mean", "std"]).reset_index()
            split, _, metric = column.partition("_")
            label = f"{ {'test': 'TEST fold', 'val': 'validation', 'train': 'training'}[split]} {_label(metric)}"
            ax.plot(stats["epoch"], stats["mean"], marker="o", markersize=3, label=label)
            if folds > 1:
                ax.fill_between(stats["epoch"], stats["mean"] - stats["std"].fillna(0),
                                stats["mean"] + stats["std"].fillna(0), alpha=0.2)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{ylabel} (mean ± std over {folds} fold{'s' if folds != 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("losses")
    if scores:
        axes[0][1].set_title("scores" + (" (test-fold curves = oracle protocol)" if any(
            c.startswith("test_") for c in scores) else ""))
        axes[0][1].set_ylim(0, 1.02)
    return _save(fig, path, leaky)
