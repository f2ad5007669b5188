"""Defenses: how a model owner fine-tunes to resist membership inference."""

from defenses.base import DEFENSES, Defense, FineTuneResult, register_defense
from defenses import none  # noqa: F401  (registers the built-in defenses)

__all__ = ["DEFENSES", "Defense", "FineTuneResult", "register_defense"]
