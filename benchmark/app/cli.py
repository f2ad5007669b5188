"""Subcommands: `run` (one defended fine-tune + attack + record), `suite` (grid of runs) and `list`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attacks.attack import AttackConfig
from attacks.attack_models import ATTACK_MODELS, for_family
from attacks.captioners import CAPTIONERS
from attacks.distances import DISTANCES
from attacks.encoders import ENCODERS
from attacks.families import ATTACK_FAMILIES, AttackFamily, AttackFamilyError
from attacks.scenarios import QueryAccess, Scenario
from benchmark.app.compact import compact
from benchmark.app.compare import ALPHA, CORRECTION, MARGIN, RESAMPLES, UTILITY_MARGIN, compare, render, write_json
from benchmark.app.config import PROFILES, RunConfig, profile
from benchmark.app.executors import (
    DEFAULT_EXECUTOR,
    DEFAULT_UNIT_RETRIES,
    RAY_INSTALL,
    ExecutorOptions,
    build_executor,
)
from benchmark.app.flags import add_config_flags, apply, given
from benchmark.app.migrate import migrate
from benchmark.app.plan import show_plan
from benchmark.app.reproduce import MIN_DEFENSE_DOF, Tolerance, reproduce
from benchmark.app.runner import RunOutcome, run_matrix
from benchmark.app.suite import Executor, SuiteSpec, run_suite
from benchmark.kernel.convert import convert
from benchmark.kernel.errors import BenchmarkError, ConfigError
from benchmark.kernel.interrupts import interrupted, watch_interrupts
from benchmark.kernel.plugins import component_origin
from benchmark.pipeline.data import DATASETS
from benchmark.pipeline.finetune import TrainConfig
from benchmark.pipeline.models.registry import MODELS
from benchmark.pipeline.records import SCHEMA_VERSION, RecordError, ResultRecord, read_record, record_files
from benchmark.pipeline.target import SamplingConfig
from defenses import DEFENSES, presets, suite_defenses

RUN_EXAMPLES = """examples:
  python -m benchmark run --defense none
  python -m benchmark run --defense none --profile full --seed 1
  python -m benchmark run --defense dpsgd.eps8
  python -m benchmark run --defense dpsgd+lora.r4 --defense-arg target_epsilon=4
  python -m benchmark run --model sd15 --model-path ~/models/sd-v1-5 --resolution 512 \\
      --dataset folder --dataset-path ~/data/celeba-dialog
  python -m benchmark run --defense none --scenario all --attack-model all
  python -m benchmark run --scenario II --attack-model classifier --no-captioner-finetune
  python -m benchmark run --query-access img2img --strength 0.3 --shadow naive
  python -m benchmark run --encoder hf --encoder-path ~/models/deit-base-patch16-224
  python -m benchmark run --clip-model ~/models/clip-vit-large-patch14 --fid-weights ~/models/pt_inception.pth
"""


CONFIG_DEFAULTS_NOTE = (
    "Every setting of the run is a flag; defaults shown are the default profile's (--profile micro or full "
    "changes many). Nested settings are named by their path in the record's config, e.g. --finetune.epochs."
)


# The run's configuration is every field of RunConfig, one flag each (benchmark.app.flags).
# Fields listed here are set another way by the subcommand, by the hand-written flags below.
RUN_SETS_OTHERWISE = ("scenario", "attack_model")  # --scenario / --attack-model: one, a list, or all
SUITE_SETS_OTHERWISE = ("defense", "seed", "scenario", "attack_model")  # the grid: --defenses, --seeds, ...


def _config_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help_text: str,
    examples: str,
    sets_otherwise: tuple[str, ...],
) -> argparse.ArgumentParser:
    """A subcommand whose flags are the run configuration's fields, less those it sets another way."""
    p = sub.add_parser(
        name,
        help=help_text,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=CONFIG_DEFAULTS_NOTE,
    )
    p.set_defaults(config_flags=add_config_flags(p, RunConfig, exclude=sets_otherwise))
    return p


