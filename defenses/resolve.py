"""Build a defense from a name: `dpsgd`, a preset `dpsgd.eps8`, or a composition `dpsgd.eps8+lora.r4`.

Overrides (from `--defense-arg KEY=VALUE`) are converted through the config
dataclass's field types; an unknown key is rejected with the list of valid keys.
In a composition a key may be prefixed with its defense (`lora.rank=8`), and
must be when two parts share the field name.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from benchmark.kernel.convert import convert, type_name
from benchmark.kernel.errors import ConfigError
from benchmark.kernel.plugins import plugins_disabled
from benchmark.kernel.registry import Registry, RegistryError
from defenses.base import DEFENSES, ComposedDefense, Defense

Overrides = Mapping[str, object] | Iterable[tuple[str, object]]


@dataclass(frozen=True)
class DefensePreset:
    """A named configuration `defense.tag` declared beside its defense."""

    name: str
    defense: type[Defense]
    values: Mapping[str, Any]

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "(defaults)"


# Compositions a practitioner runs first, so the whole grid (`suite --defenses all`) includes them:
# DP-SGD over LoRA adapters (DP-LoRA) at two privacy budgets.
SUITE_COMPOSITIONS: tuple[str, ...] = ("dpsgd.eps8+lora.r4", "dpsgd.eps1+lora.r4")


def suite_defenses(*, registry: Registry[type[Defense]] = DEFENSES) -> list[str]:
    """What `--defenses all` runs: no defense, every preset, and the suite's compositions."""
    names = ["none", *presets(registry=registry)]
    return names + [c for c in SUITE_COMPOSITIONS if all(part in names for part in c.split("+"))]


def presets(*, registry: Registry[type[Defense]] = DEFENSES) -> dict[str, DefensePreset]:
    """Every preset of every registered defense (plugins included), by full name."""
    out: dict[str, DefensePreset] = {}
    for name, cls in registry.items():
        for tag, values in cls.presets.items():
            out[f"{name}.{tag}"] = DefensePreset(f"{name}.{tag}", cls, values)
    return out


def resolve(spec: str, overrides: Overrides | None = None, *, registry: Registry[type[Defense]] = DEFENSES) -> Defense:
    """The defense named by `spec`, with `overrides` applied.

    Args:
        spec: a defense (`lora`), a preset (`lora.r16`), or parts joined by '+'
            (`dpsgd.eps8+lora.r4`).
        overrides: field values; strings are converted through the field types
            ("4" -> 4.0 for a float, "none" -> None for an optional field).

    Raises:
        ConfigError: unknown name (closest match and what exists), unknown or
            ambiguous override key (valid keys listed), a value of the wrong type
            or out of range, or an invalid combination (valid pairs listed).
        PluginError: the named defense comes from a plugin that failed to load.
    """
    pairs = _pairs(overrides)
    parts = [p.strip() for p in spec.split("+")]
    if not spec.strip() or any(not p for p in parts):
        raise ConfigError(f"invalid defense {spec!r}: give a name like 'dpsgd', 'dpsgd.eps8' or 'dpsgd+lora'")
    looked_up = [_lookup(part, registry) for part in parts]
    if len(looked_up) > 1:
        _check_combination(spec, [cls for cls, _, _ in looked_up], registry)
    assigned = _assign(pairs, [cls for cls, _, _ in looked_up])
    built = []
    for (cls, preset_name, values), extra in zip(looked_up, assigned, strict=True):
        config_values = {**values, **{key: _convert(cls, key, raw) for key, raw in extra.items()}}
        try:
            config = cls.Config(**config_values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"defense {cls.name}: {exc}") from None
        # An overridden preset is no longer that preset: records and the leaderboard
        # then name the defense by its configuration instead.
        built.append(cls(config, preset=None if extra else preset_name))
    return built[0] if len(built) == 1 else ComposedDefense(built)


