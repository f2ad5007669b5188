"""The paper's four attacker scenarios: what the attacker holds."""

from __future__ import annotations

import enum


class CaptionSource(enum.Enum):
    GROUND_TRUTH = "ground_truth"
    CAPTIONER = "captioner"


class Scenario(enum.Enum):
    """Rows of DESIGN.md's scenario table."""

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
