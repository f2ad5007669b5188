"""Build LEADERBOARD.md from a results folder: find, validate, group, aggregate, render.

A pure function of the folder: the same records give the same bytes (sorted, no clock).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import benchmark.pipeline.statistics as stats
import leaderboard.plots as plotting
import leaderboard.ranking as ranking
from benchmark.kernel.errors import BenchmarkError
from benchmark.pipeline.records import RecordError, ResultRecord, read_record, record_files
from benchmark.pipeline.statistics import Estimate
from leaderboard.tables import BASE_MODEL_ROW, BLACK_BOX_ACCESS, Entry, Row, Table, cells, worst_cell
from leaderboard.tables import pareto as pareto  # re-exported: callers import it from here

PLOTS_DIRNAME = "leaderboard_plots"
# Beside the all-attacks AUC of a defense that stops only the black-box attack (see the legend).
BLACK_BOX_ONLY_MARK = "⚠"
LOW_FPRS = (0.01, 0.001)
NO_UTILITY = ("", "")


class LeaderboardError(BenchmarkError):
    """The leaderboard cannot be built (no records, output not writable)."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Leaderboard:
    markdown: str
    tables: list[Table]
    entries: list[Entry]
    skipped: list[Skipped]
    plots: dict[str, bytes]
    headlines: list[ranking.Headline] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- discovery


def read_records(results_dir: Path) -> tuple[list[tuple[str, ResultRecord]], list[Skipped]]:
    """Every record file under `results_dir`, sorted by relative path, as (path, record); invalid ones skipped.

    Record files are `*.json` and compacted `*.json.xz` (`record_files`). They
    are read by `read_record`: only regular files of at most
    `MAX_RECORD_BYTES` (16 MiB), whose figures agree with their own per-query
    scores; a FIFO, a link to a device, an oversized, deeply nested or forged
    record is skipped with its reason, never waited on or loaded whole.

    Raises:
        LeaderboardError: the folder does not exist.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise LeaderboardError(
            f"results folder {results_dir} does not exist; run `python -m benchmark run` first or pass --results-dir"
        )
    # Not only regular files: anything else named like a record is listed as skipped, with its reason.
    files = record_files(results_dir)
    records: list[tuple[str, ResultRecord]] = []
    skipped: list[Skipped] = []
    for path in files:
        rel = path.relative_to(results_dir).as_posix()
        try:
            records.append((rel, read_record(path, source=rel)))
        except RecordError as exc:
            skipped.append(Skipped(rel, str(exc)))
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append(Skipped(rel, _unexpected(rel, exc)))
    return records, skipped


def _unexpected(rel: str, exc: Exception) -> str:
    return f"{rel}: unexpected content ({exc.__class__.__name__}: {exc})"


def collect(results_dir: Path) -> tuple[list[Entry], list[Skipped]]:
    """Every valid record under `results_dir` as a leaderboard entry, sorted; invalid ones skipped with a reason."""
    records, skipped = read_records(results_dir)
    entries: list[Entry] = []
    for rel, record in records:
        try:
            entries.append(_entry(rel, record))
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append(Skipped(rel, _unexpected(rel, exc)))
    skipped.sort(key=lambda s: s.path)
    return entries, skipped


def _entry(rel: str, record: ResultRecord) -> Entry:
    privacy, attack, utility, control = record.privacy, record.attack, record.utility, record.control
    tpr = {t.target_fpr: (t.tpr, t.ci, t.n_nonmembers, t.supported) for t in privacy.tpr_at_fpr}
    if utility is not None:
        network = utility.feature_network
        key = (network.name, network.weights_sha256)
        fid, kid, clip = utility.target.fid, utility.target.kid_mean, utility.target.clip_score
    else:
        key, fid, kid, clip = NO_UTILITY, None, None, None
    base = utility.base_model if utility is not None else None
    seeds = record.seeds
    seed = seeds.get("seed", min(seeds.values()) if seeds else 0)
    return Entry(
        path=rel,
        dataset=record.dataset,
        scenario=attack.scenario,
        defense=record.components["defense"].label,
        attack_model=attack.attack_model,
        seed=int(seed),
        auc=privacy.auc,
        auc_ci=privacy.auc_ci,
        tpr=tpr,
        epsilon=record.training.epsilon,
        utility_key=key,
        fid=fid,
        kid=kid,
        clip=clip,
        labels=list(attack.labels),
        scores=[float(v) for v in attack.membership_scores],
        control_auc=control.auc if control is not None else None,
        control_auc_ci=control.auc_ci if control is not None else None,
        base_fid=base.fid if base is not None else None,
        base_kid=base.kid_mean if base is not None else None,
        base_clip=base.clip_score if base is not None else None,
        family=attack.family,
        # Records from before access was recorded are Pang & Wang's text-to-image black box.
        access=attack.access or "black-box",
        query_ids=list(attack.query_ids),
    )


# ---------------------------------------------------------------- aggregation


_ESCAPES = {ch: f"&#{ord(ch)};" for ch in "|`*_[]#~\\<>&\"'"}
_ESCAPES.update({"\r": " ", "\n": " ", "\t": " "})


def escape(text: object) -> str:
    """Make a name or note safe inside a markdown table cell or heading (HTML entities, no raw markup)."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text))


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(values: list[float], digits: int = 3, ci: tuple[float, float] | None = None) -> str:
    mean, std = _mean_std(values)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _envelope(cis: list[tuple[float, float] | None]) -> tuple[float, float] | None:
    """Widest interval over seeds (min low, max high); None unless every seed has one."""
    if not cis or any(c is None for c in cis):
        return None
    return min(c[0] for c in cis if c), max(c[1] for c in cis if c)


