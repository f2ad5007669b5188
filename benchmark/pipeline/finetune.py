"""Noise-prediction fine-tuning, as diffusers' train_text_to_image.py does it.

Every flag that changes training is a field of `TrainConfig` and is recorded with
the result; there is no hidden augmentation or caption dropout in the baseline.
A defense changes training only through the hooks of `TrainingHooks`; the default
hooks are the plain recipe, so `train(...)` without hooks is the `none` defense.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.convert import SEED_RANGE
from benchmark.pipeline.models.diffusion import DiffusionModel


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning (or pretraining) recipe."""

    epochs: int = field(metadata={"help": "passes over the training set", "min": 1})
    batch_size: int = field(metadata={"help": "examples per optimizer step", "min": 1})
    learning_rate: float = field(metadata={"help": "AdamW learning rate", "above": 0})
    seed: int = field(
        default=0,
        metadata={"help": "seeds training noise, batch order and a defense's changes to the data", **SEED_RANGE},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0})
    caption_dropout: float = field(
        default=0.0,
        metadata={"help": "fraction of captions replaced by the empty caption (for guidance)", "min": 0, "below": 1},
    )
    train_text_encoder: bool = field(default=False, metadata={"help": "also train the text encoder"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warm-up", "min": 0})
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "clip the gradient to this norm (None: no clipping)", "above": 0}
    )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class TrainingState:
    """What the loop trains; hooks may replace any part in `TrainingHooks.setup`.

    `model.unet` may be replaced by a wrapper (a PEFT model, an Opacus
    GradSampleModule) for the duration of training, as long as the hook that
    wrapped it restores a plain `UNet2DConditionModel` in `finish`.
    """

    model: DiffusionModel
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    captions: list[str]
    config: TrainConfig
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    notes: dict[str, object] = field(default_factory=dict)
    # fp16 only: scales the loss so small gradients survive, and unscales before the step.
    grad_scaler: torch.amp.GradScaler | None = None

    def make_optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The recipe's optimizer (AdamW, its learning rate and weight decay) over `parameters`."""
        return torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)


@dataclass
class TrainReport:
    steps: int
    epochs_completed: int
    final_loss: float
    loss_history: list[float]
    notes: dict[str, object]


StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class NoisedStep:
    """One batch's noised latents, timesteps and the UNet's (detached) prediction of them."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    prediction: torch.Tensor


class TrainingHooks:
    """The points where a defense may change training. Every default is the plain recipe.

    Order of calls in `train`: `recipe` and `training_data` once, `setup` once (after the
    default parameters and optimizer exist), then per epoch `batches`, and per
    batch `captions` (only where `transforms_captions`), `context`, `transform`,
    `screen` (only where `screens_examples`), `backward` and `optimizer_step` (or
    `empty_batch_step`), then `end_epoch`; finally `finish`, and `details` for the record.
    """

    #: whether `transform` changes images (then latents are computed per batch).
    transforms_images: bool = False
    #: whether `captions` changes captions (then the text is encoded per batch).
    transforms_captions: bool = False
    #: whether `screen` may drop examples from a step's loss.
    screens_examples: bool = False

    def recipe(self, config: TrainConfig) -> TrainConfig:
        """The training recipe this defense runs with (e.g. DP-SGD's own learning rate and epochs)."""
        return config

    def training_data(self, images: torch.Tensor, captions: list[str], *, seed: int) -> tuple[torch.Tensor, list[str]]:
        """The part of the owner's data that is trained on (e.g. minus a validation hold-out)."""
        return images, captions

    def setup(self, state: TrainingState) -> None:
        """Replace the trained parameters, the optimizer or the UNet (wrapping it) before training."""

    def batches(self, state: TrainingState) -> Iterator[torch.Tensor]:
        """Index batches for one epoch: a fresh shuffle cut into `batch_size` pieces."""
        order = torch.randperm(len(state.images), generator=state.generator)
        for start in range(0, len(order), state.config.batch_size):
            yield order[start : start + state.config.batch_size]

    def transform(self, images: torch.Tensor, state: TrainingState) -> torch.Tensor:
        """Per-batch image transform (images in [-1, 1], NCHW), applied before encoding."""
        return images

    def captions(self, captions: list[str], state: TrainingState) -> list[str]:
        """Per-batch caption transform, before caption dropout; called only where `transforms_captions`."""
        return captions

    def context(self, context: torch.Tensor, state: TrainingState) -> torch.Tensor:
        """Per-batch change to the text context (batch, tokens, width) the UNet is conditioned on."""
        return context

    def screen(self, step: NoisedStep, state: TrainingState) -> torch.Tensor:
        """Per-example weight (N,) of this step's loss, 1 to train on an example and 0 to drop it."""
        return torch.ones(len(step.noisy), device=step.noisy.device)

    def backward(self, losses: torch.Tensor, state: TrainingState) -> None:
        """Gradients of the batch's mean loss from its per-example `losses` (N,); fp16 scales the loss first."""
        loss = losses.mean()
        (loss if state.grad_scaler is None else state.grad_scaler.scale(loss)).backward()

    def optimizer_step(self, state: TrainingState) -> bool:
        """Update after `backward()`; return whether a (logical) optimizer step was taken."""
        scaler = state.grad_scaler
        if scaler is not None:
            scaler.unscale_(state.optimizer)
        if state.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(state.parameters, state.config.max_grad_norm)
        if scaler is None:
            state.optimizer.step()
            return True
        scale = scaler.get_scale()
        scaler.step(state.optimizer)
        scaler.update()
        # The scaler skips the update on inf/NaN gradients and lowers its scale: no step was taken,
        # so the schedule and the step count must not advance.
        return scaler.get_scale() >= scale

    def empty_batch_step(self, state: TrainingState) -> bool:
        """An empty batch (possible only with Poisson sampling); the plain recipe never makes one."""
        return False

    def end_epoch(self, state: TrainingState) -> bool:
        """Called after each epoch; return True to stop training."""
        return False

    def finish(self, state: TrainingState) -> None:
        """Undo wrappers so that `state.model` is a plain, saveable model again."""

    def details(self) -> dict[str, object]:
        """What the defense wants on the record (JSON-serialisable, finite numbers)."""
        return {}


class ComposedHooks(TrainingHooks):
    """Several hooks in one loop. At most one of them may take over sampling and stepping.

    `setup` runs in the given order, `finish` in reverse (the last wrapper is
    removed first), `transform`, `captions` and `context` chain, and training stops when any `end_epoch`
    asks for it (every one is still called, so each sees every epoch).
    """

    def __init__(self, hooks: list[TrainingHooks]) -> None:
        self.hooks = list(hooks)
        self.transforms_images = any(h.transforms_images for h in self.hooks)
        self.transforms_captions = any(h.transforms_captions for h in self.hooks)
        self.screens_examples = any(h.screens_examples for h in self.hooks)
        self._stepper = self._owner("optimizer_step")
        self._backward = self._owner("backward")
        self._sampler = self._owner("batches")
        self._empty = self._owner("empty_batch_step")

    def _owner(self, method: str) -> TrainingHooks:
        owners = [h for h in self.hooks if getattr(type(h), method) is not getattr(TrainingHooks, method)]
        if len(owners) > 1:
            names = ", ".join(type(h).__name__ for h in owners)
            raise ValueError(f"only one defense may override TrainingHooks.{method}; got {names}")
        return owners[0] if owners else TrainingHooks()

    def recipe(self, config: TrainConfig) -> TrainConfig:
        for hook in self.hooks:
            config = hook.recipe(config)
        return config

    def training_data(self, images: torch.Tensor, captions: list[str], *, seed: int) -> tuple[torch.Tensor, list[str]]:
        for hook in self.hooks:
            images, captions = hook.training_data(images, captions, seed=seed)
        return images, captions

    def setup(self, state: TrainingState) -> None:
        for hook in self.hooks:
            hook.setup(state)

    def batches(self, state: TrainingState) -> Iterator[torch.Tensor]:
        return self._sampler.batches(state)

    def transform(self, images: torch.Tensor, state: TrainingState) -> torch.Tensor:
        for hook in self.hooks:
            images = hook.transform(images, state)
        return images

    def captions(self, captions: list[str], state: TrainingState) -> list[str]:
        for hook in self.hooks:
            if hook.transforms_captions:
                captions = hook.captions(captions, state)
        return captions

    def context(self, context: torch.Tensor, state: TrainingState) -> torch.Tensor:
        for hook in self.hooks:
            context = hook.context(context, state)
        return context

    def screen(self, step: NoisedStep, state: TrainingState) -> torch.Tensor:
        weights = torch.ones(len(step.noisy), device=step.noisy.device)
        for hook in self.hooks:
            if hook.screens_examples:
                weights = weights * hook.screen(step, state)
        return weights

    def backward(self, losses: torch.Tensor, state: TrainingState) -> None:
        self._backward.backward(losses, state)

    def optimizer_step(self, state: TrainingState) -> bool:
        return self._stepper.optimizer_step(state)

    def empty_batch_step(self, state: TrainingState) -> bool:
        return self._empty.empty_batch_step(state)

    def end_epoch(self, state: TrainingState) -> bool:
        stops = [hook.end_epoch(state) for hook in self.hooks]
        return any(stops)

    def finish(self, state: TrainingState) -> None:
        for hook in reversed(self.hooks):
            hook.finish(state)

    def details(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for hook in self.hooks:
            out.update(hook.details())
        return out


def diffusion_loss(
    model: DiffusionModel,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    *,
    reduction: str = "mean",
    screen: Callable[[NoisedStep], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE with one noise draw and one timestep per example.

    `screen` (a defense's) weighs each example's loss from the step's own prediction;
    a dropped example keeps its place in the batch, so the mean (and a DP-SGD
    per-example gradient) is still over the whole batch.
    """
    # Drawn on the CPU's generator, then moved: a seed names the same noise on every device.
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(
        0, model.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(latents.device)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    with current_compute().autocast():
        prediction = model.unet(noisy, timesteps, encoder_hidden_states=context).sample
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        target = model.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if screen is not None:
        loss = loss * screen(NoisedStep(noisy, timesteps, prediction.detach())).to(loss)
    return loss.mean() if reduction == "mean" else loss


def train(
    model: DiffusionModel,
    images: torch.Tensor,
    captions: list[str],
    config: TrainConfig,
    *,
    on_step: StepCallback | None = None,
    hooks: TrainingHooks | None = None,
) -> TrainReport:
    """Train `model` in place on (images in [-1,1], captions) for up to `config.epochs` epochs.

    Args:
        model: trained in place; after `hooks.finish` its UNet is a plain diffusers UNet again.
        images: NCHW in [-1, 1].
        captions: one per image.
        config: the recipe.
        on_step: called after each optimizer step with (step, expected total, loss).
        hooks: a defense's changes to the recipe (default: none).
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("cannot train on an empty set")
    hooks = hooks if hooks is not None else TrainingHooks()
    config = hooks.recipe(config)
    compute = current_compute()
    model.place(compute)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, captions = hooks.training_data(images, captions, seed=config.seed)
    model.unet.train()
    checkpointing = compute.gradient_checkpointing and getattr(model.unet, "_supports_gradient_checkpointing", False)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.text_encoder.train(config.train_text_encoder)
    model.text_encoder.requires_grad_(config.train_text_encoder)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    if config.train_text_encoder:
        params += list(model.text_encoder.parameters())
    state = TrainingState(
        model=model,
        parameters=params,
        optimizer=torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay),
        images=images,
        captions=captions,
        config=config,
        generator=generator,
        grad_scaler=compute.grad_scaler(),
    )
    try:
        hooks.setup(state)
        report = _loop(state, hooks, on_step)
    except BaseException:
        # Unwrap even on failure (the caller's model must not stay wrapped), but
        # report the original error, not a follow-on one from a half-set-up hook.
        with contextlib.suppress(Exception):
            hooks.finish(state)
        raise
    else:
        hooks.finish(state)
    finally:
        if checkpointing:
            model.unet.disable_gradient_checkpointing()
        model.unet.eval()
        model.text_encoder.eval()
        model.text_encoder.requires_grad_(False)
    report.notes.update(state.notes)
    return report


def _loop(state: TrainingState, hooks: TrainingHooks, on_step: StepCallback | None) -> TrainReport:
    model, config, generator, optimizer = state.model, state.config, state.generator, state.optimizer
    images, captions = state.images, state.captions
    latents_all = None if hooks.transforms_images else model.images_to_latents(images)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.lr_warmup_steps))
    )
    # A frozen text encoder gives the same context every epoch: encode once (unless
    # a defense changes the captions per step).
    encode_per_batch = config.train_text_encoder or hooks.transforms_captions
    frozen_context = None if encode_per_batch else model.encode_text(captions)
    empty_context = None if encode_per_batch else model.encode_text([""])
    history: list[float] = []
    epochs_completed = 0
    loss_value = float("nan")
    # Per-example losses of the physical batches that make up one logical step
    # (several under a memory manager); one batch per step in the plain recipe.
    pending: list[torch.Tensor] = []
    for epoch in range(config.epochs):
        state.epoch = epoch
        for idx in hooks.batches(state):
            if len(idx) == 0:
                stepped = hooks.empty_batch_step(state)
            else:
                drop = torch.zeros(len(idx), dtype=torch.bool)
                if config.caption_dropout > 0:
                    drop = torch.rand(len(idx), generator=generator) < config.caption_dropout
                if frozen_context is not None and empty_context is not None:
                    context = torch.where(
                        drop[:, None, None].to(frozen_context.device), empty_context, frozen_context[idx]
                    )
                else:
                    batch_captions = [captions[i] for i in idx.tolist()]
                    if hooks.transforms_captions:
                        batch_captions = hooks.captions(batch_captions, state)
                    batch_captions = ["" if d else c for c, d in zip(batch_captions, drop.tolist(), strict=True)]
                    with torch.set_grad_enabled(config.train_text_encoder):
                        context = model.text_context(batch_captions)
                context = hooks.context(context, state)
                if latents_all is not None:
                    latents = latents_all[idx]
                else:
                    latents = model.images_to_latents(hooks.transform(images[idx], state))
                screen = partial(hooks.screen, state=state) if hooks.screens_examples else None
                losses = diffusion_loss(model, latents, context, generator, reduction="none", screen=screen)
                optimizer.zero_grad(set_to_none=True)
                hooks.backward(losses, state)
                pending.append(losses.detach())
                stepped = hooks.optimizer_step(state)
            if not stepped:
                continue
            scheduler.step()
            if pending:
                loss_value = float(pending[0].mean() if len(pending) == 1 else torch.cat(pending).mean())
                history.append(loss_value)
            pending = []
            state.step += 1
            if on_step is not None:
                on_step(state.step, total, loss_value)
        epochs_completed = epoch + 1
        if hooks.end_epoch(state):
            break
    return TrainReport(
        steps=state.step,
        epochs_completed=epochs_completed,
        final_loss=loss_value,
        loss_history=history,
        notes={},
    )
