"""The defense interface, its registry and its presets.

A defense is a class with a frozen, typed `Config` dataclass, registered with
`@register_defense("name", presets={...})`. Most defenses change training only
through `TrainingHooks` (see `benchmark.pipeline.finetune`): they override
`training_hooks()`, inherit `fine_tune()`, and can then be composed with other
defenses (`dpsgd+lora`). A defense that overrides `fine_tune()` itself works on
its own but cannot be composed. A generation-time defense changes sampling inside
the black box through `SamplingHooks` (`sampling_hooks()`), composed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from benchmark.kernel.compute import Compute
from benchmark.kernel.errors import BenchmarkError, ConfigError, DefenseError
from benchmark.kernel.plugins import component_origin
from benchmark.kernel.registry import Registry
from benchmark.pipeline.finetune import ComposedHooks, StepCallback, TrainConfig, TrainingHooks, TrainReport, train
from benchmark.pipeline.models.diffusion import DiffusionModel
from benchmark.pipeline.models.sampling import ComposedSamplingHooks, SamplingHooks

ENTRY_POINT_GROUP = "benchmark.defenses"


@dataclass(frozen=True)
class DefenseConfig:
    """Base for each defense's frozen, typed knobs; subclasses validate in `__post_init__`."""


@dataclass
class FineTuneResult:
    """What a defended fine-tuning run reports (same shape for every defense)."""

    report: TrainReport
    # Defense name -> what it wants on the record (e.g. epsilon spent); {} when nothing.
    details: dict[str, object] = field(default_factory=dict)


class Defense:
    """Fine-tunes a model under one defense. Subclasses set `Config` and override `training_hooks`.

    Class attributes:
        name, version: set by `register_defense`.
        Config: the frozen dataclass of knobs.
        presets: tag -> field values, declared with `register_defense(..., presets=...)`.
        stage: order of `setup` when composed (lower first; `finish` runs in reverse).
            Wrappers that must see the final parameters (DP-SGD) come last.
        claims: parts of the training or sampling loop the defense takes over; two
            defenses that claim the same part cannot be composed.
    """

    name: ClassVar[str] = "?"
    version: ClassVar[str] = "0"
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    stage: ClassVar[int] = 50
    claims: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: DefenseConfig | None = None, *, preset: str | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} expects {self.Config.__name__}, got {type(self.config).__name__}")
        self.preset = preset

    def training_hooks(self) -> TrainingHooks:
        """Fresh hooks for one fine-tuning run (the default: the plain recipe)."""
        return TrainingHooks()

    def sampling_hooks(self) -> SamplingHooks:
        """Fresh hooks for the fine-tuned model's sampler (the default: plain sampling)."""
        return SamplingHooks()

    def training_identity(self) -> dict[str, object] | None:
        """What of this defense shapes the trained weights (it keys the fine-tune cache).

        None: the defense trains exactly as the plain recipe (it acts at generation only),
        so its fine-tune is shared with `none` at the same recipe and seed.
        """
        return self.describe()

    def recipe(self, train_config: TrainConfig) -> TrainConfig:
        """The recipe `fine_tune` will run with (a defense may bring its own epochs or learning rate)."""
        return self.training_hooks().recipe(train_config)

    def check_compute(self, compute: Compute) -> None:
        """Refuse a device or precision the defense cannot run under, before any work (default: any).

        Raises:
            ConfigError: naming the setting to change.
        """

    def fine_tune(
        self,
        *,
        model: DiffusionModel,
        images: torch.Tensor,
        captions: list[str],
        train_config: TrainConfig,
        on_step: StepCallback | None = None,
    ) -> FineTuneResult:
        """Fine-tune `model` in place on the owner's private (images, captions)."""
        hooks, details = self._run_hooks()
        with _failures_named(self.name):
            report = train(model, images, captions, train_config, on_step=on_step, hooks=hooks)
        return FineTuneResult(report=report, details=details())

    def _run_hooks(self) -> tuple[TrainingHooks, Callable[[], dict[str, object]]]:
        """The hooks of one run, and how to read their details (by defense name) afterwards."""
        hooks = self.training_hooks()

        def details() -> dict[str, object]:
            found = hooks.details()
            return {self.name: found} if found else {}

        return hooks, details

    @classmethod
    def composable(cls) -> bool:
        """Whether the defense works through hooks only, and so composes with others."""
        return cls.fine_tune is Defense.fine_tune

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "preset": self.preset,
            "config": dataclasses.asdict(self.config),
        }


