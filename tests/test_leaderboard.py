"""The leaderboard: a pure function of a results folder of synthetic records."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from benchmark.pipeline import statistics as stats
from benchmark.pipeline.records import ResultRecord, UtilityFigures, encode
from leaderboard.build import build, escape, pareto
from leaderboard.cli import main
from leaderboard.ranking import Headline, HeadlineRow
from tests.factories import make_record


def put(folder: Path, record: ResultRecord) -> Path:
    path = folder / record.dataset / record.scenario / record.defense / f"{record.run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(encode(record.to_dict()))
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    # none: leaky but best utility; dpsgd.eps1: private but poor utility; augment: dominated by none.
    for seed, (a, f) in enumerate([(0.80, 10.0), (0.90, 12.0)]):
        put(folder, make_record(defense="none", seed=seed, auc=a, fid=f, clip=30.0))
        put(folder, make_record(defense="none", seed=seed, attack_model="mlp", auc=a - 0.2, fid=f, clip=30.0))
    put(folder, make_record(defense="dpsgd", preset="eps1", auc=0.52, fid=40.0, clip=20.0, epsilon=1.0))
    put(folder, make_record(defense="augment", preset="strong", auc=0.9, fid=20.0, clip=25.0))
    bad = folder / "scenes" / "I" / "broken"
    bad.mkdir(parents=True)
    (bad / "corrupt.json").write_text('{"schema_version": 1, "run_id": ')
    (bad / "foreign.json").write_text(json.dumps({"name": "package.json", "version": "1.0"}))
    old = make_record(defense="none", seed=7, schema_version=0)
    (bad / "old.json").write_text(encode(old.to_dict()))
    return folder


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| defense") and not line.startswith("| file"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_build_skips_bad_files_and_marks_pareto(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "LEADERBOARD.md"
    assert main(["build", "--results-dir", str(results), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    for name in ("corrupt.json", "foreign.json", "old.json"):
        assert f"scenes/I/broken/{name}" in err
    assert "not valid JSON" in err and "schema_version 0" in err
    md = out.read_text()
    skipped = md.split("## Skipped files")[1]
    assert all(f"| scenes/I/broken/{name} |" in skipped for name in ("corrupt.json", "foreign.json", "old.json"))
    rows = _rows(md)
    assert {"none", "dpsgd.eps1", "augment.strong"} <= set(rows)
    # header: defense seeds attacks, black box: AUC attack TPR1 TPR01, all attacks: AUC attack TPR1,
    # eps FID KID CLIP Pareto
    # augment.strong (0.90, FID 20) is behind none (0.85, FID 11) on every axis, but with 8 non-members and
    # one shared seed nothing of it is significant: it keeps its star (see the significant-dominance tests).
    assert rows["none"][-1] == "★" and rows["dpsgd.eps1"][-1] == "★" and rows["augment.strong"][-1] == "★"
    assert rows["none"][4] == "pang-wang/threshold"  # worst case over attacks
    assert rows["dpsgd.eps1"][10].startswith("1.00")
    assert "†" in rows["none"][5] and "n₀=8" in rows["none"][5]
    assert "AUC ↓" in md and "CLIP score ↑" in md and "clip-ref" in md
    for link in [line.split("](")[1].rstrip(")") for line in md.splitlines() if "](" in line]:
        assert (out.parent / link).is_file()


def test_mean_and_std_over_two_seeds(results: Path):
    rows = _rows(build(results, plots=False).markdown)
    assert rows["none"][1] == "2"
    assert rows["none"][3].startswith("0.850 ± 0.071")
    assert rows["none"][11].startswith("11.00 ± 1.41")


def test_malicious_defense_name_is_escaped(tmp_path: Path):
    folder = tmp_path / "results"
    evil = "x | y\n| z `code` <script>alert(1)</script>"
    put(folder, make_record(defense="none"))
    record = make_record(defense="none", run_id="evil")
    record.components["defense"] = dataclasses.replace(record.components["defense"], name=evil)
    (folder / "evil.json").write_text(encode(record.to_dict()))
    md = build(folder, plots=False).markdown
    assert "<script>" not in md and "`code`" not in md
    lines = md.splitlines()
    # Once in the headline and once in the scenario's table, each with as many cells as its header.
    rows = [i for i, line in enumerate(lines) if line.startswith("| ") and "x &#124; y" in line]
    assert len(rows) == 2
    for i in rows:
        header = next(line for line in reversed(lines[:i]) if line.startswith(("| defense", "| rank")))
        assert lines[i].count(" | ") == header.count(" | ")
    assert escape("a|b") == "a&#124;b"


def test_feature_networks_are_never_mixed(tmp_path: Path):
    folder = tmp_path / "results"
    put(folder, make_record(defense="none", fid=10.0))
    put(folder, make_record(defense="lora", fid=99.0, network=("inception", "b" * 64)))
    board = build(folder, plots=False)
    assert len(board.tables) == 2
    assert {t.utility_key[0] for t in board.tables} == {"clip-ref", "inception"}


def test_regeneration_is_byte_identical(results: Path, tmp_path: Path):
    first, second = tmp_path / "a" / "LB.md", tmp_path / "b" / "LB.md"
    assert main(["build", "--results-dir", str(results), "--output", str(first)]) == 0
    assert main(["build", "--results-dir", str(results), "--output", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    pngs = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(second.parent) for p in second.parent.rglob("*.png"))
    for p in pngs:
        assert (first.parent / p).read_bytes() == (second.parent / p).read_bytes()


def test_empty_or_missing_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "empty").mkdir()
    assert main(["build", "--results-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "o.md")]) != 0
    assert "no valid result records" in capsys.readouterr().err
    assert main(["build", "--results-dir", str(tmp_path / "missing"), "--output", str(tmp_path / "o.md")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.md").exists()


def test_unwritable_output_is_a_clear_error(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["build", "--results-dir", str(results), "--output", str(blocker / "LB.md"), "--no-plots"]) != 0
    assert "cannot write the leaderboard" in capsys.readouterr().err


def test_pareto_front():
    assert pareto([(0.5, 40.0), (0.9, 10.0), (0.9, 20.0), (0.5, 40.0)]) == [True, True, False, True]


def test_base_model_reference_row_comes_from_the_undefended_control(tmp_path: Path):
    folder = tmp_path / "results"
    for attack_model, control_auc in (("threshold", 0.48), ("distribution", 0.55)):
        record = make_record(defense="none", attack_model=attack_model, auc=0.95, fid=10.0, clip=44.0)
        record.control = dataclasses.replace(record.privacy, auc=control_auc, auc_ci=(0.4, 0.6))
        assert record.utility is not None
        record.utility = dataclasses.replace(
            record.utility, base_model=UtilityFigures(fid=4.5, kid_mean=0.01, kid_std=0.002, clip_score=20.0)
        )
        put(folder, record)
    # A DP record's control is ignored: the reference row is the undefended attack on the base model.
    dp = make_record(defense="dpsgd", preset="eps1", auc=0.5, fid=80.0, clip=4.0, epsilon=1.0)
    dp.control = dataclasses.replace(dp.privacy, auc=0.9)
    put(folder, dp)
    board = build(folder, plots=True)
    rows = _rows(board.markdown)
    base = rows["*base model, not fine-tuned (reference)*"]
    assert base[3].startswith("0.550")  # worst case over the attack models' controls
    assert base[11].startswith("4.50") and base[13].startswith("20.00")
    assert base[-1] == "" and base[5] == "–"  # never on the Pareto front; no TPR for the control
    assert rows["none"][-1] == "★"
    [table] = board.tables
    assert table.rows[-1].reference and not table.rows[-1].pareto
    assert any(name.startswith("leaderboard_plots/tradeoff-") for name in board.plots)


def test_defense_labels() -> None:
    from benchmark.pipeline.records import component_label as defense_label

    assert defense_label({"name": "dpsgd", "preset": "dpsgd.eps8"}) == "dpsgd.eps8"
    assert defense_label({"name": "dpsgd", "preset": "eps8"}) == "dpsgd.eps8"
    composed = {
        "name": "dpsgd+lora",
        "preset": None,
        "config": {"x": 1},
        "components": [{"name": "lora", "preset": "lora.r4"}, {"name": "dpsgd", "preset": "dpsgd.eps8"}],
    }
    assert defense_label(composed) == "dpsgd.eps8+lora.r4"
    composed["components"][0]["preset"] = None
    overridden = defense_label(composed)
    assert overridden.startswith("dpsgd+lora (config ") and overridden != defense_label(
        {**composed, "config": {"x": 2}}
    )


def _gray_box(record: ResultRecord, family: str = "loss") -> ResultRecord:
    """`record` as the gray-box `family`'s: the same figures, another attack (and file)."""
    attack = dataclasses.replace(
        record.attack, family=family, family_version="1", access="gray-box", images_generated=0
    )
    return dataclasses.replace(record, run_id=f"{record.run_id}-{family}", attack=attack)