def entries_frame(entries: list[Entry]) -> pd.DataFrame:
    """One row per entry (the Entry itself in column `entry`) with the axes the board groups by."""
    return pd.DataFrame(
        {
            "entry": entries,
            "dataset": [e.dataset for e in entries],
            "scenario": [e.scenario for e in entries],
            "utility_key": [e.utility_key for e in entries],
            "defense": [e.defense for e in entries],
            "attack_model": [e.attack_model for e in entries],
            "attack": [e.attack for e in entries],
            "access": [e.access for e in entries],
            "seed": [e.seed for e in entries],
        },
        columns=["entry", "dataset", "scenario", "utility_key", "defense", "attack_model", "attack", "access", "seed"],
    )


def _per_seed(frame: pd.DataFrame) -> dict[int, list[Entry]]:
    return {int(seed): list(group["entry"]) for seed, group in frame.groupby("seed", sort=True)}


def _worst(frame: pd.DataFrame, metric: Any) -> tuple[str, list[Entry]]:
    """The attack (family/attack-model) with the highest mean of `metric` over seeds (ties: name order)."""
    values = frame.assign(value=[metric(e) for e in frame["entry"]]).dropna(subset=["value"])
    if values.empty:
        return "", []
    means = values.groupby("attack", sort=True)["value"].mean()
    name = str(means.idxmax())  # the first maximum in name order
    return name, list(frame.loc[frame["attack"] == name, "entry"])


def _fpr_label(fpr: float) -> str:
    return f"{fpr * 100:g}%"


@dataclass(frozen=True)
class WorstCase:
    """The worst case over a set of attacks: mean AUC over seeds and its interval (the widest over seeds)."""

    auc: float
    ci: tuple[float, float] | None
    # The records of the attack behind `auc`, for the significance tests and the plots' error bars.
    entries: tuple[Entry, ...] = ()


