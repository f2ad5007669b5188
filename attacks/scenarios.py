"""The paper's four attacker scenarios: what the attacker holds."""

from __future__ import annotations

import enum


class CaptionSource(enum.Enum):
    GROUND_TRUTH = "ground_truth"
    CAPTIONER = "captioner"


class Scenario(enum.Enum):
    """The four attack scenarios of Pang & Wang (NDSS 2025); see docs/methods.md."""

    I = "I"  # noqa: E741 - the paper's name
    II = "II"
    III = "III"
    IV = "IV"

    @property
    def caption_source(self) -> CaptionSource:
        if self in (Scenario.I, Scenario.III):
            return CaptionSource.GROUND_TRUTH
        return CaptionSource.CAPTIONER

    @property
    def auxiliary_member_overlap(self) -> float:
        """Fraction of the shadow's members that are real target members."""
        return 0.5 if self in (Scenario.I, Scenario.II) else 0.0

    @classmethod
    def parse(cls, value: str) -> Scenario:
        try:
            return cls(value.strip().upper())
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown scenario {value!r}; available: {names}") from None


class QueryAccess(enum.Enum):
    """What the provider's API accepts: the paper's attack is text-only.

    With image-to-image access the query image itself is noised to a strength and
    denoised with its caption (as image-variation attacks do, arXiv 2405.20771);
    records keep the two settings apart because img2img leaks far more.
    """

    TEXT = "text"
    IMAGE_TO_IMAGE = "img2img"

    @classmethod
    def parse(cls, value: str) -> QueryAccess:
        try:
            return cls(value.strip().lower())
        except ValueError:
            names = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown query access {value!r}; available: {names}") from None


class ShadowMode(enum.Enum):
    """Whether the attacker's shadow also uses the target's defense.

    A defense is only as good as it is against an attacker who knows it, so the
    default is defense-aware ("adaptive"); naive shadows use the undefended recipe.
    """

    AWARE = "aware"
    NAIVE = "naive"

    @classmethod
    def parse(cls, value: str) -> ShadowMode:
        try:
            return cls(value.strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown shadow mode {value!r}; available: {names}") from None