def valid_combinations(*, registry: Registry[type[Defense]] = DEFENSES) -> list[str]:
    """Every pair of registered defenses that composes, as `a+b`."""
    candidates = [cls for _, cls in registry.items() if _composable(cls)]
    return [
        f"{a.name}+{b.name}"
        for a, b in itertools.combinations(sorted(candidates, key=lambda c: c.name), 2)
        if not a.claims & b.claims
    ]


def _composable(cls: type[Defense]) -> bool:
    return cls.name != "none" and cls.composable()


def _pairs(overrides: Overrides | None) -> list[tuple[str, object]]:
    if overrides is None:
        return []
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise ConfigError(f"defense argument {key!r} is given twice; give each key once")
        seen.add(key)
    return items


def _lookup(part: str, registry: Registry[type[Defense]]) -> tuple[type[Defense], str | None, Mapping[str, Any]]:
    if part in registry:
        return registry.get(part), None, {}
    table = presets(registry=registry)
    if part in table:
        return table[part].defense, part, table[part].values
    try:
        registry.get(part)  # a plugin that failed to load raises PluginError here
    except RegistryError:
        pass
    known = registry.names() + sorted(table)
    close = difflib.get_close_matches(part, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    disabled = " (plugin autoloading is disabled by BENCHMARK_DISABLE_PLUGINS)" if plugins_disabled() else ""
    raise ConfigError(
        f"unknown defense {part!r}{hint} available: {', '.join(registry.names())}; "
        f"presets: {', '.join(sorted(table)) or '(none)'}{disabled}"
    )


def _check_combination(spec: str, classes: list[type[Defense]], registry: Registry[type[Defense]]) -> None:
    reason = None
    names = [cls.name for cls in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        reason = f"{', '.join(duplicates)} appears twice"
    elif "none" in names:
        reason = "'none' composes with nothing"
    else:
        for cls in classes:
            if not cls.composable():
                reason = f"{cls.name} overrides fine_tune() and so cannot be combined with another defense"
                break
        else:
            for a, b in itertools.combinations(classes, 2):
                if a.claims & b.claims:
                    shared = ", ".join(sorted(a.claims & b.claims))
                    reason = f"{a.name} and {b.name} both take over {shared}"
                    break
    if reason is not None:
        raise ConfigError(
            f"invalid defense combination {spec!r}: {reason}. "
            f"Valid pairs: {', '.join(valid_combinations(registry=registry)) or '(none)'}"
        )


def _assign(pairs: list[tuple[str, object]], classes: list[type[Defense]]) -> list[dict[str, object]]:
    """Split the override keys among the parts of a (possibly composed) defense."""
    fields = [{f.name for f in dataclasses.fields(cls.Config)} for cls in classes]
    out: list[dict[str, object]] = [{} for _ in classes]
    composed = len(classes) > 1
    for key, value in pairs:
        targets: list[int] = []
        field_name = key
        if composed and "." in key:
            prefix, field_name = key.split(".", 1)
            targets = [i for i, cls in enumerate(classes) if cls.name == prefix and field_name in fields[i]]
        else:
            targets = [i for i, names in enumerate(fields) if key in names]
        if not targets:
            raise ConfigError(f"unknown defense argument {key!r}; valid keys: {_valid_keys(classes, fields)}")
        if len(targets) > 1:
            options = " or ".join(f"{classes[i].name}.{key}" for i in targets)
            raise ConfigError(
                f"defense argument {key!r} is ambiguous in {'+'.join(c.name for c in classes)}: use {options}"
            )
        out[targets[0]][field_name] = value
    return out


def _valid_keys(classes: list[type[Defense]], fields: list[set[str]]) -> str:
    if len(classes) == 1:
        return ", ".join(sorted(fields[0])) or "(none: this defense has no settings)"
    return ", ".join(f"{cls.name}.{name}" for cls, names in zip(classes, fields, strict=True) for name in sorted(names))


def _convert(cls: type[Defense], key: str, raw: object) -> object:
    """`raw` as the type of `cls.Config.key` (strings parsed, other values checked)."""
    hint = typing.get_type_hints(cls.Config)[key]
    try:
        return convert(raw, hint)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"defense {cls.name}: {key}={raw!r} is not a valid {type_name(hint)} ({exc})") from None