def _worst_case(frame: pd.DataFrame, prefix: str, row: Row) -> WorstCase | None:
    """Fill `row.cells[prefix + ...]` with the worst case over the attacks in `frame`: the AUC, the attack
    behind it, and TPR at each low FPR; "–" in each (not measured) and None where `frame` is empty."""
    if frame.empty:
        for key in ("auc", "auc_attack", *(f"tpr{fpr}" for fpr in LOW_FPRS)):
            row.cells[prefix + key] = "–"
        return None
    several = frame["attack"].nunique() > 1
    attack, chosen = _worst(frame, lambda e: e.auc)
    aucs = [e.auc for e in chosen]
    worst = WorstCase(statistics.fmean(aucs), _envelope([e.auc_ci for e in chosen]), tuple(chosen))
    row.cells[prefix + "auc"] = _fmt(aucs, ci=worst.ci)
    row.cells[prefix + "auc_attack"] = escape(attack)
    for fpr in LOW_FPRS:
        attack, chosen = _worst(frame, lambda e, f=fpr: e.tpr[f][0] if f in e.tpr else None)
        items = [e.tpr[fpr] for e in chosen if fpr in e.tpr]
        if not items:
            row.cells[f"{prefix}tpr{fpr}"] = "–"
            continue
        n = min(i[2] for i in items)
        supported = all(i[3] for i in items)
        text = _fmt([i[0] for i in items], ci=_envelope([i[1] for i in items]))
        text += f" (n₀={n}{'' if supported else ', †'})"
        if several:
            text += f" {escape(attack)}"
        row.cells[f"{prefix}tpr{fpr}"] = text
    return worst


def _row(defense: str, entries: list[Entry]) -> Row:
    frame = entries_frame(entries)
    attacks = sorted(frame["attack"].unique())
    row = Row(defense=defense, seeds=sorted(int(s) for s in frame["seed"].unique()), attack_models=attacks)

    black_box = frame["access"].isin(BLACK_BOX_ACCESS)
    bb = _worst_case(frame[black_box], "bb_", row)
    # Without a gray-box record the worst case over all attacks was not measured: "–", never the
    # black-box figure again under another heading.
    every = _worst_case(frame if (~black_box).any() else frame.iloc[:0], "all_", row)
    row.auc_black_box = None if bb is None else bb.auc
    row.auc_all = None if every is None else every.auc
    # The worst case over every attack measured (the Pareto front and the plots rank by it).
    row.auc = every.auc if every is not None else bb.auc  # type: ignore[union-attr]
    behind = every if every is not None else bb
    if behind is not None and behind.entries:
        row.cell = worst_cell(cells(list(behind.entries)))
        row.auc_interval = (
            ranking.interval(stats.auc_estimate(ranking.runs(row.cell))) if row.cell.has_scores else behind.ci
        )
    if bb is not None and every is not None and bb.ci is not None and every.ci is not None:
        # Non-overlapping 95% intervals: the gray-box attacks do significantly better than the black box.
        row.black_box_only = every.ci[0] > bb.ci[1]

    # One target model per seed: utility and epsilon do not depend on the attack model.
    per_seed = _per_seed(frame)
    eps = [v for v in (_first(s, lambda e: e.epsilon) for s in per_seed.values()) if v is not None]
    row.cells["eps"] = _fmt(eps, digits=2) if eps else "–"
    fids = [v for v in (_first(s, lambda e: e.fid) for s in per_seed.values()) if v is not None]
    kids = [v for v in (_first(s, lambda e: e.kid) for s in per_seed.values()) if v is not None]
    clips = [v for v in (_first(s, lambda e: e.clip) for s in per_seed.values()) if v is not None]
    row.fid = statistics.fmean(fids) if fids else None
    row.clip = statistics.fmean(clips) if clips else None
    row.utility_by_seed = {
        seed: (fid, clip) for seed, (fid, _, clip) in ranking.utility_by_seed(list(frame["entry"])).items()
    }
    row.fid_interval = ranking.interval(stats.seed_mean(fids)) if fids else None
    row.clip_interval = ranking.interval(stats.seed_mean(clips)) if clips else None
    row.cells["fid"] = _fmt(fids, digits=2) if fids else "–"
    row.cells["kid"] = _fmt(kids, digits=4) if kids else "–"
    row.cells["clip"] = _fmt(clips, digits=2) if clips else "–"
    return row


def _first(entries: list[Entry], get: Any) -> float | None:
    for e in sorted(entries, key=lambda e: (e.attack, e.path)):
        value = get(e)
        if value is not None:
            return value
    return None


