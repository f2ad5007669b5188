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
import functools
import time
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from attacks.scenarios import QueryAccess
from benchmark.kernel.convert import convert, out_of_range
from benchmark.kernel.errors import ConfigError
from benchmark.kernel.registry import Registry
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget, SamplingConfig

# `attacks.attack` defines the query and its configuration, and registers Pang & Wang's
# family here: typed loosely below so this module does not import it back.
AttackConfig = Any
Query = Any
ImageEncoder = Any
ProgressFn = Callable[[int], None]


class Access(enum.Enum):
    """What a family needs of the provider: the access levels of docs/methods.md, "Attacks beyond the paper"."""

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


@dataclass
class ScoredQueries:
    query_ids: list[str]
    captions: list[str]
    scores: np.ndarray  # (n_queries, generations_per_query)
    queries_spent: int
    images_generated: int
    seconds_in_model: float
    seconds_total: float
    # UNet evaluations the scoring spent (counted by gray-box targets; 0 where not counted).
    unet_calls: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_generated / self.seconds_in_model if self.seconds_in_model > 0 else 0.0

    @property
    def model_time_fraction(self) -> float:
        return self.seconds_in_model / self.seconds_total if self.seconds_total > 0 else 0.0


def require_captions(queries: typing.Sequence[Query], what: str | None = None) -> None:
    """Raise ValueError where a query has no caption (`what`: who needs them, for the message)."""
    missing = [q.query_id for q in queries if q.caption is None]
    if missing and what is not None:
        raise ValueError(f"{what} needs captions: {len(missing)} queries have none (e.g. {missing[0]!r})")
    if missing:
        raise ValueError(f"{len(missing)} queries have no caption (e.g. {missing[0]!r}); run caption_queries first")


class ScoringRun:
    """The bookkeeping of one scoring pass: feature rows, progress, and what the model spent.

    With a black-box `target` the costs are its counters' growth; without one (gray box) each
    query counts once, no image is generated, and the time and UNet calls are those metered
    by `in_model`.
    """

    def __init__(
        self,
        progress: ProgressFn | None = None,
        *,
        target: BlackBoxTarget | None = None,
        query_batch: int = 1,
        seed: int = 0,
    ) -> None:
        self.progress = progress
        self.query_batch = query_batch
        self.seed = seed
        self.target = target
        self.before = (
            None if target is None else (target.query_count, target.images_generated, target.seconds_generating)
        )
        self.started = time.perf_counter()
        self.rows: list[np.ndarray] = []
        self.model_seconds = 0.0
        self.unet_calls = 0

    @contextmanager
    def in_model(self, unet_calls: int) -> Iterator[None]:
        """Meter the model calls inside the block, which spend `unet_calls` UNet evaluations."""
        tick = time.perf_counter()
        yield
        self.model_seconds += time.perf_counter() - tick
        self.unet_calls += unet_calls

    def add(self, features: np.ndarray) -> None:
        """One batch's feature rows (one per query), reported to `progress`."""
        self.rows.append(features)
        if self.progress is not None:
            self.progress(len(features))

    def result(self, queries: typing.Sequence[Query], width: int, captions: list[str] | None = None) -> ScoredQueries:
        """The scores of `queries` (`width` features each); captions default to the queries'."""
        spent, images, seconds = len(queries), 0, self.model_seconds
        if self.target is not None and self.before is not None:
            q, i, s = self.before
            spent, images = self.target.query_count - q, self.target.images_generated - i
            seconds = self.target.seconds_generating - s
        return ScoredQueries(
            query_ids=[q.query_id for q in queries],
            captions=[str(q.caption) for q in queries] if captions is None else captions,
            scores=np.concatenate(self.rows).astype(np.float64) if self.rows else np.zeros((0, width)),
            # Gray box: one query = one candidate (image, caption), as for the black box; `unet_calls` is the cost.
            queries_spent=spent,
            images_generated=images,
            seconds_in_model=seconds,
            seconds_total=time.perf_counter() - self.started,
            unet_calls=self.unet_calls,
        )