class ComposedDefense(Defense):
    """Several hooks-based defenses in one fine-tuning run (e.g. `dpsgd+lora`, DP-LoRA)."""

    def __init__(self, parts: list[Defense]) -> None:
        if len(parts) < 2:
            raise ValueError("a composed defense needs at least two parts")
        # Setup order: by stage (data and parameter changes before the DP wrapper).
        self.parts = sorted(parts, key=lambda d: (d.stage, d.name))
        self.config = DefenseConfig()
        self.preset = None
        self.name = "+".join(sorted(d.name for d in parts))  # type: ignore[misc]
        self.version = "+".join(d.version for d in sorted(parts, key=lambda d: d.name))  # type: ignore[misc]

    def recipe(self, train_config: TrainConfig) -> TrainConfig:
        for part in self.parts:
            train_config = part.recipe(train_config)
        return train_config

    def sampling_hooks(self) -> SamplingHooks:
        return ComposedSamplingHooks([part.sampling_hooks() for part in self.parts])

    def check_compute(self, compute: Compute) -> None:
        for part in self.parts:
            part.check_compute(compute)

    def training_identity(self) -> dict[str, object] | None:
        parts = [(part.name, part.training_identity()) for part in sorted(self.parts, key=lambda d: d.name)]
        trained = {name: identity for name, identity in parts if identity is not None}
        if not trained:
            return None
        if len(trained) == 1:
            return next(iter(trained.values()))
        return {"composed": trained}

    def _run_hooks(self) -> tuple[TrainingHooks, Callable[[], dict[str, object]]]:
        hooks = [part.training_hooks() for part in self.parts]

        def details() -> dict[str, object]:
            found = {part.name: h.details() for part, h in zip(self.parts, hooks, strict=True)}
            return {k: v for k, v in found.items() if v}

        return ComposedHooks(hooks), details

    def describe(self) -> dict[str, object]:
        components = []
        for part in sorted(self.parts, key=lambda d: d.name):
            origin = component_origin(DEFENSES, part.name) if part.name in DEFENSES else type(part).__module__
            components.append({**part.describe(), "origin": origin})
        return {
            "name": self.name,
            "version": self.version,
            "preset": None,
            "config": {c["name"]: c["config"] for c in components},
            "components": components,
        }


@contextlib.contextmanager
def _failures_named(name: str) -> Iterator[None]:
    """An error inside a defense's training becomes a `DefenseError` naming it and its origin.

    The CLI then reports it in one line (exit 2) instead of a traceback, and the
    runner writes no record; the original exception stays chained as the cause.
    """
    try:
        yield
    except BenchmarkError:
        raise
    except Exception as exc:
        try:
            origin = component_origin(DEFENSES, name)
        except Exception:  # the origin is only decoration here
            origin = "unknown origin"
        raise DefenseError(
            f"defense {name!r} ({origin}) failed while fine-tuning: {type(exc).__name__}: {exc}"
        ) from exc


DEFENSES: Registry[type[Defense]] = Registry("defense", entry_point_group=ENTRY_POINT_GROUP)


def register_defense(
    name: str,
    *,
    version: str = "1",
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    registry: Registry[type[Defense]] | None = None,
) -> Callable[[type[Defense]], type[Defense]]:
    """Register a defense class under `name`, with optional presets `name.tag`.

    Args:
        name: registry name (letters, digits, '_', '-').
        version: bump when the defense's behaviour changes (it keys the model cache).
        presets: tag -> field values, e.g. {"eps8": {"target_epsilon": 8.0}}; each is
            checked by building the config now, so a bad preset fails at import.
        registry: where to register (tests pass a fresh one); default `DEFENSES`.

    Raises:
        RegistryError: the name is taken.
        ConfigError: a preset has unknown fields or invalid values.
    """
    if "+" in name or "." in name:
        raise ValueError(f"invalid defense name {name!r}: '+' composes defenses and '.' starts a preset tag")

    def decorator(cls: type[Defense]) -> type[Defense]:
        checked: dict[str, dict[str, Any]] = {}
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        for tag, values in (presets or {}).items():
            if not tag or not tag.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"invalid preset tag {tag!r} for defense {name!r}")
            unknown = sorted(set(values) - fields)
            if unknown:
                raise ConfigError(
                    f"preset {name}.{tag} sets unknown field(s) {', '.join(unknown)}; "
                    f"valid: {', '.join(sorted(fields))}"
                )
            cls.Config(**values)  # validates
            checked[tag] = dict(values)
        cls.name = name
        cls.version = version
        cls.presets = checked
        (registry if registry is not None else DEFENSES).add(name, cls, origin=cls.__module__)
        return cls

    return decorator
