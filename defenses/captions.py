"""Caption randomisation during fine-tuning (Somepalli et al., NeurIPS 2023).

Somepalli et al. found that copying in text-to-image models is driven by the
conditioning: a model trained on one fixed caption per image learns to recall
that image from its caption. Their training-time mitigations perturb the caption
(or its embedding) at each step, so the caption is a less exact key to the image.
Variants, each drawn independently per example and per step from the defense's
own random stream (seeded from the recipe's seed):

- ``replace``: with probability ``probability`` the whole caption becomes
  ``replace_tokens`` random vocabulary tokens (DCR ``randrepl``: 4 tokens, p = 0.1).
- ``token_replace``: with probability ``probability``, ``tokens`` of the caption's
  words are each replaced by a random vocabulary token.
- ``add``: with probability ``probability``, ``tokens`` random vocabulary tokens are
  inserted at random word positions (DCR ``randwordadd``: 2 tokens, p = 0.1).
- ``number``: with probability ``probability``, ``numbers`` random integers in
  [0, 99999] are inserted at random word positions (the paper's random number
  addition, there used at inference time).
- ``noise``: Gaussian noise on the text embedding, c <- c + lambda * N(0, I) on
  the encoder's hidden states (DCR ``--rand_noise_lam``), for every example.

The vocabulary is the model's own tokenizer vocabulary without its special tokens,
each token decoded on its own to a word (the CLIP end-of-word marker dropped).

Several captions per image (DCR ``allcaps``) is not offered: the benchmark trains on
one caption per image (the embedded scenes dataset has exactly one), so the
variant ``multicaption`` is rejected with that explanation rather than silently
doing nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.finetune import TrainingHooks, TrainingState
from defenses.base import Defense, DefenseConfig, register_defense

# Random number addition draws integers in [0, NUMBER_LIMIT).
NUMBER_LIMIT = 100_000
# Offset of this defense's random stream from the recipe seed (augment uses 104_729).
_SEED_OFFSET = 130_363

_UNAVAILABLE = {
    "multicaption": (
        "several captions per image (DCR 'allcaps') needs more than one caption per image, but the "
        "benchmark fine-tunes on one caption per image (the scenes dataset has exactly one)"
    ),
}


@dataclass(frozen=True)
class CaptionConfig(DefenseConfig):
    """Which caption perturbations to apply, in order, and their strengths."""

    variants: tuple[str, ...] = ("replace",)
    # Per-example, per-step probability of each text perturbation (DCR trainspecial_prob).
    probability: float = 0.1
    # Random tokens that make up a replaced caption (DCR randrepl).
    replace_tokens: int = 4
    # Random tokens inserted (add) or caption words replaced (token_replace) (DCR randwordadd).
    tokens: int = 2
    # Random integers inserted by `number`.
    numbers: int = 2
    # Standard deviation of the Gaussian noise added to the text embedding (DCR rand_noise_lam).
    noise_lambda: float = 0.1

    def __post_init__(self) -> None:
        for name in self.variants:
            if name in _UNAVAILABLE:
                raise ConfigError(f"captions variant {name!r} is not available: {_UNAVAILABLE[name]}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(
                f"captions variants {', '.join(unknown) or '(empty)'} not known; "
                f"choose from {', '.join(VARIANTS)} (comma-separated)"
            )
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"captions variants list a variant twice: {', '.join(self.variants)}")
        if not (0 <= self.probability <= 1):
            raise ConfigError(f"captions probability must be in [0, 1], got {self.probability}")
        for name in ("replace_tokens", "tokens", "numbers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"captions {name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.noise_lambda) and self.noise_lambda >= 0):
            raise ConfigError(f"captions noise_lambda must be finite and >= 0, got {self.noise_lambda}")

    @property
    def text_variants(self) -> tuple[str, ...]:
        return tuple(v for v in self.variants if v in TEXT_VARIANTS)


def vocabulary(tokenizer: object) -> list[str]:
    """The tokenizer's tokens as words: special tokens left out, each decoded on its own, sorted by id."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    vocab: dict[str, int] = tokenizer.get_vocab()  # type: ignore[attr-defined]
    words = []
    for token_id in sorted(set(vocab.values()) - special):
        word = tokenizer.decode([token_id]).strip()  # type: ignore[attr-defined]
        if word and not word.isspace():
            words.append(word)
    if not words:
        raise ConfigError("captions: the model's tokenizer has no non-special tokens to draw random words from")
    return words


def _chosen(n: int, cfg: CaptionConfig, generator: torch.Generator) -> list[bool]:
    return (torch.rand(n, generator=generator) < cfg.probability).tolist()


def _words(vocab: list[str], count: int, generator: torch.Generator) -> list[str]:
    return [vocab[i] for i in torch.randint(0, len(vocab), (count,), generator=generator).tolist()]


def _insert(caption: str, extra: list[str], generator: torch.Generator) -> str:
    words = caption.split()
    for word in extra:
        at = int(torch.randint(0, len(words) + 1, (1,), generator=generator))
        words.insert(at, word)
    return " ".join(words)


def _where_chosen(
    captions: list[str], cfg: CaptionConfig, generator: torch.Generator, change: Callable[[str], str | None]
) -> tuple[list[str], int]:
    """Each caption drawn with probability p goes through `change` (None: left as it is); the count changed."""
    out, changed = [], 0
    for caption, hit in zip(captions, _chosen(len(captions), cfg, generator), strict=True):
        new = change(caption) if hit else None
        if new is not None:
            caption, changed = new, changed + 1
        out.append(caption)
    return out, changed


