"""Data augmentation during fine-tuning: named image transforms, drawn per example and per step.

Augmentation makes the model see a slightly different image each epoch, which
should blunt memorisation of the exact member image. Transforms are torch ops on
NCHW batches in [-1, 1] (torchvision is not a dependency), each example gets its
own random parameters (so the transform never mixes examples, which DP-SGD
needs), and the random stream is seeded from the recipe's seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.finetune import TrainingHooks, TrainingState
from defenses.base import Defense, DefenseConfig, register_defense

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig(DefenseConfig):
    """Which transforms to apply, in order, and their strengths."""

    transforms: tuple[str, ...] = ("hflip",)
    flip_probability: float = 0.5
    # Random crop after reflect padding by this fraction of the side (0.125: 2 px at 16 px).
    crop_padding: float = 0.125
    # Colour jitter: factors drawn uniformly from [1 - s, 1 + s] per example.
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown or not self.transforms:
            raise ConfigError(
                f"augment transforms {', '.join(unknown) or '(empty)'} not known; "
                f"choose from {', '.join(TRANSFORMS)} (comma-separated)"
            )
        if len(set(self.transforms)) != len(self.transforms):
            raise ConfigError(f"augment transforms list a transform twice: {', '.join(self.transforms)}")
        if not (0 <= self.flip_probability <= 1):
            raise ConfigError(f"augment flip_probability must be in [0, 1], got {self.flip_probability}")
        if not (0 <= self.crop_padding < 0.5):
            raise ConfigError(f"augment crop_padding is a fraction of the side in [0, 0.5), got {self.crop_padding}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"augment {name} must be in [0, 1), got {value}")


def horizontal_flip(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator) < cfg.flip_probability
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = images.shape
    pad = min(max(1, round(cfg.crop_padding * min(h, w))), min(h, w) - 1) if cfg.crop_padding > 0 else 0
    if pad == 0:
        return images
    # Reflect, not zeros: a black border is an artefact the model would learn.
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # n, h, 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # n, 1, w
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def colour_jitter(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    n = len(images)

    def factors(strength: float) -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(n, generator=generator) - 1))[:, None, None, None]

    x = (images + 1) / 2
    x = (x * factors(cfg.brightness)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factors(cfg.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = sum(weight * x[:, c : c + 1] for c, weight in enumerate(_LUMA))
        x = ((x - gray) * factors(cfg.saturation) + gray).clamp(0, 1)
    return x * 2 - 1


Transform = Callable[[torch.Tensor, AugmentConfig, torch.Generator], torch.Tensor]
TRANSFORMS: dict[str, Transform] = {"hflip": horizontal_flip, "crop": random_crop, "jitter": colour_jitter}


class AugmentHooks(TrainingHooks):
    transforms_images = True

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        self.images_transformed = 0
        self.generator = torch.Generator()

    def setup(self, state: TrainingState) -> None:
        # Its own stream: the training draws (order, noise, timesteps) stay those of the recipe.
        self.generator.manual_seed(state.config.seed + 104_729)

    def transform(self, images: torch.Tensor, state: TrainingState) -> torch.Tensor:
        for name in self.config.transforms:
            images = TRANSFORMS[name](images, self.config, self.generator)
        self.images_transformed += len(images)
        return images

    def details(self) -> dict[str, object]:
        cfg = self.config
        parameters = {
            "hflip": {"probability": cfg.flip_probability},
            "crop": {"padding_fraction": cfg.crop_padding, "padding_mode": "reflect"},
            "jitter": {"brightness": cfg.brightness, "contrast": cfg.contrast, "saturation": cfg.saturation},
        }
        return {
            "transforms": list(cfg.transforms),
            "parameters": {name: parameters[name] for name in cfg.transforms},
            "images_transformed": self.images_transformed,
        }


@register_defense(
    "augment",
    presets={
        "flip": {"transforms": ("hflip",)},
        "crop": {"transforms": ("crop",)},
        "jitter": {"transforms": ("jitter",)},
        "all": {"transforms": ("hflip", "crop", "jitter")},
    },
)
class Augment(Defense):
    """Image augmentation per step (flip, random crop, colour jitter), each named and recorded."""

    Config = AugmentConfig
    config: AugmentConfig
    stage = 10
    claims = frozenset({"image transform"})

    def training_hooks(self) -> TrainingHooks:
        return AugmentHooks(self.config)