def test_black_box_and_all_attacks_worst_cases_side_by_side(tmp_path: Path):
    folder = tmp_path / "results"
    # 64 non-members per record: enough for lora.r4's 0.95 against none's 0.90 to be significant (Pareto below).
    record = functools.partial(make_record, n_nonmembers=64)
    # lora.r4 stops the black box (0.55) but not the loss attack (0.95): intervals [0.45, 0.65] < [0.85, 1.0].
    put(folder, record(defense="lora", preset="r4", auc=0.55, tpr1=0.1, fid=12.0, clip=30.0))
    put(folder, _gray_box(record(defense="lora", preset="r4", auc=0.95, tpr1=0.8, fid=12.0, clip=30.0)))
    # dpsgd.eps1 stops both: the loss attack's 0.60 [0.50, 0.70] overlaps the black box's 0.55 [0.45, 0.65].
    put(folder, record(defense="dpsgd", preset="eps1", auc=0.55, fid=40.0, clip=20.0, epsilon=1.0))
    put(folder, _gray_box(record(defense="dpsgd", preset="eps1", auc=0.60, fid=40.0, clip=20.0, epsilon=1.0)))
    # none was only attacked through the black box.
    put(folder, record(defense="none", auc=0.90, fid=10.0, clip=30.0))
    board = build(folder, plots=False)
    md = board.markdown
    header = next(line for line in md.splitlines() if line.startswith("| defense"))
    columns = [c.strip() for c in header.strip("|").split(" | ")]
    assert columns[3:10] == [
        "AUC ↓ black box",
        "worst black-box attack",
        "TPR@1%FPR ↓ black box",
        "TPR@0.1%FPR ↓ black box",
        "AUC ↓ all attacks",
        "worst attack",
        "TPR@1%FPR ↓ all attacks",
    ]
    rows = _rows(md)
    lora, dp, none = rows["lora.r4"], rows["dpsgd.eps1"], rows["none"]
    assert len(lora) == len(columns)
    # Each worst case names the attack behind it as family/attack-model.
    assert lora[2] == "2" and lora[3].startswith("0.550") and lora[4] == "pang-wang/threshold"
    assert lora[7].startswith("0.950") and lora[8] == "loss/threshold"
    assert lora[9].startswith("0.800") and lora[9].endswith("loss/threshold")
    assert dp[7].startswith("0.600") and dp[8] == "loss/threshold"
    # Stops only the black box: non-overlapping intervals; dpsgd's overlap, so no mark.
    assert lora[7].endswith(" ⚠") and "⚠" not in dp[7] and "⚠" not in "".join(none)
    # No gray-box record: not measured, never the black-box figure again.
    assert none[3].startswith("0.900") and none[4] == "pang-wang/threshold"
    assert none[7:10] == ["–", "–", "–"]
    # Pareto on the all-attacks worst case: lora.r4 (0.95, FID 12) is significantly dominated by none
    # (0.90, FID 10), though its black-box 0.55 alone would have put it on the front.
    assert lora[-1] == "" and none[-1] == "★" and dp[-1] == "★"
    [table] = board.tables
    by_name = {r.defense: r for r in table.rows}
    assert by_name["lora.r4"].black_box_only and not by_name["dpsgd.eps1"].black_box_only
    assert by_name["none"].auc_all is None and by_name["none"].auc == by_name["none"].auc_black_box
    assert "⚠ marks a defense that only stops the black-box attack" in md
    assert "no gray-box attack was measured on that defense" in md


