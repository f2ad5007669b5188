"""LoRA, augmentation and early stopping do what they claim; a composed defense applies both parts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from benchmark.pipeline.finetune import TrainConfig, TrainingState, train
from benchmark.pipeline.models.diffusion import load_model
from defenses import resolve
from defenses.augment import AugmentConfig, AugmentHooks, colour_jitter, horizontal_flip, random_crop
from defenses.early_stop import EarlyStopConfig, EarlyStopHooks, holdout_split
from defenses.lora import LoRAConfig, LoRAHooks

PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


@pytest.fixture(scope="module")
def data(scene_captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    from benchmark.pipeline.data.base import images_to_tensor
    from benchmark.pipeline.data.scenes import ScenesDataset

    dataset = ScenesDataset(resolution=8, size=60)
    return images_to_tensor([dataset.image(i) for i in range(8)]), scene_captions[:8]


# -- LoRA --------------------------------------------------------------------------------


def test_lora_trains_only_adapter_weights(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, object] = {}

    class Spy(LoRAHooks):
        def finish(self, state: TrainingState) -> None:  # look before the merge
            named = dict(state.model.unet.named_parameters())
            seen["trainable"] = sorted(n for n, p in named.items() if p.requires_grad)
            seen["base"] = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
            seen["optimized"] = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
            seen["adapters"] = {id(p) for n, p in named.items() if "lora_" in n}
            super().finish(state)

    model = load_model(tiny_model_dir)
    original = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    hooks = Spy(LoRAConfig(rank=2))
    train(model, *data, TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2), hooks=hooks)
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])  # type: ignore[union-attr]
    assert seen["optimized"] == seen["adapters"]
    for name, value in seen["base"].items():  # type: ignore[union-attr]
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, original[plain]), f"base weight {plain} changed before the merge"
    # After the merge: a plain UNet, same parameter names, only the adapted projections moved.
    assert type(model.unet) is UNet2DConditionModel
    merged = dict(model.unet.named_parameters())
    assert set(merged) == set(original)
    changed = {n for n, p in merged.items() if not torch.equal(p, original[n])}
    assert changed and all(n.endswith(PROJECTIONS) for n in changed)
    details = hooks.details()
    rank = 2
    expected = sum(
        rank * (m.in_features + m.out_features)
        for n, m in model.unet.named_modules()
        if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    )
    assert details["trainable_parameters"] == expected
    assert details["adapted_layers"] == len(changed) and details["merged"] is True


# -- augmentation ------------------------------------------------------------------------


def test_transforms_are_per_example_and_seeded() -> None:
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    config = AugmentConfig(transforms=("hflip", "crop", "jitter"), flip_probability=1.0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(horizontal_flip(images, config, gen), images.flip(-1))
    never = AugmentConfig(flip_probability=0.0)
    assert torch.equal(horizontal_flip(images, never, gen), images)
    cropped = random_crop(images, config, torch.Generator().manual_seed(1))
    assert cropped.shape == images.shape
    # Each crop is a window of the reflect-padded image.
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    for i in range(4):
        windows = [padded[i, :, y : y + 8, x : x + 8] for y in range(3) for x in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    jittered = colour_jitter(images, config, torch.Generator().manual_seed(2))
    assert jittered.shape == images.shape and jittered.min() >= -1 and jittered.max() <= 1
    again = colour_jitter(images, config, torch.Generator().manual_seed(2))
    assert torch.equal(jittered, again)
    # Per-example parameters: the same image in two slots is jittered differently.
    twin = torch.stack([images[0], images[0]])
    out = colour_jitter(twin, config, torch.Generator().manual_seed(3))
    assert not torch.allclose(out[0], out[1])


def test_augment_transforms_every_training_batch(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    seen: list[torch.Tensor] = []

    class Spy(AugmentHooks):
        def transform(self, images: torch.Tensor, state: TrainingState) -> torch.Tensor:
            out = super().transform(images, state)
            seen.append((out - images).abs().amax(dim=(1, 2, 3)))
            return out

    hooks = Spy(AugmentConfig(transforms=("hflip", "jitter"), flip_probability=1.0))
    report = train(
        load_model(tiny_model_dir), *data, TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3), hooks=hooks
    )
    assert len(seen) == report.steps == 4
    assert all(bool((d > 0).all()) for d in seen), "every image of every batch is transformed"
    details = hooks.details()
    assert details["transforms"] == ["hflip", "jitter"] and details["images_transformed"] == 16
    assert set(details["parameters"]) == {"hflip", "jitter"}  # type: ignore[arg-type]


# -- early stopping ----------------------------------------------------------------------


def test_early_stopping_stops_on_rising_validation_loss_and_restores_best(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    scripted = iter([1.1, 1.0, 0.8, 0.9, 0.95, 1.2, 1.3, 1.4, 1.5])  # first: before fine-tuning
    snapshots: list[list[torch.Tensor]] = []

    class Scripted(EarlyStopHooks):
        def validation_loss(self, state: TrainingState) -> float:
            snapshots.append([p.detach().clone() for p in state.parameters])
            return next(scripted)

    model = load_model(tiny_model_dir)
    hooks = Scripted(EarlyStopConfig(patience=2, validation_fraction=0.25))
    report = train(model, *data, TrainConfig(epochs=8, batch_size=6, learning_rate=1e-3), hooks=hooks)
    details = hooks.details()
    assert report.epochs_completed == 4 == details["epochs_run"]  # best at 2, no gain at 3 and 4
    assert details["stopped_early"] is True and details["best_epoch"] == 2 and details["restored_best"] is True
    assert details["validation_loss"] == [1.0, 0.8, 0.9, 0.95] and details["validation_loss_before"] == 1.1
    best = snapshots[2]
    for p, expected in zip(model.unet.parameters(), best, strict=True):
        assert torch.equal(p.detach(), expected)
    assert details["validation_examples"] == 2 and details["train_examples"] == 6
    assert report.steps == 4 * 1  # 6 training examples, batch 6: the held-out two are never trained on


def test_early_stopping_gives_back_the_base_model_when_no_epoch_beats_it(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    scripted = iter([0.5, 0.9, 0.8, 0.7, 0.6])

    class Scripted(EarlyStopHooks):
        def validation_loss(self, state: TrainingState) -> float:
            return next(scripted)

    model = load_model(tiny_model_dir)
    before = [p.detach().clone() for p in model.unet.parameters()]
    hooks = Scripted(EarlyStopConfig(patience=3, validation_fraction=0.25))
    report = train(model, *data, TrainConfig(epochs=8, batch_size=6, learning_rate=1e-2), hooks=hooks)
    details = hooks.details()
    assert report.epochs_completed == 3 and details["best_epoch"] == 0 and details["restored_best"] is True
    for p, expected in zip(model.unet.parameters(), before, strict=True):
        assert torch.equal(p.detach(), expected)


def test_early_stopping_on_a_constructed_overfitting_case(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    """Held-out examples reuse a trained caption with the colour-inverted image: the more the
    model learns the trained image for that caption, the worse it does on the held-out one."""
    images, captions = data[0].clone(), list(data[1])
    kept, held_out = holdout_split(len(images), 0.25, seed=0)
    for source, target in zip(kept, held_out, strict=False):
        images[target], captions[target] = -images[source], captions[source]
    # No warm-up: the case is built to overfit within a few steps at this learning rate.
    hooks = EarlyStopHooks(EarlyStopConfig(validation_fraction=0.25, patience=2, validation_draws=8, warmup_steps=0))
    report = train(
        load_model(tiny_model_dir),
        images,
        captions,
        TrainConfig(epochs=12, batch_size=6, learning_rate=1e-2),
        hooks=hooks,
    )
    details = hooks.details()
    assert details["held_out_member_positions"] == held_out
    assert details["stopped_early"] is True and report.epochs_completed < 12
    losses = details["validation_loss"]
    assert losses[-1] > details["best_validation_loss"] == min(losses)  # type: ignore[operator]


def test_early_stopping_restores_a_later_step_where_the_loss_falls(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    """On an untrained model every owner's held-out loss falls: the defense must not hand back
    the weights it started from (version 1 did, on the embedded default, for every patience)."""
    model = load_model(tiny_model_dir)
    before = [p.detach().clone() for p in model.unet.parameters()]
    hooks = EarlyStopHooks(EarlyStopConfig(validation_fraction=0.25))  # the defaults: warm-up, 16 draws
    report = train(model, *data, TrainConfig(epochs=30, batch_size=6, learning_rate=3e-3), hooks=hooks)
    details = hooks.details()
    assert details["best_step"] >= 1 and details["best_validation_loss"] < details["validation_loss_before"]  # type: ignore[operator]
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.unet.parameters(), before, strict=True))
    assert report.steps == details["steps_run"] and details["warmup_steps"] == 100


def test_early_stopping_counts_patience_in_steps_and_can_keep_the_last_weights(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    scripted = iter([1.0, 0.9, 0.8, 0.85, 0.9, 0.95, 1.0])  # first: before fine-tuning
    snapshots: list[list[torch.Tensor]] = []

    class Scripted(EarlyStopHooks):
        def validation_loss(self, state: TrainingState) -> float:
            snapshots.append([p.detach().clone() for p in state.parameters])
            return next(scripted)

    model = load_model(tiny_model_dir)
    hooks = Scripted(EarlyStopConfig(patience=4, validation_fraction=0.25, restore_best=False))
    # 6 trained examples in batches of 3: two steps per epoch, so a patience of 4 steps is 2 epochs.
    report = train(model, *data, TrainConfig(epochs=8, batch_size=3, learning_rate=1e-3), hooks=hooks)
    details = hooks.details()
    assert details["validation_steps"] == [2, 4, 6, 8] and details["best_step"] == 4
    assert report.steps == 8 and details["stopped_early"] is True and details["restored_best"] is False
    for p, kept in zip(model.unet.parameters(), snapshots[-1], strict=True):
        assert torch.equal(p.detach(), kept)


def test_early_stopping_warms_up_its_own_recipe_only() -> None:
    plain = TrainConfig(epochs=600, batch_size=32, learning_rate=3e-3)
    assert resolve("early_stop").recipe(plain).lr_warmup_steps == 100
    assert resolve("early_stop").recipe(dataclasses.replace(plain, lr_warmup_steps=300)).lr_warmup_steps == 300
    assert resolve("none").recipe(plain) == plain
    # The composition keeps the other part's caps and adds the warm-up.
    composed = resolve("dpsgd.eps8+early_stop.best").recipe(plain)
    assert composed.lr_warmup_steps == 100 and composed.epochs < plain.epochs


def test_early_stopping_presets_keep_different_models() -> None:
    configs = [resolve(f"early_stop.{tag}").config for tag in resolve("early_stop").presets]
    assert len(set(configs)) == len(configs) >= 2
    # Restoring the best step, patience changes the model only on a curve with several dips (on
    # the default every patience restored step 7), so one preset restores and the others keep
    # the weights at the stop.
    assert sum(c.restore_best for c in configs) == 1


def test_validation_loss_uses_fixed_noise(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    hooks = EarlyStopHooks(EarlyStopConfig())
    model = load_model(tiny_model_dir)
    images, captions = hooks.training_data(*data, seed=0)
    state = TrainingState(
        model=model,
        parameters=[],
        optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
        images=images,
        captions=captions,
        config=TrainConfig(epochs=1, batch_size=4, learning_rate=0.1),
        generator=torch.Generator(),
    )
    assert hooks.validation_loss(state) == hooks.validation_loss(state)


# -- composition -------------------------------------------------------------------------


def test_composed_defense_applies_both(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    model = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    result = resolve("augment.flip+lora.r4").fine_tune(
        model=model,
        images=data[0],
        captions=data[1],
        train_config=TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2),
    )
    assert set(result.details) == {"augment", "lora"}
    assert result.details["augment"]["images_transformed"] == 16  # augment ran
    assert result.details["lora"]["merged"] is True  # lora ran
    changed = {k for k, v in model.unet.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith(PROJECTIONS) for k in changed)  # only adapters were trained