def _joined_utility_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """A record without utility joins the table of its target's records that have it.

    A gray-box attack run with `--no-utility-metrics` attacks the same fine-tuned target
    (same dataset, scenario, defense and seed) as a Pang & Wang record that measured its
    utility; it belongs in that row, not in a table of its own. Where the target's
    records name no feature network, or more than one, nothing is joined.
    """
    target = ["dataset", "scenario", "defense", "seed"]
    measured: dict[tuple[object, ...], set[tuple[str, str]]] = {}
    for row in frame.itertuples(index=False):
        if row.utility_key != NO_UTILITY:
            measured.setdefault(tuple(getattr(row, c) for c in target), set()).add(row.utility_key)
    keys = []
    for row in frame.itertuples(index=False):
        found = measured.get(tuple(getattr(row, c) for c in target), set())
        keys.append(next(iter(found)) if row.utility_key == NO_UTILITY and len(found) == 1 else row.utility_key)
    return frame.assign(utility_key=keys)


def aggregate(entries: list[Entry]) -> list[Table]:
    frame = _joined_utility_keys(entries_frame(entries))
    tables = []
    for (dataset, scenario, key), group in frame.groupby(["dataset", "scenario", "utility_key"], sort=True):
        rows = [_row(str(defense), list(items["entry"])) for defense, items in group.groupby("defense", sort=True)]
        reference = _base_model_row(list(group.loc[group["defense"] == "none", "entry"]))
        with_fid = [r for r in rows if r.fid is not None]
        if with_fid:
            use_clip = all(r.clip is not None for r in with_fid)
            candidates = [ranking.Candidate(r.defense, r.auc, r.cell, r.utility_by_seed) for r in with_fid]
            for r, on_front in zip(with_fid, ranking.significant_front(candidates, use_clip=use_clip), strict=True):
                r.pareto = on_front
        if reference is not None:
            rows.append(reference)
        tables.append(Table(dataset, scenario, key, rows))
    return tables


def headlines(entries: list[Entry]) -> list[ranking.Headline]:
    """One ranked headline per dataset and utility feature network (never two networks' utility in one)."""
    frame = _joined_utility_keys(entries_frame(entries))
    out = []
    for (dataset, key), group in frame.groupby(["dataset", "utility_key"], sort=True):
        by_defense = {str(defense): list(items["entry"]) for defense, items in group.groupby("defense", sort=True)}
        found = ranking.headline(str(dataset), key, by_defense)
        if found is not None:
            out.append(found)
    return out


def _base_model_row(undefended: list[Entry]) -> Row | None:
    """The base model as a reference row: the control of the undefended records.

    Its AUC is the attack (fitted on the undefended shadow) applied to the base
    model; its utility is the same protocol run before fine-tuning. Not a
    defense, so never on the Pareto front; a defense it dominates costs more than
    not fine-tuning at all.
    """
    controls = [
        dataclasses.replace(
            e,
            defense=BASE_MODEL_ROW,
            auc=e.control_auc,
            auc_ci=e.control_auc_ci,
            tpr={},
            epsilon=None,
            fid=e.base_fid,
            kid=e.base_kid,
            clip=e.base_clip,
            labels=[],
            scores=[],
        )
        for e in undefended
        if e.control_auc is not None
    ]
    if not controls:
        return None
    row = _row(BASE_MODEL_ROW, controls)
    row.reference = True
    return row


# ---------------------------------------------------------------- rendering


def slug(*parts: str) -> str:
    text = "-".join(parts)
    clean = re.sub(r"[^A-Za-z0-9_.+-]", "_", text)
    if clean != text:
        clean += "-" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return clean


def _estimate(estimate: Estimate | None, digits: int = 3) -> str:
    """`value [low, high]`, or the value alone where there is no interval (one seed of a utility figure)."""
    if estimate is None:
        return "–"
    bounds = ranking.interval(estimate)
    text = f"{estimate.value:.{digits}f}"
    return text if bounds is None else f"{text} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _methods(found: list[ranking.Headline]) -> str:
    methods = sorted({r.auc.method for h in found for r in h.rows})
    one_seed = all(r.auc.n_seeds == 1 for h in found for r in h.rows)
    text = "; ".join(methods)
    if one_seed:
        text += (
            ". Every defense here has one seed: the intervals and tests are over queries only, so they do not "
            "say whether the ranking survives another seed"
        )
    return text


