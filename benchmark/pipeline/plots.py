"""Log-log ROC plots (Carlini et al., "Membership Inference Attacks From First Principles").

A linear ROC hides what matters for privacy: the attack's true-positive rate at
false-positive rates of 1% and below. Log axes start at 1/N non-members, the
smallest FPR the data can show.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

Curve = tuple[np.ndarray, np.ndarray]  # (labels, membership scores)


def plain_text(text: object) -> str:
    """`text` as matplotlib should draw it, verbatim.

    Names come from records and plugins: a `$...$` in one would be parsed as
    mathtext, and a formula matplotlib cannot parse aborts the whole figure.
    Every `$` escaped means no mathtext (matplotlib draws `\\$` as `$`).
    """
    return str(text).replace("$", r"\$")


def roc_plot_png(curves: Mapping[str, Curve], *, title: str) -> bytes:
    """Render one log-log ROC per named curve (first curve emphasised) to PNG bytes."""
    # A bare Figure renders through Agg without pyplot's global state or a display.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8, 4.4), dpi=100)
    axes = figure.subplots()
    smallest = 1.0
    for i, (name, (labels, scores)) in enumerate(curves.items()):
        labels = np.asarray(labels).astype(bool)
        fpr, tpr, _ = roc_curve(labels, scores)
        n_non = int((~labels).sum())
        smallest = min(smallest, 1.0 / max(1, n_non))
        auc = roc_auc_score(labels, scores)
        # Zero rates cannot sit on a log axis: they are drawn at the 1/N floor.
        floor = 1.0 / max(1, n_non)
        axes.step(
            np.maximum(fpr, floor),
            np.maximum(tpr, floor / 2),
            where="post",
            linewidth=2.0 if i == 0 else 1.2,
            label=f"{plain_text(name)} (AUC {auc:.3f})",
        )
    grid = np.logspace(np.log10(smallest), 0, 50)
    axes.plot(grid, grid, linestyle="--", color="grey", linewidth=0.8, label="chance")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(smallest, 1.0)
    axes.set_ylim(smallest / 2, 1.05)
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate")
    axes.set_title(plain_text(title), fontsize=9)
    axes.legend(loc="lower right", fontsize=7)
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