def test_a_record_without_utility_joins_its_targets_row(tmp_path: Path):
    """A gray-box run with --no-utility-metrics attacks the target a measured record describes: one row."""
    folder = tmp_path / "results"
    put(folder, make_record(defense="lora", preset="r4", auc=0.55, fid=12.0, clip=30.0))
    put(folder, _gray_box(make_record(defense="lora", preset="r4", auc=0.95, fid=None)))
    # Measured under two feature networks: which table the gray-box record belongs to is unknown.
    put(folder, make_record(defense="none", auc=0.9, fid=10.0, run_id="none-a"))
    put(folder, make_record(defense="none", auc=0.9, fid=11.0, network=("clip-ref", "b" * 64), run_id="none-b"))
    put(folder, _gray_box(make_record(defense="none", auc=0.97, fid=None, run_id="none-gray")))
    tables = build(folder, plots=False).tables
    rows = {(t.utility_key[1][:1], r.defense): r for t in tables for r in t.rows if not r.reference}
    lora = rows["a", "lora.r4"]
    assert lora.auc_all is not None and abs(lora.auc_all - 0.95) < 0.01 and lora.fid == 12.0
    assert rows["a", "none"].auc_all is None and rows["b", "none"].auc_all is None, sorted(rows)
    assert rows["", "none"].auc_all is not None  # left in a table of its own, utility not measured