def render_headlines(found: list[ranking.Headline]) -> list[str]:
    """The headline tables: every defense of a dataset ranked by its worst-case AUC, with the test behind each rank."""
    if not found:
        return []
    out = [
        "## Headline: defenses ranked by worst-case attack AUC",
        "",
        "- Worst case: the (scenario, attack family/attack model) cell with the highest mean attack AUC over seeds, "
        "over every cell measured against the defense (named `scenario / family/attack-model`). AUC and TPR@1%FPR "
        "are that cell's, mean over seeds with a 95% interval from a two-level bootstrap: seeds resampled, then "
        f"members and non-members within each seed ({stats.RESAMPLES:,} resamples). Method here: {_methods(found)}.",
        "- Rank: 1 + the number of defenses whose worst cell's AUC is significantly lower "
        f"({ranking.TEST}), and never less than the rank above it, so defenses the test cannot tell apart share a "
        "rank. Δ AUC is the difference to the "
        "defense just above, with its interval and two-sided p-value.",
        "- Seeds and queries: behind the worst cell (queries summed over seeds); n₀ non-members per seed, † where "
        "they cannot support a 1% FPR.",
        "- Utility (FID ↓, KID ↓, CLIP score ↑) of the target model: mean over seeds with a 95% Student t interval "
        "(none with one seed). Only records under one feature network share a table.",
        "- ★: no other defense is significantly better on one of worst-case AUC, FID and CLIP score while at least "
        f"as good (means) on the others (AUC: the test above; utility: {ranking.UTILITY_TEST}, which needs two "
        "shared seeds). An unstarred defense is beaten beyond the noise; a star is not a claim that a difference "
        "is real.",
        "",
    ]
    for h in found:
        network = (
            "no utility measured"
            if h.utility_key == NO_UTILITY
            else f"utility on {escape(h.utility_key[0])}, weights sha256 `{escape(h.utility_key[1][:12])}`"
        )
        out += [
            f"**{escape(h.dataset)}** ({network})",
            "",
            "| rank | defense | worst cell | AUC ↓ [95%] | TPR@1%FPR ↓ [95%] | Δ AUC vs above [95%], p | seeds "
            "| queries | FID ↓ | KID ↓ | CLIP score ↑ | Pareto |",
            "|" + "---|" * 12,
        ]
        for r in h.rows:
            tpr = f"{_estimate(r.tpr)} (n₀={r.n_nonmembers}{'' if r.tpr_supported else ', †'})"
            versus = "–"
            if r.versus_above is not None:
                d = r.versus_above
                versus = f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}], p={d.p_value:.3g}"
            out.append(
                f"| {r.rank} | {escape(r.defense)} | {escape(r.cell)} | {_estimate(r.auc)} | {tpr} | {versus} "
                f"| {r.auc.n_seeds} | {r.auc.n_queries} | {_estimate(r.fid, 2)} | {_estimate(r.kid, 4)} "
                f"| {_estimate(r.clip, 2)} | {'★' if r.pareto else ''} |"
            )
        out.append("")
    out += ["## Per scenario", ""]
    return out


