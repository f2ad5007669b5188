"""One benchmark run, end to end: the stages of `benchmark.app.stages` in the order they happen.

A matrix run fine-tunes the target once, reuses each shadow model wherever its
inputs are identical, and scores every shadow and the target once per distinct
caption set: the attack models of a scenario share the same score vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from attacks.scenarios import Scenario
from benchmark.app import stages
from benchmark.app.cell import ROC_SUFFIX, cell_record
from benchmark.app.config import RunConfig
from benchmark.kernel.cache import check_cache_dir, rebuild_log
from benchmark.kernel.compute import use as use_compute
from benchmark.kernel.leftovers import sweep
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.records import TEMP_TAG, ResultRecord, check_writable, write_attachment, write_record


@dataclass
class RunOutcome:
    record: ResultRecord
    path: Path
    plot_path: Path | None = None


def run(config: RunConfig, *, console: Console | None = None, show_progress: bool = True) -> RunOutcome:
    """Run one configuration (one scenario, one attack model) and write its result record.

    Nothing is written unless every stage succeeds, so an interrupted or failed
    run leaves no partial result.
    """
    [outcome] = run_matrix(config, console=console, show_progress=show_progress)
    return outcome


def run_matrix(
    config: RunConfig,
    *,
    scenarios: Sequence[Scenario] | None = None,
    attack_models: Sequence[str] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    written: list[RunOutcome] | None = None,
) -> list[RunOutcome]:
    """Run every (scenario, attack model) cell against one fine-tuned target; one record per cell.

    Every cell is validated before anything is computed. A scenario's records are
    written as soon as its cells are done, so an interrupted matrix keeps the
    scenarios it finished and leaves no partial record.

    Args:
        scenarios: default: `config.scenario` alone.
        attack_models: default: `config.attack_model` alone.
        written: if given, each outcome is appended as soon as its record is on disk, so a
            caller that is interrupted can say which records were kept.
    """
    scenarios = tuple(dict.fromkeys(scenarios or (config.scenario,)))
    attack_models = tuple(dict.fromkeys(attack_models or (config.attack_model,)))
    cells = {(s, a): config.replace(scenario=s, attack_model=a).validate() for s in scenarios for a in attack_models}
    config = cells[(scenarios[0], attack_models[0])]
    check_writable(config.results_dir)
    check_cache_dir(config.cache_path)
    sweep(config.results_dir, TEMP_TAG, recursive=True)
    torch.manual_seed(config.seed)
    outcomes: list[RunOutcome] = []
    # Every network of the run is placed and cast by the active compute settings.
    with use_compute(config.compute), StageTimer(console, show=show_progress) as timer, rebuild_log() as rebuilt:
        # Everything that can fail on bad input happens first, before any training.
        public_size = max(c.public_split_size for c in cells.values())
        data = stages.load_data(config, scenarios, public_size=public_size, timer=timer)
        defense, shadow_defense = stages.defenses(config)
        ctx = stages.RunContext(config=config, timer=timer, data=data, defense=defense, shadow_defense=shadow_defense)
        ctx.base = stages.base_model(ctx)
        target = stages.target(ctx)
        for scenario in scenarios:
            evidence = stages.attack_scenario(ctx, target, scenario, attack_model=attack_models[0])
            records = [cell_record(ctx, target, evidence, cells[(scenario, name)]) for name in attack_models]
            for record, _ in records:
                # A cache entry that failed its content check was rebuilt: the record says so.
                record.notes.extend(rebuilt)
            for record, plot in records:
                # Listed as soon as the record exists: an interrupt between here and the plot keeps it.
                outcome = RunOutcome(record, write_record(record, config.results_dir))
                outcomes.append(outcome)
                if written is not None:
                    written.append(outcome)
                outcome.plot_path = write_attachment(outcome.path, record.run_id, ROC_SUFFIX, plot)
    return outcomes