def _add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _config_parser(
        sub, "run", "fine-tune a target under a defense, attack it, record one result", RUN_EXAMPLES, RUN_SETS_OTHERWISE
    )
    # Not part of the run's configuration: how many cells to run, and how to show them.
    other = p.add_argument_group("cells and output (not part of the run's configuration)")
    other.add_argument(
        "--scenario", help="attacker scenario I, II, III or IV; 'all' or a list (I,III) runs several (default: III)"
    )
    other.add_argument(
        "--attack-model",
        help="threshold, distribution or classifier; 'all' or a list runs several (default: threshold)",
    )
    other.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_argument(other)


SUITE_EXAMPLES = """examples:
  python -m benchmark suite                                  # every preset x scenario x attack model, seed 0
  python -m benchmark suite --defenses none,dpsgd.eps8 --seeds 0,1,2
  python -m benchmark suite --scenarios III --attack-models threshold --results-dir my-results
  python -m benchmark suite --plan --defenses none,dpsgd.eps8 --seeds 0,1,2   # what it would do, and how long
  # resumable: run the same command again to finish an interrupted suite;
  # two suites on one --results-dir (e.g. one per core) split the work between them
  python -m benchmark suite --executor ray --ray-address 10.0.0.5:6379 --gpus-per-unit 1   # docs/cluster.md
"""


def _add_suite_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _config_parser(
        sub,
        "suite",
        "run every defense preset x scenario x attack model x seed (resumable)",
        SUITE_EXAMPLES,
        SUITE_SETS_OTHERWISE,
    )
    # Not part of the run's configuration: the grid's axes, and how to report.
    grid = p.add_argument_group("the grid and output (not part of the run's configuration)")
    grid.add_argument("--defenses", default="all", help="'all' (none + every registered preset) or a comma list")
    grid.add_argument("--scenarios", default="all", help="'all' or a comma list of I, II, III, IV")
    grid.add_argument("--attack-models", default="all", help="'all' or a comma list of threshold, distribution, ...")
    grid.add_argument("--seeds", default="0", help="comma list of run seeds")
    grid.add_argument("--summary", type=Path, help="also write the suite's summary (cells, stage times) as JSON here")
    grid.add_argument(
        "--plan",
        action="store_true",
        help="only print what the suite would do (cells, fine-tunes, steps, images, estimated time) and write it "
        "to --summary; nothing is trained or written",
    )
    grid.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_argument(grid)
    _add_executor_arguments(p)


def _add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where the suite's units run (benchmark.app.executors); None marks a flag not given."""
    where = p.add_argument_group("where units run (not part of the run's configuration; docs/cluster.md)")
    where.add_argument(
        "--executor",
        default=DEFAULT_EXECUTOR,
        help="local: every (defense, seed) unit in this process, one after another; ray: each unit as a Ray "
        f"task (needs `{RAY_INSTALL}`), on nodes that share --results-dir and --cache-dir (default: %(default)s)",
    )
    where.add_argument(
        "--ray-address",
        help="HOST:PORT of a running Ray cluster's head (`ray start --head` prints it), or auto for the one "
        "started on this machine; default: $RAY_ADDRESS, else a Ray instance started here for the suite",
    )
    where.add_argument(
        "--cpus-per-unit",
        type=float,
        help="CPUs each unit's Ray task reserves, also its torch threads unless --threads (default: 1)",
    )
    where.add_argument(
        "--gpus-per-unit", type=float, help="GPUs each unit's Ray task reserves; 0.5 shares one (default: 0)"
    )
    where.add_argument(
        "--unit-retries",
        type=int,
        help=f"times Ray reruns a unit that failed or whose worker died, then reports it failed "
        f"(default: {DEFAULT_UNIT_RETRIES})",
    )


def _executor_from_args(args: argparse.Namespace) -> Executor:
    """The suite's executor, checked (flags, Ray installed, address reachable) before any unit runs."""
    options = ExecutorOptions(
        ray_address=args.ray_address,
        cpus_per_unit=args.cpus_per_unit,
        gpus_per_unit=args.gpus_per_unit,
        unit_retries=args.unit_retries,
        threads=args.threads,
    )
    return build_executor(args.executor, options)


