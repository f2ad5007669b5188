"""No defense: the standard fine-tuning recipe, every flag on the record."""

from __future__ import annotations

import torch

from benchmark.finetune import StepCallback, TrainConfig, train
from benchmark.models.diffusion import DiffusionModel
from defenses.base import Defense, FineTuneResult, register_defense


@register_defense("none")
class NoDefense(Defense):
    """Plain noise-prediction fine-tuning (no augmentation, clipping or noise)."""

    def fine_tune(
        self,
        *,
        model: DiffusionModel,
        images: torch.Tensor,
        captions: list[str],
        train_config: TrainConfig,
        on_step: StepCallback | None = None,
    ) -> FineTuneResult:
        return FineTuneResult(report=train(model, images, captions, train_config, on_step=on_step))