def replace_caption(
    captions: list[str], cfg: CaptionConfig, vocab: list[str], generator: torch.Generator
) -> tuple[list[str], int]:
    """With probability p, the caption becomes `replace_tokens` random vocabulary words."""
    return _where_chosen(captions, cfg, generator, lambda _: " ".join(_words(vocab, cfg.replace_tokens, generator)))


def replace_tokens(
    captions: list[str], cfg: CaptionConfig, vocab: list[str], generator: torch.Generator
) -> tuple[list[str], int]:
    """With probability p, `tokens` distinct words of the caption become random vocabulary words."""

    def change(caption: str) -> str | None:
        words = caption.split()
        if not words:
            return None
        positions = torch.randperm(len(words), generator=generator)[: cfg.tokens].tolist()
        for position, word in zip(positions, _words(vocab, len(positions), generator), strict=True):
            words[position] = word
        return " ".join(words)

    return _where_chosen(captions, cfg, generator, change)


def add_tokens(
    captions: list[str], cfg: CaptionConfig, vocab: list[str], generator: torch.Generator
) -> tuple[list[str], int]:
    """With probability p, insert `tokens` random vocabulary words at random positions."""
    return _where_chosen(
        captions, cfg, generator, lambda caption: _insert(caption, _words(vocab, cfg.tokens, generator), generator)
    )


def add_numbers(
    captions: list[str], cfg: CaptionConfig, vocab: list[str], generator: torch.Generator
) -> tuple[list[str], int]:
    """With probability p, insert `numbers` random integers in [0, 99999] at random positions."""

    def change(caption: str) -> str:
        numbers = torch.randint(0, NUMBER_LIMIT, (cfg.numbers,), generator=generator).tolist()
        return _insert(caption, [str(n) for n in numbers], generator)

    return _where_chosen(captions, cfg, generator, change)


def embedding_noise(context: torch.Tensor, cfg: CaptionConfig, generator: torch.Generator) -> torch.Tensor:
    """c + lambda * N(0, I) on the text encoder's hidden states."""
    noise = torch.randn(context.shape, generator=generator, dtype=torch.float32)
    return context + cfg.noise_lambda * noise.to(device=context.device, dtype=context.dtype)


TextVariant = Callable[[list[str], CaptionConfig, list[str], torch.Generator], tuple[list[str], int]]
TEXT_VARIANTS: dict[str, TextVariant] = {
    "replace": replace_caption,
    "token_replace": replace_tokens,
    "add": add_tokens,
    "number": add_numbers,
}
VARIANTS: tuple[str, ...] = (*TEXT_VARIANTS, "noise")


class CaptionHooks(TrainingHooks):
    def __init__(self, config: CaptionConfig) -> None:
        self.config = config
        self.transforms_captions = bool(config.text_variants)
        self.generator = torch.Generator()
        self._vocab: list[str] | None = None
        self.captions_seen = 0
        self.changed = {name: 0 for name in config.text_variants}
        self.contexts_noised = 0
        self.vocabulary_size = 0

    def setup(self, state: TrainingState) -> None:
        # Its own stream: the training draws (order, noise, timesteps) stay those of the recipe.
        self.generator.manual_seed(state.config.seed + _SEED_OFFSET)
        if any(name != "number" for name in self.config.text_variants):
            self._vocab = vocabulary(state.model.tokenizer)
            self.vocabulary_size = len(self._vocab)

    def captions(self, captions: list[str], state: TrainingState) -> list[str]:
        self.captions_seen += len(captions)
        for name in self.config.text_variants:
            captions, changed = TEXT_VARIANTS[name](captions, self.config, self._vocab or [], self.generator)
            self.changed[name] += changed
        return captions

    def context(self, context: torch.Tensor, state: TrainingState) -> torch.Tensor:
        if "noise" not in self.config.variants:
            return context
        self.contexts_noised += len(context)
        return embedding_noise(context, self.config, self.generator)

    def details(self) -> dict[str, object]:
        cfg = self.config
        out: dict[str, object] = {"variants": list(cfg.variants)}
        if cfg.text_variants:
            out["probability"] = cfg.probability
            out["captions_seen"] = self.captions_seen
            out["captions_changed"] = dict(self.changed)
            if self._vocab is not None:
                out["vocabulary_size"] = self.vocabulary_size
        if "noise" in cfg.variants:
            out["noise_lambda"] = cfg.noise_lambda
            out["contexts_noised"] = self.contexts_noised
        return out


@register_defense(
    "captions",
    presets={
        "replace": {"variants": ("replace",)},
        "token": {"variants": ("token_replace",)},
        "add": {"variants": ("add",)},
        "number": {"variants": ("number",)},
        "noise": {"variants": ("noise",)},
        "all": {"variants": ("replace", "token_replace", "add", "number", "noise")},
    },
)
class CaptionRandomisation(Defense):
    """Caption randomisation per step (Somepalli et al. 2023): random captions, tokens, numbers, embedding noise."""

    Config = CaptionConfig
    config: CaptionConfig
    stage = 10
    claims = frozenset({"captions"})

    def training_hooks(self) -> TrainingHooks:
        return CaptionHooks(self.config)