# ---------------------------------------------------------------- the headline: ranks that survive another seed

REFERENCE_RESULTS = Path(__file__).resolve().parents[1] / "leaderboard" / "reference" / "results"
# The earlier suite: one seed per defense, two feature networks.
SINGLE_SEED_RESULTS = REFERENCE_RESULTS.parent / "single-seed" / "results"
SEEDS = (0, 1, 2)


def _three_seeds(
    folder: Path,
    defense: str,
    preset: str | None,
    aucs: tuple[float, float, float],
    fids: tuple[float, float, float] = (10.0, 10.0, 10.0),
    **changes: Any,
) -> None:
    """One record per seed, 128 non-members each (the reference suite's size); per-seed AUCs and FIDs."""
    for seed, auc, fid in zip(SEEDS, aucs, fids, strict=True):
        put(
            folder,
            make_record(defense=defense, preset=preset, seed=seed, auc=auc, fid=fid, n_nonmembers=128, **changes),
        )


def _headline_rows(headlines: list[Headline], key: str = "a") -> dict[str, HeadlineRow]:
    """The rows of the headline whose feature network's hash starts with `key`, by defense."""
    [headline] = [h for h in headlines if h.utility_key[1].startswith(key)]
    return {r.defense: r for r in headline.rows}


def test_identical_defenses_share_a_rank_and_separated_ones_do_not(tmp_path: Path):
    folder = tmp_path / "results"
    _three_seeds(folder, "dpsgd", "eps1", (0.52, 0.53, 0.51), fids=(30.0, 31.0, 29.0))
    # Two presets whose attacks score every query identically: a difference of exactly 0.
    _three_seeds(folder, "lora", "r4", (0.70, 0.72, 0.74))
    _three_seeds(folder, "lora", "r8", (0.70, 0.72, 0.74))
    _three_seeds(folder, "none", None, (0.97, 0.98, 0.99))
    board = build(folder, plots=False)
    rows = _headline_rows(board.headlines)
    assert [(r.defense, r.rank) for r in board.headlines[0].rows] == [
        ("dpsgd.eps1", 1),
        ("lora.r4", 2),
        ("lora.r8", 2),
        ("none", 4),
    ]
    same = rows["lora.r8"].versus_above
    assert same.value == 0 and not same.significant and same.p_value == 1.0
    for defense in ("lora.r4", "none"):
        step = rows[defense].versus_above
        assert step.significant and step.low > 0 and step.p_value < 0.05
        assert step.method == stats.PAIRED
    md = board.markdown
    assert md.index("## Headline") < md.index("## scenes, scenario I")
    assert "paired bootstrap over seeds and queries, 2,000 resamples, 95%" in md
    line = next(line for line in md.splitlines() if line.startswith("| 2 | lora.r8 |"))
    assert "+0.000 [+0.000, +0.000], p=1" in line