def _add_threads_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice); 1 per process when several share a small machine",
    )


def _set_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def suite_spec_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]

    config = config_from_args(args)
    names = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if names == ["all"]:
        names = suite_defenses()
    if not names:
        raise ConfigError("--defenses is empty; give 'all' or a comma list such as none,dpsgd.eps8")
    scenarios, attack_models = cells_from_args(
        argparse.Namespace(scenario=args.scenarios, attack_model=args.attack_models), config.attack
    )
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r} is not a comma list of integers (e.g. 0,1,2)") from None
    if not seeds or not scenarios or not attack_models:
        raise ConfigError("--seeds, --scenarios and --attack-models need at least one value each")
    return SuiteSpec(
        config=config,
        defenses=tuple(dict.fromkeys(names)),
        scenarios=scenarios,
        attack_models=attack_models,
        seeds=seeds,
    )


def _check_summary(path: Path) -> None:
    """Before any cell runs: the summary can be written where --summary says (it is written last).

    Raises:
        ConfigError: naming the path and the fix.
    """
    fix = "pass a writable file path to --summary"
    if path.is_dir():
        raise ConfigError(f"--summary {path} is a folder; {fix}, e.g. {path / 'summary.json'}")
    folder = path.parent
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".probe-", dir=folder):
            pass
        if path.exists():
            with open(path, "a"):
                pass
    except OSError as exc:
        raise ConfigError(f"--summary {path} cannot be written ({exc.strerror or exc}); {fix}") from None
    finally:
        for made in missing:  # a check leaves nothing behind; the folder is made again when the summary is written
            try:
                made.rmdir()
            except OSError:
                pass


def cmd_suite(args: argparse.Namespace, console: Console) -> int:
    import json

    spec = suite_spec_from_args(args)
    if args.summary is not None:
        _check_summary(args.summary)
    if args.plan:
        return show_plan(spec, console=console, summary=args.summary, executor=args.executor)
    executor = _executor_from_args(args)
    n_cells = len(spec.defenses) * len(spec.seeds) * len(spec.scenarios) * len(spec.attack_models)
    console.print(
        f"suite: {len(spec.defenses)} defense(s) x {len(spec.scenarios)} scenario(s) x "
        f"{len(spec.attack_models)} attack model(s) x {len(spec.seeds)} seed(s) = {n_cells} cells "
        f"-> {spec.config.results_dir}"
    )
    report = run_suite(spec, console=console, show_progress=not args.quiet, executor=executor)
    table = Table(title=f"suite: {len(report.written)} written, {report.skipped} already done")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = sum(report.stage_seconds.values()) or 1.0
    for stage, seconds in sorted(report.stage_seconds.items(), key=lambda kv: -kv[1]):
        table.add_row(stage, f"{seconds:.0f}", f"{seconds / total:.0%}")
    table.add_row("wall clock", f"{report.wall_seconds:.0f}", "")
    console.print(table)
    for label, seconds in report.unit_seconds.items():
        console.print(f"  {escape(label)}: {seconds:.0f} s")
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    for label, error in report.failed:
        console.print(f"[red]failed:[/] {escape(label)}: {escape(error)}")
    return 1 if report.failed else 0


REPRODUCE_EXAMPLES = """examples:
  python -m benchmark reproduce results/scenes/III/mydefense.v1/20261126T120000Z-mydefense.v1-s0-abc123.json
  python -m benchmark reproduce RECORD --cache-dir /tmp/empty-cache     # nothing reused from earlier runs
  python -m benchmark reproduce RECORD --auc-tolerance 0.05
  python -m benchmark reproduce RECORD --tolerances-from leaderboard/reference/results   # from its seed spread
exit code: 0 every figure within tolerance, 1 some figure outside it, 2 the record cannot be run here
"""


