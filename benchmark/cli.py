"""Subcommands: `run` (one defended fine-tune + attack + record) and `list` (registries)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attacks.scenarios import Scenario
from benchmark.errors import BenchmarkError, ConfigError
from benchmark.finetune import TrainConfig
from benchmark.target import SamplingConfig

RUN_EXAMPLES = """examples:
  python -m benchmark run --defense none
  python -m benchmark run --defense none --preset full --seed 1
  python -m benchmark run --defense dpsgd.eps8
  python -m benchmark run --defense dpsgd+lora.r4 --defense-arg target_epsilon=4
  python -m benchmark run --model sd15 --model-path ~/models/sd-v1-5 --resolution 512 \\
      --dataset folder --dataset-path ~/data/celeba-dialog
"""


def _add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="fine-tune a target under a defense, attack it, record one result",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="default", help="default | full (1,000 non-members) | micro (smoke test)")
    p.add_argument("--defense", help="defense, preset or composition, e.g. none, dpsgd.eps8, dpsgd+lora (see `list`)")
    p.add_argument(
        "--defense-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a defense setting (repeatable), e.g. target_epsilon=4 or lora.rank=8",
    )
    p.add_argument("--dataset", help="dataset registry name: scenes (embedded) or folder")
    p.add_argument("--dataset-path", type=Path, help="folder with metadata.jsonl for --dataset folder")
    p.add_argument("--dataset-size", type=int, help="use only the first N images of the pool")
    p.add_argument("--resolution", type=int, help="image side in pixels")
    p.add_argument("--model", help="tiny (embedded default) or sd15 (local diffusers folder)")
    p.add_argument("--model-path", type=Path, help="local diffusers folder for --model sd15")
    p.add_argument("--scenario", help="attacker scenario: I or III (II/IV need a captioner)")
    p.add_argument("--attack-model", help="attack model registry name")
    p.add_argument("--encoder", help="image encoder registry name")
    p.add_argument("--distance", help="similarity: cosine, l1, l2, hamming")
    p.add_argument("--members", type=int, help="target members (fine-tuning set size)")
    p.add_argument("--nonmembers", type=int, help="target non-members queried by the attack")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (target and shadow)")
    p.add_argument("--learning-rate", type=float, help="fine-tuning learning rate")
    p.add_argument("--generations", type=int, help="images generated per query (paper: 3)")
    p.add_argument("--inference-steps", type=int, help="DDIM steps per generation")
    p.add_argument("--seed", type=int, help="run seed (splits of the private pool, training, sampling)")
    p.add_argument("--no-control", action="store_true", help="skip attacking the base model")
    p.add_argument("--results-dir", type=Path, help="where result records go (default: results/)")
    p.add_argument("--cache-dir", type=Path, help="cache for base and fine-tuned models (env BENCHMARK_CACHE_DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from benchmark.config import preset

    config = preset(args.preset)
    simple = {
        "defense": args.defense,
        "dataset": args.dataset,
        "dataset_path": args.dataset_path,
        "dataset_size": args.dataset_size,
        "resolution": args.resolution,
        "model": args.model,
        "model_path": args.model_path,
        "attack_model": args.attack_model,
        "encoder": args.encoder,
        "distance": args.distance,
        "members": args.members,
        "nonmembers": args.nonmembers,
        "generations_per_query": args.generations,
        "seed": args.seed,
        "results_dir": args.results_dir,
        "cache_dir": args.cache_dir,
    }
    changes = {k: v for k, v in simple.items() if v is not None}
    if args.scenario is not None:
        try:
            changes["scenario"] = Scenario.parse(args.scenario)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if args.no_control:
        changes["control"] = False
    if args.defense_arg:
        changes["defense_args"] = tuple(_key_value(item) for item in args.defense_arg)
    ft: dict[str, object] = {}
    if args.epochs is not None:
        ft["epochs"] = args.epochs
    if args.learning_rate is not None:
        ft["learning_rate"] = args.learning_rate
    if ft:
        changes["finetune"] = dataclasses.replace(config.finetune, **ft)  # type: ignore[arg-type]
    if args.inference_steps is not None:
        changes["sampling"] = dataclasses.replace(config.sampling, num_inference_steps=args.inference_steps)
    if "members" in changes and args.preset != "micro":
        changes.setdefault("shadow_members", changes["members"])
    return config.replace(**changes)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--defense-arg {item!r} is not KEY=VALUE (e.g. --defense-arg target_epsilon=4)")
    return key.strip(), value


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from benchmark.runner import run

    config = config_from_args(args)
    outcome = run(config, console=console, show_progress=not args.quiet)
    record = outcome.record
    table = Table(title=f"{record.dataset} / scenario {record.scenario} / defense {record.defense}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, metric in record.metrics.items():
        arrow = "↑" if metric.higher_is_better else "↓"
        value = "n/a" if metric.value is None else f"{metric.value:.3f}"
        table.add_row(f"{name} {arrow}", value)
    table.add_row("non-members (TPR@FPR support)", str(record.privacy["n_nonmembers"]))
    for stage, seconds in record.timings_s.items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s")
    console.print(table)
    for note in record.notes:
        console.print("[yellow]note:[/]", escape(note))
    console.print(f"result written to {outcome.path}")
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from attacks.attack_models import ATTACK_MODELS
    from attacks.distances import DISTANCES
    from attacks.encoders import ENCODERS
    from benchmark.config import PRESETS
    from benchmark.data import DATASETS
    from benchmark.models.registry import MODELS
    from benchmark.plugins import component_origin
    from defenses import DEFENSES, presets

    kinds = {
        "datasets": DATASETS,
        "models": MODELS,
        "defenses": DEFENSES,
        "attack models": ATTACK_MODELS,
        "encoders": ENCODERS,
        "distances": DISTANCES,
    }
    for title, registry in kinds.items():
        console.print(f"[bold]{title}[/]")
        for name, entry in registry.items():
            console.print(f"  {name:<12} {_summary(entry)}")
    console.print("[bold]defense presets[/] (name.tag; compose with '+', e.g. dpsgd.eps8+lora.r4)")
    for name, entry in presets().items():
        console.print(f"  {name:<16} {escape(entry.summary())}")
    plugins = [(n, component_origin(DEFENSES, n)) for n in DEFENSES.names()]
    plugins = [(n, origin) for n, origin in plugins if not origin.startswith("diffusion-mia-bench==")]
    if plugins:
        console.print("[bold]defense plugins[/]")
        for name, origin in plugins:
            console.print(f"  {name:<16} from {escape(origin)}")
    console.print("[bold]scenarios[/]")
    for scenario in Scenario:
        console.print(
            f"  {scenario.value:<12} captions: {scenario.caption_source.value}, "
            f"shadow members from target: {scenario.auxiliary_member_overlap:.0%}"
        )
    console.print("[bold]presets[/]")
    for name, cfg in PRESETS.items():
        console.print(f"  {name:<12} {cfg.members} members, {cfg.nonmembers} non-members, {cfg.finetune.epochs} epochs")
    return 0


def _summary(entry: object) -> str:
    doc = inspect.getdoc(entry) or ""
    return doc.splitlines()[0] if doc else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="Membership-inference privacy benchmark for fine-tuned text-to-image diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    sub.add_parser("list", help="list datasets, models, defenses, attack models, encoders, scenarios, presets")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": cmd_run, "list": cmd_list}
    try:
        return handlers[args.command](args, console)
    except BenchmarkError as exc:
        console.print("[red]error:[/]", escape(str(exc)))
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted:[/] no result was written")
        return 130


# TrainConfig and SamplingConfig are part of this module's public surface for tests.
__all__ = ["main", "config_from_args", "TrainConfig", "SamplingConfig"]
if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