def test_the_headline_aggregates_three_seeds_and_names_the_worst_cell(tmp_path: Path):
    folder = tmp_path / "results"
    # The worst case is scenario III's threshold attack (0.80 on average), not scenario I's or the mlp's.
    _three_seeds(folder, "lora", "r4", (0.70, 0.72, 0.74), scenario="I", fids=(10.0, 11.0, 12.0))
    _three_seeds(folder, "lora", "r4", (0.78, 0.80, 0.82), scenario="III", fids=(10.0, 11.0, 12.0))
    _three_seeds(folder, "lora", "r4", (0.60, 0.61, 0.62), scenario="III", attack_model="mlp", fids=(10.0, 11.0, 12.0))
    board = build(folder, plots=True)
    row = _headline_rows(board.headlines)["lora.r4"]
    assert row.cell == "III / pang-wang/threshold" and row.rank == 1 and row.versus_above is None
    assert row.auc.n_seeds == 3 and row.auc.n_queries == 3 * (250 + 128)
    assert row.auc.method == stats.HIERARCHICAL and row.tpr.method == stats.HIERARCHICAL
    assert row.auc.value == pytest.approx(0.80, abs=1e-3) and row.auc.low < 0.80 < row.auc.high
    assert row.tpr.low <= row.tpr.value <= row.tpr.high and row.tpr_supported and row.n_nonmembers == 128
    # Utility: the target's, once per seed (not once per scenario or attack), with a t interval over seeds.
    low, high = scipy_stats.t.interval(0.95, 2, loc=11.0, scale=scipy_stats.sem([10.0, 11.0, 12.0]))
    assert (row.fid.value, row.fid.n_seeds) == (11.0, 3)
    assert (row.fid.low, row.fid.high) == (pytest.approx(low), pytest.approx(high))
    line = next(line for line in board.markdown.splitlines() if line.startswith("| 1 | lora.r4 |"))
    cells = [c.strip() for c in line.strip("|").split(" | ")]
    assert cells[2] == "III / pang-wang/threshold" and cells[6:8] == ["3", str(3 * 378)]
    assert cells[8] == f"11.00 [{low:.2f}, {high:.2f}]"
    # The scenario tables' rows carry the intervals the trade-off plot draws as error bars.
    [table] = [t for t in board.tables if t.scenario == "III"]
    [lora] = [r for r in table.rows if r.defense == "lora.r4"]
    assert lora.auc_interval is not None and lora.auc_interval[0] < lora.auc < lora.auc_interval[1]
    assert lora.fid_interval == (pytest.approx(low), pytest.approx(high))
    assert any(name.startswith("leaderboard_plots/tradeoff-scenes-III") for name in board.plots)


def test_the_headline_never_mixes_feature_networks(tmp_path: Path):
    folder = tmp_path / "results"
    _three_seeds(folder, "none", None, (0.9, 0.9, 0.9))
    _three_seeds(folder, "lora", "r4", (0.6, 0.6, 0.6), network=("inception", "b" * 64), fids=(50.0, 50.0, 50.0))
    board = build(folder, plots=False)
    assert sorted((h.utility_key[0], [r.defense for r in h.rows]) for h in board.headlines) == [
        ("clip-ref", ["none"]),
        ("inception", ["lora.r4"]),
    ]
    assert _headline_rows(board.headlines, "b")["lora.r4"].fid.value == 50.0


