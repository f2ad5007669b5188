"""Defenses: how a model owner fine-tunes to resist membership inference."""

from defenses import none  # noqa: F401  (registers the built-in defenses)
from defenses.base import DEFENSES, Defense, FineTuneResult, register_defense

__all__ = ["DEFENSES", "Defense", "FineTuneResult", "register_defense"]