def _add_reproduce_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]

    t = Tolerance()
    p = sub.add_parser(
        "reproduce",
        help="re-run the configuration of stored records and check their figures within a tolerance",
        epilog=REPRODUCE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("records", nargs="+", type=Path, help="result record files (JSON)")
    p.add_argument("--cache-dir", type=Path, help="model cache (an empty folder gives an independent check)")
    p.add_argument("--results-dir", type=Path, help="keep the recomputed records here (default: discarded)")
    p.add_argument(
        "--tolerances-from",
        type=Path,
        help="a records folder with repeated seeds: each tolerance is 2.77 x the seed-to-seed standard deviation "
        "of its figure there (the 95%% range of two draws), pooled over the cells of the record's own defense "
        f"configuration when they give {MIN_DEFENSE_DOF} or more degrees of freedom, else over the whole "
        "folder; FID and CLIP score count each seed's value once; flags below still override",
    )
    p.add_argument("--auc-tolerance", type=float, help=f"absolute (default {t.auc})")
    p.add_argument("--balanced-accuracy-tolerance", type=float, help=f"absolute (default {t.balanced_accuracy})")
    p.add_argument("--fid-tolerance", type=float, help=f"relative (default {t.fid_relative})")
    p.add_argument("--clip-tolerance", type=float, help=f"relative (default {t.clip_score_relative})")
    p.add_argument("--epsilon-tolerance", type=float, help=f"relative (default {t.epsilon_relative})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_argument(p)


def cmd_reproduce(args: argparse.Namespace, console: Console) -> int:

    given = {
        "auc": args.auc_tolerance,
        "balanced_accuracy": args.balanced_accuracy_tolerance,
        "fid_relative": args.fid_tolerance,
        "clip_score_relative": args.clip_tolerance,
        "epsilon_relative": args.epsilon_tolerance,
    }
    values = {k: v for k, v in given.items() if v is not None}
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(f"tolerance {name} must be >= 0, got {value}")
    # The folder is read once; each record's tolerances are measured on its own defense's spread.
    seeded = _records_under(args.tolerances_from) if args.tolerances_from is not None else None
    failed = 0
    for path in args.records:
        stored = read_record(path)
        tolerance = Tolerance()
        if seeded is not None:
            tolerance = _measured_tolerance(args.tolerances_from, seeded, stored, path, console)
        tolerance = dataclasses.replace(tolerance, **values)
        result = reproduce(
            path,
            cache_dir=args.cache_dir,
            results_dir=args.results_dir,
            tolerance=tolerance,
            console=console,
            show_progress=not args.quiet,
            record=stored,
        )
        table = Table(title=f"{path.name}: {'reproduced' if result.ok else 'NOT reproduced'}")
        for column in ("figure", "stored", "recomputed", "difference", "allowed", ""):
            table.add_column(column, justify="left" if column == "figure" else "right")
        for c in result.comparisons:
            if c.stored is None and c.recomputed is None:
                continue
            diff = "n/a" if c.stored is None or c.recomputed is None else f"{c.recomputed - c.stored:+.4f}"
            table.add_row(
                c.metric,
                "n/a" if c.stored is None else f"{c.stored:.4f}",
                "n/a" if c.recomputed is None else f"{c.recomputed:.4f}",
                diff,
                f"±{c.allowed:.4f}",
                "ok" if c.ok else "[red]outside[/]",
            )
        table.add_row(
            "members and non-members", "", "", "", "identical", "ok" if result.same_data else "[red]differ[/]"
        )
        console.print(table)
        if result.environment:
            console.print(
                "this machine differs from the record's (figures may move with it): " + "; ".join(result.environment)
            )
        failed += not result.ok
    return 1 if failed else 0


COMPARE_EXAMPLES = """examples:
  python -m benchmark compare new-results/ baseline-results/        # folder against folder, cell by cell
  python -m benchmark compare new-results/ baseline/ --json compare.json --privacy-only
  python -m benchmark compare new.json old.json --ignore defense_args   # a new recipe against the old one
exit code: 0 no significant regression, 1 a significant privacy (or utility) regression, 2 bad input
"""


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "compare",
        help="compare two sets of records cell by cell; exit 1 on a significant privacy or utility regression",
        description="Records are matched by cell (the whole configuration but the seed); within a cell, attack "
        "AUC and TPR@1%FPR are compared with a hierarchical bootstrap over seeds and queries (paired where seeds "
        "and queries agree), FID and CLIP score with a t-test over seeds. Each test is one-sided against a margin "
        "(a smaller change is no change), and the p-values of all cells are adjusted together (Holm by default).",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("new", type=Path, help="the new records: a record file or a folder of them")
    p.add_argument("old", type=Path, help="the baseline records: a record file or a folder of them")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"test level (default {ALPHA}); intervals are 95%%")
    p.add_argument(
        "--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples, seeded (default {RESAMPLES})"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=MARGIN,
        help=f"a change in attack AUC or TPR of at most this is no change (default {MARGIN})",
    )
    p.add_argument(
        "--utility-margin",
        type=float,
        default=UTILITY_MARGIN,
        help=f"the same for FID and CLIP score, in their units (default {UTILITY_MARGIN:g})",
    )
    p.add_argument(
        "--correction",
        default=CORRECTION,
        help="adjust the p-values of all tests together: holm (family-wise error, default), bh "
        "(Benjamini-Hochberg, false discovery rate) or none",
    )
    p.add_argument("--privacy-only", action="store_true", help="utility regressions are shown but do not fail")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="SETTING",
        help="leave a setting out of the cell match (repeatable; nested ones dotted, e.g. finetune.epochs)",
    )
    p.add_argument("--json", type=Path, help="also write the comparison as JSON here (for CI)")


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    if args.json is not None and args.json.is_dir():
        raise ConfigError(f"--json {args.json} is a folder; pass a file path, e.g. {args.json / 'compare.json'}")
    report = compare(
        args.new,
        args.old,
        alpha=args.alpha,
        resamples=args.resamples,
        privacy_only=args.privacy_only,
        ignore=tuple(args.ignore),
        margin=args.margin,
        utility_margin=args.utility_margin,
        correction=args.correction,
    )
    render(report, console)
    if args.json is not None:
        write_json(report, args.json)
    return 1 if report.failed else 0


