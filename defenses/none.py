"""No defense: the standard fine-tuning recipe, every flag on the record."""

from __future__ import annotations

from defenses.base import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    """Plain noise-prediction fine-tuning (no augmentation, clipping or noise)."""

    # The default hooks are the plain recipe of benchmark.pipeline.finetune.train.
