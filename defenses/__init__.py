"""Defenses: how a model owner fine-tunes to resist membership inference.

Built-ins: none, dpsgd, lora, augment, early_stop (and compositions such as
dpsgd+lora). Built-in and third-party defenses alike are found through the
`benchmark.defenses` entry-point group on the registry's first use (see
`benchmark.kernel.plugins`). Build one with `resolve`:

    resolve("dpsgd.eps8", {"clipping_norm": "0.5"})
"""

from defenses.base import DEFENSES, ComposedDefense, Defense, DefenseConfig, FineTuneResult, register_defense
from defenses.resolve import DefensePreset, presets, resolve, suite_defenses, valid_combinations

__all__ = [
    "DEFENSES",
    "ComposedDefense",
    "Defense",
    "DefenseConfig",
    "DefensePreset",
    "FineTuneResult",
    "presets",
    "register_defense",
    "resolve",
    "suite_defenses",
    "valid_combinations",
]