def _records_under(folder: Path) -> list[ResultRecord]:
    """The readable records under `folder` (unreadable files are left out)."""
    if not folder.is_dir():
        raise ConfigError(f"--tolerances-from {folder} is not a folder; pass a results folder with several seeds")
    records = []
    for path in record_files(folder):
        try:
            records.append(read_record(path))
        except RecordError:
            continue
    return records


def _measured_tolerance(
    folder: Path, records: list[ResultRecord], like: ResultRecord, path: Path, console: Console
) -> Tolerance:
    """Tolerances for the record `like` (read from `path`) from the seed spread of `records` (read from `folder`)."""
    tolerance = Tolerance.from_seed_spread(records, like=like)
    if not tolerance.basis:
        console.print(f"{folder}: no cell with two or more seeds; using the fixed default tolerances")
    else:
        console.print(f"{path.name}: tolerances from the seed spread in {folder}")
    for metric, basis in tolerance.basis.items():
        utility = metric in ("fid", "clip_score")
        where = "over the record's defense" if basis["scope"] == "defense" else "pooled over the folder"
        # A utility figure is the target's: its groups are defense configurations, one value per seed.
        cells = f"{basis['cells']} {'configurations' if utility else 'cells'}"
        console.print(
            f"{metric}: seed-to-seed sd {basis['sd']:.4f}{' (of the log)' if utility else ''}"
            f" {where}: {cells}, {basis['records']} records"
        )
    return tolerance


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The profile named by --profile with every other configuration flag given applied.

    Raises:
        ConfigError: an unknown profile or a value of the wrong type (validation comes later).
    """
    settings = given(args, args.config_flags)
    config = profile(settings.pop("profile", "default"))
    if "members" in settings and config.profile != "micro":
        # Target and shadow train on equally many members unless told otherwise.
        settings.setdefault("shadow_members", settings["members"])
    if hasattr(args, "scenario"):  # run's --scenario / --attack-model: the first cell (suite's grid sets its own)
        scenarios, attack_models = cells_from_args(args, str(settings.get("attack", config.attack)))
        if scenarios:
            settings["scenario"] = scenarios[0]
        if attack_models:
            settings["attack_model"] = attack_models[0]
    return apply(config, settings)


def cells_from_args(args: argparse.Namespace, family: str) -> tuple[tuple[Scenario, ...], tuple[str, ...]]:
    """Scenarios and attack models named by --scenario / --attack-model ('all', one, or a comma list).

    'all' attack models means those that read attack family `family`'s features.
    Empty tuples mean "the configuration's".
    """

    scenarios: tuple[Scenario, ...] = ()
    attack_models: tuple[str, ...] = ()
    if args.scenario is not None:
        if args.scenario.strip().lower() == "all":
            scenarios = tuple(Scenario)
        else:
            try:
                scenarios = tuple(convert(part, Scenario) for part in args.scenario.split(",") if part.strip())
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    if args.attack_model is not None:
        if args.attack_model.strip().lower() == "all":
            attack_models = tuple(for_family(family))
        else:
            attack_models = tuple(part.strip() for part in args.attack_model.split(",") if part.strip())
    return scenarios, attack_models


def cmd_run(args: argparse.Namespace, console: Console) -> int:

    config = config_from_args(args)
    scenarios, attack_models = cells_from_args(args, config.attack)
    written: list[RunOutcome] = []
    try:
        outcomes = run_matrix(
            config,
            scenarios=scenarios or None,
            attack_models=attack_models or None,
            console=console,
            show_progress=not args.quiet,
            written=written,
        )
    except KeyboardInterrupt:
        # Say what is on disk: records of the cells that finished before the interrupt are kept.
        if written:
            console.print(
                f"[red]interrupted:[/] kept {len(written)} finished record(s); the other cells wrote nothing:"
            )
            for outcome in written:
                console.print(f"  {escape(str(outcome.path))}")
        else:
            console.print("[red]interrupted:[/] no result was written")
        raise
    if len(outcomes) > 1:
        _print_matrix(outcomes, console)
        return 0
    [outcome] = outcomes
    record = outcome.record
    table = Table(title=f"{record.dataset} / scenario {record.scenario} / defense {record.defense}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for figure in record.figures():
        arrow = "↑" if figure.higher_is_better else "↓"
        table.add_row(f"{figure.name} {arrow}", _fmt(figure.value))
    table.add_row("non-members (TPR@FPR support)", str(record.privacy.n_nonmembers))
    for stage, seconds in record.timings_s.items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s")
    console.print(table)
    for note in record.notes:
        console.print("[yellow]note:[/]", escape(note))
    console.print(f"result written to {outcome.path}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_matrix(outcomes: list, console: Console) -> None:  # type: ignore[type-arg]
    first = outcomes[0].record
    table = Table(title=f"{first.dataset} / defense {first.defense}: one record per (scenario, attack model)")
    for column in ("scenario", "attack model", "AUC [95% CI]", "TPR@1%FPR", "bal. acc.", "control AUC", "baseline AUC"):
        table.add_column(column, justify="left" if column in ("scenario", "attack model") else "right")
    for outcome in outcomes:
        record = outcome.record
        privacy, control, baseline = record.privacy, record.control, record.baseline
        ci = f" [{privacy.auc_ci[0]:.2f}, {privacy.auc_ci[1]:.2f}]" if privacy.auc_ci else ""
        tpr1 = next((t.tpr for t in privacy.tpr_at_fpr if t.target_fpr == 0.01), None)
        table.add_row(
            record.scenario,
            record.attack.attack_model,
            f"{_fmt(privacy.auc)}{ci}",
            _fmt(tpr1),
            _fmt(privacy.balanced_accuracy),
            _fmt(control.auc if control is not None else None),
            _fmt(baseline.auc if baseline is not None else None),
        )
    console.print(table)
    for outcome in outcomes:
        console.print(f"result written to {outcome.path}")


def cmd_list(args: argparse.Namespace, console: Console) -> int:

    kinds = {
        "datasets": DATASETS,
        "models": MODELS,
        "defenses": DEFENSES,
        "attack models": ATTACK_MODELS,
        "encoders": ENCODERS,
        "distances": DISTANCES,
        "captioners": CAPTIONERS,
    }
    for title, registry in kinds.items():
        console.print(f"[bold]{title}[/]")
        for name, entry in registry.items():
            console.print(f"  {name:<12} {escape(_summary(entry) + _note(registry, name))}")
    console.print("[bold]defense presets[/] (name.tag; compose with '+', e.g. dpsgd.eps8+lora.r4)")
    for name, entry in presets().items():
        console.print(f"  {name:<16} {escape(entry.summary())}")
    _list_attacks(console)
    plugins = [
        (t, n, component_origin(r, n)) for t, r in {**kinds, "attacks": ATTACK_FAMILIES}.items() for n in r.names()
    ]
    plugins = [(t, n, origin) for t, n, origin in plugins if not origin.startswith("diffusion-mia-bench==")]
    if plugins:
        console.print("[bold]plugins[/]")
        for title, name, origin in plugins:
            console.print(f"  {title:<14} {name:<16} from {escape(origin)}")
    console.print("[bold]scenarios[/]")
    for scenario in Scenario:
        console.print(
            f"  {scenario.value:<12} captions: {scenario.caption_source.value}, "
            f"shadow members from target: {scenario.auxiliary_member_overlap:.0%}"
        )
    console.print("[bold]profiles[/] (run sizes: --profile NAME)")
    for name, cfg in PROFILES.items():
        console.print(f"  {name:<12} {cfg.members} members, {cfg.nonmembers} non-members, {cfg.finetune.epochs} epochs")
    return 0


def _note(registry: object, name: str) -> str:
    """What `list` adds to an entry's summary: a defense's claims, the families an attack model is limited to."""
    if registry is DEFENSES:
        # Two defenses that claim the same part of the loop cannot be composed: say which parts.
        return f" (claims: {', '.join(sorted(DEFENSES.get(name).claims)) or 'nothing'})"
    if registry is ATTACK_MODELS:
        families = ATTACK_MODELS.capability(name, "families")
        return "" if families is None else f" (only with --attack {', '.join(sorted(families))})"
    return ""


def _list_attacks(console: Console) -> None:
    """Each attack family with the access it needs and what one query costs (at the default profile's
    generations and sampling: a black box's cost is the provider's sampling)."""
    run = PROFILES["default"]
    console.print(
        "[bold]attacks[/] (families: --attack NAME; cost per query at the default profile's sampling: "
        "images generated, UNet calls)"
    )
    for name, cls in ATTACK_FAMILIES.items():
        family = cls()
        costs = [_access_cost(family, run, access) for access in QueryAccess]
        usable = "; ".join(cost for cost in costs if cost is not None)
        console.print(f"  {name:<12} {escape(usable)}")
        console.print(f"  {'':<12} {escape(_summary(cls))}")


def _access_cost(family: AttackFamily, run: RunConfig, query_access: QueryAccess) -> str | None:
    """What one query of `family` through `query_access` costs, as "access: N images, M UNet calls";
    None where the family cannot run through it."""
    try:
        access = family.access(query_access)
    except AttackFamilyError:
        return None
    config = AttackConfig(
        generations_per_query=run.generations_per_query, query_access=query_access, strength=run.img2img_strength
    )
    cost = family.cost_per_query(config, run.sampling)
    return f"{access.value}: {cost.images_generated} images, {cost.unet_calls} UNet calls"


def _summary(entry: object) -> str:
    doc = inspect.getdoc(entry) or ""
    return doc.splitlines()[0] if doc else ""


def _quiet_library_chatter() -> None:
    """Library notices that say nothing about the run would bury the progress display."""
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
    warnings.filterwarnings("ignore", message=".*`max_length` is ignored when `padding`.*")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (tests read its flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="Membership-inference privacy benchmark for fine-tuned text-to-image diffusion models.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Read by main() wherever it stands (before or after the subcommand); declared here for --help.
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_suite_parser(sub)
    _add_reproduce_parser(sub)
    _add_compare_parser(sub)
    sub.add_parser(
        "list",
        help="list datasets, models, defenses (with their claims) and their presets, attack families (access, "
        "cost per query), attack models, encoders, scenarios, profiles",
    )
    p = sub.add_parser(
        "migrate",
        help=f"upgrade result records in place to schema version {SCHEMA_VERSION}",
        epilog="example:\n  python -m benchmark migrate leaderboard/reference/results",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="folder of result records (searched recursively)")
    p = sub.add_parser(
        "compact",
        help="rewrite every *.json result record in place as a compacted *.json.xz (a quarter of the size; "
        "every reader reads both)",
        epilog="example:\n  python -m benchmark compact leaderboard/reference/results\n"
        "  xz -dk RECORD.json.xz     # the plain record back, byte for byte",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="folder of result records (searched recursively)")
    return parser


def cmd_migrate(args: argparse.Namespace, console: Console) -> int:
    report = migrate(args.folder)
    console.print(
        f"{len(report.upgraded)} record(s) upgraded to schema {SCHEMA_VERSION}, {len(report.current)} already current"
    )
    return 0


def cmd_compact(args: argparse.Namespace, console: Console) -> int:
    report = compact(args.folder)
    before, after = report.bytes_before, report.bytes_after
    share = f" ({after / before:.0%})" if before else ""
    console.print(
        f"{len(report.compacted)} record(s) compacted, {len(report.already_compact)} already compact; "
        f"{before:,} bytes before, {after:,} after{share}",
        soft_wrap=True,
    )
    return 0


EXIT_CODES = """exit codes: 0 done; 1 a failure (suite: some cell failed; reproduce: a figure outside its tolerance;
  compare: a significant regression; any command: an unexpected error, shown in one line, --debug for the
  traceback); 2 bad input (flags, files, folders: the message names the problem and the fix); 130 interrupted