def render(
    tables: list[Table],
    skipped: list[Skipped],
    plot_links: dict[tuple[str, ...], str],
    ranked: list[ranking.Headline] | None = None,
) -> str:
    out = [
        "# Leaderboard",
        "",
        "Generated by `python -m leaderboard build` from the result records; do not edit by hand.",
        "",
        *render_headlines(ranked or []),
        "- Privacy: the attack's ROC AUC and TPR at low FPR on the target, the **worst case (max) over attacks**, "
        "each attack named `family/attack-model` (the attack behind the AUC is named; for TPR it is named when "
        "there are several). Lower is better (↓); 0.5 AUC is chance.",
        "- Safe against whom? *black box*: the worst case over the attacks that only query the provider's API "
        "(access black-box or black-box-img2img, e.g. pang-wang, rediffuse); *all attacks*: the worst case over "
        "every attack run against the defense, gray-box ones included (they read the model's noise predictions, "
        "e.g. loss, clid, pia). – in the all-attacks columns: no gray-box attack was measured on that defense.",
        f"- {BLACK_BOX_ONLY_MARK} marks a defense that only stops the black-box attack: the 95% interval of its "
        "all-attacks AUC lies entirely above that of its black-box AUC (the intervals do not overlap).",
        "- Figures are mean ± std over seeds (std 0 with one seed); [low, high] is the 95% bootstrap interval "
        "(the widest over seeds) where records carry one.",
        "- n₀ is the number of non-members behind a TPR@FPR figure; † marks a figure those non-members "
        "cannot support (fewer than 1/FPR).",
        "- ε: DP-SGD privacy budget spent, where the defense has one.",
        "- Utility (FID ↓, KID ↓, CLIP score ↑) is only compared within one feature network (weights hash); "
        "records measured with another network get their own table.",
        "- ★ marks the privacy-utility Pareto front among the defenses (lower AUC, lower FID, higher CLIP score), "
        "on the all-attacks AUC (the black-box one where no gray-box attack was measured), up to the noise: a "
        "defense loses its star only to one at least as good on every axis (means) and significantly better on "
        f"one (AUC: {ranking.TEST}, on each defense's worst attack in the scenario; utility: "
        f"{ranking.UTILITY_TEST}, which needs two shared seeds).",
        f"- *{BASE_MODEL_ROW}*: the base model before fine-tuning under the same protocol (its AUC is the "
        "undefended attack applied to it, a control that should sit near 0.5). A defense this row dominates "
        "costs more utility than not fine-tuning at all.",
        "",
    ]
    header = (
        "| defense | seeds | attacks | AUC ↓ black box | worst black-box attack | TPR@1%FPR ↓ black box "
        "| TPR@0.1%FPR ↓ black box | AUC ↓ all attacks | worst attack | TPR@1%FPR ↓ all attacks | ε ↓ "
        "| FID ↓ | KID ↓ | CLIP score ↑ | Pareto |"
    )
    sep = "|" + "---|" * 15
    last_section = None
    for table in tables:
        section = (table.dataset, table.scenario)
        if section != last_section:
            out += [f"## {escape(table.dataset)}, scenario {escape(table.scenario)}", ""]
            roc = plot_links.get(("roc", *section))
            if roc:
                out += [f"ROC curves (log-log): ![ROC {escape(table.dataset)} {escape(table.scenario)}]({roc})", ""]
            last_section = section
        if table.utility_key == NO_UTILITY:
            out += ["No utility measured (no `utility` section in these records).", ""]
        else:
            name, digest = table.utility_key
            out += [f"Utility feature network: {escape(name)} (weights sha256 `{escape(digest[:16])}`).", ""]
        out += [header, sep]
        for r in table.rows:
            mark = "★" if r.pareto else ""
            name = f"*{escape(r.defense)}*" if r.reference else escape(r.defense)
            everything = r.cells["all_auc"] + (f" {BLACK_BOX_ONLY_MARK}" if r.black_box_only else "")
            out.append(
                f"| {name} | {len(r.seeds)} | {len(r.attack_models)} | {r.cells['bb_auc']} "
                f"| {r.cells['bb_auc_attack']} | {r.cells['bb_tpr0.01']} | {r.cells['bb_tpr0.001']} "
                f"| {everything} | {r.cells['all_auc_attack']} | {r.cells['all_tpr0.01']} | {r.cells['eps']} "
                f"| {r.cells['fid']} | {r.cells['kid']} | {r.cells['clip']} | {mark} |"
            )
        out.append("")
        trade = plot_links.get(("tradeoff", table.dataset, table.scenario, *table.utility_key))
        if trade:
            out += [f"Privacy-utility trade-off: ![trade-off]({trade})", ""]
    if skipped:
        out += ["## Skipped files", "", "| file | reason |", "|---|---|"]
        for s in skipped:
            out.append(f"| {escape(s.path)} | {escape(s.reason)} |")
        out.append("")
    return "\n".join(out)


SUMMARY_START = "<!-- leaderboard summary: generated by `python -m leaderboard build --readme`; do not edit -->"
SUMMARY_END = "<!-- end of leaderboard summary -->"