def test_a_star_is_lost_only_to_a_significant_dominance(tmp_path: Path):
    folder = tmp_path / "results"
    # The same attack scores on all three; utility over three seeds decides.
    _three_seeds(folder, "lora", "r1", (0.6, 0.6, 0.6), fids=(10.0, 10.1, 9.9))
    _three_seeds(folder, "lora", "r4", (0.6, 0.6, 0.6), fids=(20.0, 20.2, 19.8))  # FID worse beyond the noise
    _three_seeds(folder, "lora", "r8", (0.6, 0.6, 0.6), fids=(10.5, 9.5, 10.2))  # worse on average, within noise
    board = build(folder, plots=False)
    rows = _headline_rows(board.headlines)
    assert rows["lora.r1"].pareto and rows["lora.r8"].pareto and not rows["lora.r4"].pareto
    [table] = board.tables
    assert {r.defense: r.pareto for r in table.rows} == {"lora.r1": True, "lora.r4": False, "lora.r8": True}


def test_paired_comparison_follows_query_ids_not_positions(tmp_path: Path):
    folder = tmp_path / "results"
    _three_seeds(folder, "lora", "r4", (0.7, 0.7, 0.7))
    # The same scores for the same queries, stored in reverse order: still a difference of exactly 0.
    for seed in SEEDS:
        record = make_record(defense="lora", preset="r8", seed=seed, auc=0.7, n_nonmembers=128)
        attack = record.attack
        reverse = dataclasses.replace(
            attack,
            query_ids=attack.query_ids[::-1],
            labels=attack.labels[::-1],
            scores=attack.scores[::-1],
            membership_scores=attack.membership_scores[::-1],
            predictions=attack.predictions[::-1],
            captions=attack.captions[::-1],
        )
        put(folder, dataclasses.replace(record, attack=reverse))
    rows = _headline_rows(build(folder, plots=False).headlines)
    step = rows["lora.r8"].versus_above
    assert step.value == 0 and step.method == stats.PAIRED and rows["lora.r8"].rank == 1


def test_the_reference_board_builds_and_says_its_intervals_are_query_level(tmp_path: Path):
    out = tmp_path / "LEADERBOARD.md"
    assert main(["build", "--results-dir", str(SINGLE_SEED_RESULTS), "--output", str(out), "--no-plots"]) == 0
    md = out.read_text()
    assert md.index("## Headline") < md.index("## Per scenario")
    assert f"Method here: {stats.QUERY_LEVEL}." in md and "Every defense here has one seed" in md
    headline = md.split("## Headline")[1].split("## Per scenario")[0]
    tables = headline.split("**scenes**")[1:]
    assert len(tables) == 2  # one per feature network
    for block in tables:
        rows = [
            [c.strip() for c in line.strip("|").split(" | ")]
            for line in block.splitlines()
            if line.startswith("| ") and not line.startswith("| rank")
        ]
        ranks = [int(cells[0]) for cells in rows]
        assert ranks and ranks[0] == 1 and ranks == sorted(ranks)
        assert {cells[6] for cells in rows} == {"1"}  # seeds


def test_the_headline_as_a_dataframe(tmp_path: Path):
    from leaderboard import load_headline

    folder = tmp_path / "results"
    _three_seeds(folder, "lora", "r4", (0.70, 0.72, 0.74), fids=(10.0, 11.0, 12.0))
    _three_seeds(folder, "none", None, (0.97, 0.98, 0.99))
    frame = load_headline(folder)
    assert list(frame["defense"]) == ["lora.r4", "none"] and list(frame["rank"]) == [1, 2]
    first = frame.iloc[0]
    assert first["auc.n_seeds"] == 3 and first["auc.ci_low"] < first["auc"] < first["auc.ci_high"]
    assert first["utility.fid"] == 11.0 and first["auc.method"] == stats.HIERARCHICAL
    assert frame.iloc[1]["versus_above.p_value"] < 0.05 and frame.iloc[1]["versus_above.method"] == stats.PAIRED