"""


def _debug_flag(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """`--debug` anywhere before a `--` (before or after the subcommand), and the arguments without it."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    return debug, [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]


def _unexpected(exc: Exception, console: Console, *, debug: bool) -> int:
    """An error no check foresaw: one line naming it (the traceback only with --debug); exit code 1."""
    if debug:
        console.print_exception()
    message = " ".join(str(exc).split()) or "(no message)"
    if len(message) > 500:
        message = message[:500] + "..."
    console.print(
        f"[red]error:[/] {escape(type(exc).__name__)}: {escape(message)} (run with --debug for the traceback)",
        soft_wrap=True,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    debug, argv = _debug_flag(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_library_chatter()
    handlers = {
        "run": cmd_run,
        "suite": cmd_suite,
        "reproduce": cmd_reproduce,
        "compare": cmd_compare,
        "list": cmd_list,
        "migrate": cmd_migrate,
        "compact": cmd_compact,
    }
    try:
        with watch_interrupts():
            _set_threads(args)
            code = handlers[args.command](args, console)
            if not interrupted():
                return code
            # A library swallowed the interrupt and the command ran on: it still did not finish as asked.
            raise KeyboardInterrupt
    except BenchmarkError as exc:
        if debug:
            console.print_exception()
        console.print("[red]error:[/]", escape(str(exc)), soft_wrap=True)
        return 2
    except Exception as exc:  # the safety net: each bad input has its own check, this catches the rest
        return _unexpected(exc, console, debug=debug)
    except KeyboardInterrupt:
        if args.command == "suite":
            console.print("[red]interrupted:[/] finished cells are kept; run the same command again to resume")
        elif args.command != "run":  # run says itself which records it kept
            console.print("[red]interrupted[/]")
        return 130


# TrainConfig and SamplingConfig are part of this module's public surface for tests.
__all__ = ["main", "build_parser", "config_from_args", "TrainConfig", "SamplingConfig"]
if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