def summary(found: list[ranking.Headline]) -> str:
    """The README's compact form of the headline: per dataset and feature network, every defense ranked.

    The same ranks, tests and stars as the leaderboard's headline; the intervals are 95%.
    """
    out: list[str] = []
    for h in found:
        network = (
            "no utility"
            if h.utility_key == NO_UTILITY
            else f"utility on {escape(h.utility_key[0])}, weights sha256 `{escape(h.utility_key[1][:12])}`"
        )
        seeds = sorted({r.auc.n_seeds for r in h.rows})
        out += [
            f"**{escape(h.dataset)}** ({network}; {'/'.join(map(str, seeds))} seed(s) per defense): ranked by "
            "worst-case attack AUC ↓ over scenarios and attacks; a shared rank is a difference the paired test "
            "cannot tell from noise",
            "",
            "| rank | defense | worst cell | AUC ↓ [95%] | TPR@1%FPR ↓ | FID ↓ [95%] | CLIP score ↑ [95%] | ★ |",
            "|" + "---|" * 8,
        ]
        for r in h.rows:
            out.append(
                f"| {r.rank} | {escape(r.defense)} | {escape(r.cell)} | {_estimate(r.auc)} | {r.tpr.value:.3f} "
                f"| {_estimate(r.fid, 2)} | {_estimate(r.clip, 1)} | {'★' if r.pareto else ''} |"
            )
        out.append("")
    return "\n".join(out)


def replace_summary(readme: str, block: str) -> str:
    """`readme` with the text between the summary markers replaced by `block`.

    Raises:
        LeaderboardError: the markers are missing or out of order.
    """
    start, end = readme.find(SUMMARY_START), readme.find(SUMMARY_END)
    if start < 0 or end < start:
        raise LeaderboardError(
            f"the README has no leaderboard summary markers; add the lines\n{SUMMARY_START}\n{SUMMARY_END}\n"
            "where the summary should go"
        )
    return readme[: start + len(SUMMARY_START)] + "\n\n" + block.rstrip("\n") + "\n\n" + readme[end:]


def build(results_dir: Path, output: Path | None = None, *, plots: bool = True) -> Leaderboard:
    """Build the leaderboard in memory (markdown and PNGs); nothing is written.

    Raises:
        LeaderboardError: the folder is missing or holds no valid record.
    """
    results_dir = Path(results_dir)
    entries, skipped = collect(results_dir)
    if not entries:
        why = (
            f"; {len(skipped)} file(s) skipped:\n" + "\n".join(f"  {s.reason}" for s in skipped)
            if skipped
            else " (no *.json or *.json.xz record files found)"
        )
        raise LeaderboardError(f"no valid result records under {results_dir}{why}")
    tables = aggregate(entries)
    images: dict[str, bytes] = {}
    links: dict[tuple[str, ...], str] = {}
    if plots:
        for table in tables:
            if any(r.fid is not None for r in table.rows):
                name = f"{PLOTS_DIRNAME}/tradeoff-{slug(table.dataset, table.scenario, table.utility_key[1][:12])}.png"
                images[name] = plotting.tradeoff(table)
                links[("tradeoff", table.dataset, table.scenario, *table.utility_key)] = name
        sections = sorted({(e.dataset, e.scenario) for e in entries})
        for dataset, scenario in sections:
            chosen = [e for e in entries if e.dataset == dataset and e.scenario == scenario]
            png = plotting.roc(chosen, f"{dataset}, scenario {scenario}")
            if png is not None:
                name = f"{PLOTS_DIRNAME}/roc-{slug(dataset, scenario)}.png"
                images[name] = png
                links[("roc", dataset, scenario)] = name
    ranked = headlines(entries)
    markdown = render(tables, skipped, links, ranked)
    return Leaderboard(
        markdown=markdown, tables=tables, entries=entries, skipped=skipped, plots=images, headlines=ranked
    )


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write(board: Leaderboard, output: Path) -> None:
    """Write the markdown and its plots next to it (each file atomically).

    Raises:
        LeaderboardError: the output location is not writable.
    """
    output = Path(output)
    try:
        if output.is_dir():
            raise OSError(f"{output} is a folder")
        output.parent.mkdir(parents=True, exist_ok=True)
        for name, data in sorted(board.plots.items()):
            target = output.parent / name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        atomic_write(output, board.markdown.encode())
    except OSError as exc:
        raise LeaderboardError(f"cannot write the leaderboard to {output}: {exc}; pass a writable --output") from exc
