"""The defense interface and its registry."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from benchmark.finetune import StepCallback, TrainConfig, TrainReport
from benchmark.models.diffusion import DiffusionModel
from benchmark.registry import Registry


@dataclass(frozen=True)
class DefenseConfig:
    """Base for each defense's frozen, typed knobs."""


@dataclass
class FineTuneResult:
    """What a defended fine-tuning run reports (same shape for every defense)."""

    report: TrainReport
    # Guarantees or settings the defense wants on the record (e.g. epsilon spent).
    details: dict[str, object] = field(default_factory=dict)


class Defense(ABC):
    """Fine-tunes a model under one defense. Subclasses set `name`, `version`, `Config`."""

    name: ClassVar[str] = "?"
    version: ClassVar[str] = "0"
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig

    def __init__(self, config: DefenseConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} expects {self.Config.__name__}, got {type(self.config).__name__}")

    @abstractmethod
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

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "config": dataclasses.asdict(self.config)}


DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(name: str, *, version: str = "1") -> Callable[[type[Defense]], type[Defense]]:
    def decorator(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        cls.version = version
        DEFENSES.add(name, cls, origin=cls.__module__)
        return cls

    return decorator
