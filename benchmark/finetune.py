"""Noise-prediction fine-tuning, as diffusers' train_text_to_image.py does it.

Every flag that changes training is a field of `TrainConfig` and is recorded with
the result; there is no hidden augmentation or caption dropout in the baseline.
A defense changes training only through the hooks of `TrainingHooks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from benchmark.models.diffusion import DiffusionModel


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning (or pretraining) recipe."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    weight_decay: float = 0.0
    caption_dropout: float = 0.0
    train_text_encoder: bool = False
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TrainingState:
    """What the loop trains; defenses may replace any part before training starts."""

    model: DiffusionModel
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    captions: list[str]
    config: TrainConfig
    notes: dict[str, object] = field(default_factory=dict)


@dataclass
class TrainReport:
    steps: int
    epochs_completed: int
    final_loss: float
    loss_history: list[float]
    notes: dict[str, object]


StepCallback = Callable[[int, int, float], None]


def diffusion_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Epsilon-prediction MSE with one noise draw and one timestep per example."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(
        0, model.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    )
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = model.unet(noisy, timesteps, encoder_hidden_states=context).sample
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        target = model.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduction == "mean" else loss


def train(
    model: DiffusionModel,
    images: torch.Tensor,
    captions: list[str],
    config: TrainConfig,
    *,
    on_step: StepCallback | None = None,
) -> TrainReport:
    """Train `model` in place on (images in [-1,1], captions) for `config.epochs` epochs."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("cannot train on an empty set")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.unet.train()
    model.text_encoder.train(config.train_text_encoder)
    model.text_encoder.requires_grad_(config.train_text_encoder)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    if config.train_text_encoder:
        params += list(model.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    latents_all = model.images_to_latents(images)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.lr_warmup_steps))
    )
    # A frozen text encoder gives the same context every epoch: encode once.
    frozen_context = None if config.train_text_encoder else model.encode_text(captions)
    empty_context = None if config.train_text_encoder else model.encode_text([""])
    history: list[float] = []
    step = 0
    loss_value = float("nan")
    for _epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            drop = torch.zeros(len(idx), dtype=torch.bool)
            if config.caption_dropout > 0:
                drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
            if frozen_context is not None and empty_context is not None:
                context = torch.where(drop[:, None, None], empty_context, frozen_context[idx])
            else:
                batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
                tokens = model.tokenizer(
                    batch_captions,
                    padding="max_length",
                    max_length=model.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                context = model.text_encoder(tokens.input_ids)[0]
            loss = diffusion_loss(model, latents_all[idx], context, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            history.append(loss_value)
            step += 1
            if on_step is not None:
                on_step(step, total, loss_value)
    model.unet.eval()
    model.text_encoder.eval()
    model.text_encoder.requires_grad_(False)
    return TrainReport(
        steps=step, epochs_completed=config.epochs, final_loss=loss_value, loss_history=history, notes={}
    )
