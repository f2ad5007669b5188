"""Decoupled weight decay (AdamW's) as a defense: a minimal diffusion-mia-bench plugin.

Weight decay pulls the fine-tuned weights back toward zero, a weak regulariser
against memorising members. The point of this package is the plugin mechanics:
a frozen, typed config validated in `__post_init__`, presets declared beside the
defense, hooks that compose with the built-ins (`dpsgd+weight_decay`), and an
entry point in its own pyproject.toml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.finetune import TrainingHooks, TrainingState
from defenses import Defense, DefenseConfig, register_defense

__version__ = "0.1.0"


@dataclass(frozen=True)
class WeightDecayConfig(DefenseConfig):
    """AdamW weight decay applied to the trained parameters."""

    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")


class WeightDecayHooks(TrainingHooks):
    def __init__(self, config: WeightDecayConfig) -> None:
        self.config = config
        self.parameters = 0

    def setup(self, state: TrainingState) -> None:
        # The recipe's optimizer holds whatever is trained (lora, set up earlier, swaps in
        # its adapters); dpsgd, set up later, wraps this optimizer.
        for group in state.optimizer.param_groups:
            group["weight_decay"] = self.config.weight_decay
        self.parameters = sum(p.numel() for p in state.parameters)

    def details(self) -> dict[str, object]:
        return {"weight_decay": self.config.weight_decay, "decayed_parameters": self.parameters}


@register_defense("weight_decay", version=__version__, presets={"wd01": {"weight_decay": 0.1}})
class WeightDecay(Defense):
    """Decoupled weight decay on the fine-tuned parameters (example plugin)."""

    Config = WeightDecayConfig
    stage = 40
    claims = frozenset({"weight decay"})

    def training_hooks(self) -> TrainingHooks:
        return WeightDecayHooks(self.config)
