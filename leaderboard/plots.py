"""Leaderboard plots (matplotlib Agg, PNG bytes without timestamps or version metadata)."""

from __future__ import annotations

import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmark.pipeline.plots import plain_text  # noqa: E402
from leaderboard.tables import Entry, Table, pareto  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def tradeoff(table: Table) -> bytes:
    """Attack AUC (worst case) against FID and against CLIP score, one point per defense preset.

    Stars mark the defenses no other one dominates significantly (over AUC, FID and CLIP
    score together); the base model before fine-tuning is drawn as a grey square for
    reference. Error bars are 95% intervals: AUC over seeds and queries, utility over seeds
    (none with one seed).
    """
    rows = [r for r in table.rows if r.fid is not None]
    with_clip = [r for r in rows if r.clip is not None]
    panels = [("fid", "FID ↓", rows)] + ([("clip", "CLIP score ↑", with_clip)] if with_clip else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (attr, label, chosen) in zip(axes[0], panels, strict=True):
        for r in chosen:
            x = getattr(r, attr)
            if r.reference:
                points = ax.scatter(x, r.auc, marker="s", s=60, color="grey")
            else:
                points = ax.scatter(x, r.auc, marker="*" if r.pareto else "o", s=110 if r.pareto else 40)
            ax.errorbar(
                x,
                r.auc,
                xerr=_bar(x, getattr(r, f"{attr}_interval")),
                yerr=_bar(r.auc, r.auc_interval),
                fmt="none",
                ecolor=points.get_facecolor()[0],
                elinewidth=0.8,
                capsize=2,
                alpha=0.7,
            )
            ax.annotate(
                "base model" if r.reference else plain_text(r.defense),
                (x, r.auc),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        # The panel's own two-metric front, as a staircase; stars mark the front over all three metrics.
        defenses = [r for r in chosen if not r.reference]
        sign = 1.0 if attr == "fid" else -1.0
        on_front = pareto([(r.auc, sign * getattr(r, attr)) for r in defenses])
        front = sorted((getattr(r, attr), r.auc) for r, keep in zip(defenses, on_front, strict=True) if keep)
        if len(front) > 1:
            ax.step(
                [p[0] for p in front],
                [p[1] for p in front],
                where="post" if attr == "fid" else "pre",
                color="black",
                lw=0.8,
                ls="--",
                label="Pareto front of this panel (★: not significantly dominated, all three metrics)",
            )
            ax.legend(loc="upper left" if attr == "clip" else "upper right", fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"{label} ({plain_text(table.utility_key[0])})", fontsize=8)
        ax.set_ylabel("attack AUC ↓ (worst case over all attacks)")
    title = plain_text(f"{table.dataset}, scenario {table.scenario}")
    fig.suptitle(f"{title}: privacy-utility trade-off", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _bar(value: float, interval: tuple[float, float] | None) -> np.ndarray | None:
    """An interval as matplotlib's asymmetric error bar (distances below and above the value)."""
    if interval is None:
        return None
    # A percentile interval need not contain the mean of the per-seed figures; never draw a negative length.
    return np.array([[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]])


def roc_curve(labels: list[int], scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = np.cumsum(1 - y)[distinct]
    pos, neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]


def roc(entries: list[Entry], title: str) -> bytes | None:
    """Log-log ROC curves, one colour per defense preset and attack (family/attack-model), one line per seed."""
    curves: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        if e.labels and len(set(e.labels)) == 2 and len(e.labels) == len(e.scores):
            curves[(e.defense, e.attack)].append(e)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 5))
    floor = 1.0
    for index, key in enumerate(sorted(curves)):
        colour = f"C{index % 10}"
        for n, e in enumerate(sorted(curves[key], key=lambda e: (e.seed, e.path))):
            fpr, tpr = roc_curve(e.labels, e.scores)
            negatives = max(e.labels.count(0), 1)
            low = 0.5 / negatives
            floor = min(floor, low)
            ax.plot(
                np.maximum(fpr, low),
                np.maximum(tpr, low),
                color=colour,
                lw=1,
                label=plain_text(f"{key[0]} / {key[1]}") if n == 0 else None,
            )
    ax.plot([floor, 1], [floor, 1], color="grey", ls=":", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate (0 drawn at 0.5 / non-members)")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{plain_text(title)}: ROC (log-log)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _png(fig)