def batched_scorer(
    params_type: type, *, query_batch: int, black_box: bool = False
) -> Callable[[Callable[..., ScoredQueries]], Callable[..., ScoredQueries]]:
    """Make `fn(target, queries, params, run)` a scoring function
    `(target, queries, params=params_type(), *, query_batch, seed=0, progress=None)`: `run` is the
    `ScoringRun` with the batch size and seed (counting a black-box target's spending where `black_box`)."""

    def decorate(fn: Callable[..., ScoredQueries]) -> Callable[..., ScoredQueries]:
        @functools.wraps(fn)
        def score(
            target: Any,
            queries: typing.Sequence[Query],
            params: Any = None,
            *,
            query_batch: int = query_batch,
            seed: int = 0,
            progress: ProgressFn | None = None,
        ) -> ScoredQueries:
            if query_batch < 1:
                raise ConfigError(f"query_batch must be >= 1, got {query_batch}")
            counted = target if black_box else None
            run = ScoringRun(progress, target=counted, query_batch=query_batch, seed=seed)
            return fn(target, queries, params_type() if params is None else params, run)

        return score

    return decorate


class AttackFamilyError(ValueError):
    """A family asked for where its access is not offered, or with bad hyperparameters."""


class AttackFamily(ABC):
    """One way of scoring queries; subclasses set the class attributes and `Params`."""

    name: ClassVar[str]
    version: ClassVar[str]
    # The hyperparameters: a frozen dataclass whose defaults are the paper's.
    Params: ClassVar[type]
    # The target `score` accepts, and how the error names it.
    target_type: ClassVar[type] = BlackBoxTarget
    target_needs: ClassVar[str] = "a black-box target"
    # The default `score_checked`: a function (target, queries, params, *, query_batch, seed, progress).
    scorer: ClassVar[Callable[..., ScoredQueries]]

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

    def score(
        self,
        target: BlackBoxTarget | GrayBoxTarget,
        queries: typing.Sequence[Query],
        config: AttackConfig,
        *,
        encoder: ImageEncoder | None = None,
        progress: ProgressFn | None = None,
    ) -> ScoredQueries:
        """One feature vector per query (rows of `ScoredQueries.scores`): larger means more member-like.

        Raises:
            TypeError: `target` is not a `target_type`.
        """
        if not isinstance(target, self.target_type):
            raise TypeError(f"attack {self.name!r} needs {self.target_needs}, got {target!r}")
        return self.score_checked(target, queries, config, encoder=encoder, progress=progress)

    def score_checked(
        self, target: Any, queries: typing.Sequence[Query], config: AttackConfig, **kw: Any
    ) -> ScoredQueries:
        """`score` on a target of the right type: by default `scorer` with the family's params and the
        run's batch size and seed (keywords: `encoder`, `progress`)."""
        return type(self).scorer(
            target, queries, self.params, query_batch=config.query_batch, seed=config.seed, progress=kw["progress"]
        )

    def hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        """Every setting that shapes the features, for the record: the params, then `derived_hyperparameters`."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.params).items()}
        return {**params, **self.derived_hyperparameters(config)}

    def derived_hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        """What the record holds beside the params (derived settings, fixed choices, seeds)."""
        return {}

    def describe(self, config: AttackConfig) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "access": self.access(config.query_access).value,
            "hyperparameters": self.hyperparameters(config),
        }


class GrayBoxFamily(AttackFamily):
    """A family that reads noise predictions: gray-box access only; `Params.cost_per_query()` per query."""

    target_type = GrayBoxTarget
    target_needs = "a gray-box target"

    def access(self, query_access: QueryAccess) -> Access:
        if query_access is QueryAccess.IMAGE_TO_IMAGE:
            raise AttackFamilyError(
                f"attack {self.name!r} needs gray-box access, not --query-access img2img; "
                "drop --query-access or pick --attack pang-wang or rediffuse"
            )
        return Access.GRAY_BOX

    def cost_per_query(self, config: AttackConfig, sampling: SamplingConfig) -> QueryCost:
        return self.params.cost_per_query()

    def derived_hyperparameters(self, config: AttackConfig) -> dict[str, object]:
        # A family's own derived settings come from its Params (`derived()`), then the shared ones.
        own = self.params.derived() if hasattr(self.params, "derived") else {}
        return {**own, "reduction": "mean over latent elements", "noise_seed": config.seed}


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
