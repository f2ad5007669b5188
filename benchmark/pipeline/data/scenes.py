"""Procedurally generated captioned scenes: the embedded default dataset.

Each caption names the background colour, the shape, its colour, size class and
coarse position, so captions are unique per image. The palette grew once: the
captions that use the later colours come after the first 4,032, so a pool of at
most that size is exactly the pool it always was. What the caption leaves out
(the background's lighting direction and strength, the shape's exact offset,
size and shade) is smooth, per-image detail a model can only reproduce by
memorising that image: the membership signal the attack looks for.

Two lightings make two domains, like a web-scale pretraining set and one owner's
photos: every second image is lit by a spotlight (bright centre, dark corners),
the others are flat. The public split (pretraining) mixes both; the owner's data
(members, non-members, auxiliary, utility-eval) is all spotlight, so fine-tuning
adapts the model to a domain the base model only half covers, as when Stable
Diffusion is fine-tuned on one collection. The lighting is not in the caption.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from benchmark.pipeline.data.base import DatasetError, DatasetSpec, ImageTextDataset, register_dataset

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.55, 0.2, 0.7),
    "orange": (0.95, 0.55, 0.1),
    "white": (0.85, 0.85, 0.85),
    "black": (0.15, 0.15, 0.15),
    # Appended for the full profile's pool (EXTENDED_SIZE); no closer to any colour above
    # than yellow is to orange.
    "cyan": (0.1, 0.75, 0.8),
    "pink": (0.95, 0.45, 0.7),
}
# Colours in the order they joined the palette: the captions each stage adds follow every
# earlier stage's, so records and cached models made with a smaller pool stay valid.
COLOR_STAGES: tuple[tuple[str, ...], ...] = (
    ("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    ("cyan", "pink"),
)
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top": (0.5, 0.27),
    "top right": (0.73, 0.27),
    "left": (0.27, 0.5),
    "center": (0.5, 0.5),
    "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73),
    "bottom": (0.5, 0.73),
    "bottom right": (0.73, 0.73),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.16), "large": (0.19, 0.25)}
# The first stage's captions: the default and micro profiles draw from (a prefix of) this pool,
# so they share its public split and base model.
DEFAULT_SIZE = 4032
# Every stage's captions: the full profile needs 1,900 owner images beside a public split of 2,000.
EXTENDED_SIZE = 6480
# Unchanged by the later colours: pools that existed before hold the same items, and larger ones
# were refused, so (version, size) still names one pool. Bump it when an existing item changes.
SCENES_VERSION = "3"
OWNER_DOMAIN = "spotlight"
LIGHTINGS = ("flat", OWNER_DOMAIN)


Combo = tuple[str, str, str, str, str]


def _combinations(colors: Sequence[str]) -> list[Combo]:
    return [
        (size, color, shape, pos, bg)
        for size, color, shape, pos, bg in itertools.product(SIZES, colors, SHAPES, POSITIONS, colors)
        if color != bg
    ]


@lru_cache(maxsize=4)
def pool_order(seed: int) -> tuple[Combo, ...]:
    """Every distinct caption's attributes, in pool order: a pool of size n is the first n.

    Each colour stage appends the combinations its colours make possible, shuffled on their own,
    so adding a stage never moves an earlier item.
    """
    ordered: list[Combo] = []
    colors: list[str] = []
    for stage, added in enumerate(COLOR_STAGES):
        colors.extend(added)
        seen = set(ordered)
        new = [combo for combo in _combinations(colors) if combo not in seen]
        # The first stage keeps the generator it was made with: its order is what records depend on.
        rng = np.random.default_rng(seed if stage == 0 else [seed, stage])
        ordered.extend(new[i] for i in rng.permutation(len(new)))
    return tuple(ordered)


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return np.hypot(dx, dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - radius * 0.85
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) / np.sqrt(2) - radius * 0.8
    # Upward triangle as the intersection of three half-planes.
    edges = [(0.0, 1.0, -0.5), (0.866, -0.5, -0.5), (-0.866, -0.5, -0.5)]
    dist = np.full_like(dx, -np.inf)
    for nx, ny, offset in edges:
        dist = np.maximum(dist, -(nx * dx + ny * -dy) / radius + offset)
    return dist * radius


def lighting_of(index: int) -> str:
    """Alternate, so any prefix of the pool (a smaller --dataset-size) keeps both domains."""
    return LIGHTINGS[index % 2]


def render_scene(combo: Combo, rng: np.random.Generator, resolution: int, lighting: str = "flat") -> np.ndarray:
    size, color, shape, pos, bg = combo
    r = resolution
    coords = (np.arange(r, dtype=np.float64) + 0.5) / r
    x, y = np.meshgrid(coords, coords)
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.2, 0.35)
    ramp = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)
    # Additive, so the lighting shows on dark backgrounds too.
    image = np.asarray(COLORS[bg])[None, None, :] + (strength * ramp * 2.0)[..., None]
    cx, cy = POSITIONS[pos]
    cx += rng.uniform(-0.07, 0.07)
    cy += rng.uniform(-0.07, 0.07)
    radius = rng.uniform(*SIZES[size])
    shade = rng.uniform(0.7, 1.0)
    dist = _signed_distance(shape, x - cx, y - cy, radius)
    # Soft edge about one pixel wide keeps the image smooth, hence learnable.
    mask = np.clip(0.5 - dist * r, 0.0, 1.0)[..., None]
    fg = np.asarray(COLORS[color])[None, None, :] * shade
    image = image * (1 - mask) + fg * mask
    if lighting == OWNER_DOMAIN:
        # Multiplicative falloff from the centre: corners at about 40%, the centre slightly brighter.
        image = image * (1.15 - 1.1 * np.hypot(x - 0.5, y - 0.5))[..., None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


class ScenesDataset:
    name = "scenes"

    def __init__(self, *, resolution: int, size: int, seed: int = 0) -> None:
        combos = pool_order(seed)
        if size > len(combos):
            raise DatasetError(
                f"scenes has {len(combos)} distinct captions; asked for {size} images. "
                f"Use --dataset-size <= {len(combos)}."
            )
        if resolution < 8:
            raise DatasetError(f"scenes needs resolution >= 8, got {resolution}")
        self._combos = list(combos[:size])
        self._ids = [f"scene-{i:05d}" for i in range(size)]
        self.resolution = resolution
        self.seed = seed

    def __len__(self) -> int:
        return len(self._combos)

    @property
    def ids(self) -> Sequence[str]:
        return self._ids

    def caption(self, index: int) -> str:
        size, color, shape, pos, bg = self._combos[index]
        return f"a {size} {color} {shape} at the {pos} on a {bg} background"

    def image(self, index: int) -> np.ndarray:
        return _render_cached(self._combos[index], self.seed, index, self.resolution)

    @property
    def owner_pool(self) -> Sequence[int]:
        """The indices the owner's data (members, non-members, auxiliary, utility) may come from."""
        return range(1, len(self), 2)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": SCENES_VERSION,
            "size": len(self),
            "resolution": self.resolution,
            "generator_seed": self.seed,
            # Where the public split and the owner's data come from (see the module docstring).
            "domains": {"public": "flat and spotlight lighting", "owner": "spotlight lighting (odd indices)"},
        }


@lru_cache(maxsize=8192)
def _render_cached(combo: Combo, seed: int, index: int, resolution: int) -> np.ndarray:
    image = render_scene(combo, np.random.default_rng([seed, index]), resolution, lighting_of(index))
    image.setflags(write=False)
    return image


@register_dataset("scenes")
def build_scenes(spec: DatasetSpec) -> ImageTextDataset:
    """Procedural captioned scenes (no download); the owner's data is spotlit, the public split mixed."""
    return ScenesDataset(resolution=spec.resolution, size=spec.size or DEFAULT_SIZE)
