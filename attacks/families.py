"""Attack families: how the attacker turns queries into per-query feature vectors.

An attack is a family (Pang & Wang's image similarity, the loss attack, ...) plus
the attack model (`attacks.attack_models`) fitted on the family's features of the
shadow's queries. A family declares what access it needs (`Access`), its version,
its hyperparameters (a frozen dataclass with the paper's defaults, each range in
its field metadata) and what one query costs (`QueryCost`).

Families register with `@register_attack_family("name")`; third-party families
arrive through the entry-point group "benchmark.attacks", like every other kind.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from attacks.scenarios import QueryAccess
from benchmark.kernel.convert import convert, out_of_range
from benchmark.kernel.registry import Registry
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget, SamplingConfig

# `attacks.attack` defines the query, its configuration and the scores, and registers
# Pang & Wang's family here: typed loosely below so this module does not import it back.
AttackConfig = Any
Query = Any
ScoredQueries = Any
ImageEncoder = Any
ProgressFn = Callable[[int], None]


class Access(enum.Enum):
    """What a family needs of the provider (the access levels of ATTACKS-AND-MITIGATIONS.md)."""

    BLACK_BOX = "black-box"  # prompt -> images
    BLACK_BOX_IMG2IMG = "black-box-img2img"  # image + prompt -> variations
    GRAY_BOX = "gray-box"  # (x_t, t, c) -> eps_theta, no weights or gradients


@dataclass(frozen=True)
class QueryCost:
    """What scoring one query costs the attacker on one model."""

    images_generated: int
    unet_calls: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class AttackFamilyError(ValueError):
    """A family asked for where its access is not offered, or with bad hyperparameters."""


class AttackFamily(ABC):
    """One way of scoring queries; subclasses set the class attributes and `Params`."""

    name: ClassVar[str]
    version: ClassVar[str]
    # The hyperparameters: a frozen dataclass whose defaults are the paper's.
    Params: ClassVar[type]

    def __init__(self, params: Any | None = None) -> None:
        params = self.Params() if params is None else params
        if not isinstance(params, self.Params):
            raise TypeError(f"{self.name}: expected {self.Params}, got {type(params)}")
        self.params = params

    @classmethod
    def from_args(cls, args: Mapping[str, object] | tuple[tuple[str, str], ...] = ()) -> AttackFamily:
        """The family with `args` (KEY=VALUE overrides, converted through the field types) applied.

        Raises:
            AttackFamilyError: an unknown key, a value of the wrong type, or one out of range.
        """
        values = dict(args)
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            known = ", ".join(fields) or "(none)"
            raise AttackFamilyError(
                f"attack {cls.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; it has: {known}"
            )
        hints = typing.get_type_hints(cls.Params)
        converted = {}
        for key, raw in values.items():
            try:
                converted[key] = convert(raw, hints[key])
            except (TypeError, ValueError) as exc:
                raise AttackFamilyError(f"attack {cls.name!r}: {key}: {exc}") from None
        try:
            params = cls.Params(**converted)
        except (TypeError, ValueError) as exc:
            raise AttackFamilyError(f"attack {cls.name!r}: {exc}") from None
        bad = out_of_range(params)
        if bad:
            path, value, allowed = bad[0]
            raise AttackFamilyError(f"attack {cls.name!r}: {path} must be {allowed}, got {value!r}")
        return cls(params)

    @abstractmethod
    def access(self, query_access: QueryAccess) -> Access:
        """The access this family needs when the run's API offers `query_access`.

        Raises:
            AttackFamilyError: the family cannot run with that access.
        """

    @abstractmethod
    def cost_per_query(self, config: AttackConfig, sampling: SamplingConfig) -> QueryCost:
        """Images generated and UNet calls per query (the provider's sampling sets a black box's)."""

    @abstractmethod
    def score(
        self,
        target: BlackBoxTarget | GrayBoxTarget,
        queries: typing.Sequence[Query],
        config: AttackConfig,
        *,
        encoder: ImageEncoder | None = None,
        progress: ProgressFn | None = None,
    ) -> ScoredQueries:
        """One feature vector per query (rows of `ScoredQueries.scores`): larger means more member-like."""

    def hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        """Every setting that shapes the features, for the record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.params).items()}

    def describe(self, config: AttackConfig) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "access": self.access(config.query_access).value,
            "hyperparameters": self.hyperparameters(config),
        }


ATTACK_FAMILIES: Registry[type[AttackFamily]] = Registry("attack", entry_point_group="benchmark.attacks")

DEFAULT_FAMILY = "pang-wang"


def register_attack_family(name: str) -> Callable[[type[AttackFamily]], type[AttackFamily]]:
    def decorator(cls: type[AttackFamily]) -> type[AttackFamily]:
        cls.name = name
        return ATTACK_FAMILIES.register(name)(cls)

    return decorator


def build_family(name: str, args: Mapping[str, object] | tuple[tuple[str, str], ...] = ()) -> AttackFamily:
    """The registered family `name` with its hyperparameter overrides applied.

    Raises:
        RegistryError: unknown name (with the closest match).
        AttackFamilyError: bad hyperparameters.
    """
    return ATTACK_FAMILIES.get(name).from_args(args)
