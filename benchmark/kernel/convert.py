"""One typed converter for every way a setting arrives: a CLI flag, `--defense-arg KEY=VALUE`, or stored JSON.

`convert(raw, hint)` turns `raw` into the type that `hint` (a field's type hint)
names. Strings are parsed ("4" -> 4.0 for a float, "none" -> None for an
optional field, "a, b" -> a tuple); JSON values (numbers, booleans, lists,
objects for nested dataclasses) are checked and converted. Keeping one converter
means a value accepted on the command line is accepted in a configuration file,
and the other way round.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"none", "null"})


def convert(raw: object, hint: Any) -> Any:
    """`raw` as a value of the type `hint`.

    Args:
        raw: a string (from the command line) or a JSON value (str, int, float,
            bool, None, list, dict); values that already have the type pass through.
        hint: a resolved type hint: bool, int, float, str, Path, an Enum, a
            Literal, an Optional / union, a tuple (fixed or `tuple[T, ...]`), or a
            dataclass (from a mapping of its fields).

    Raises:
        ValueError: `raw` cannot be read as `hint` (the message says what is expected),
            including non-finite floats (nan, inf), which no setting can use.
        TypeError: `hint` is a type this converter does not handle.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(raw, args)
    if raw is None:
        raise ValueError(f"a {type_name(hint)} is required here, not None")
    if origin is typing.Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw.strip()):
                return choice
        raise ValueError(f"choose one of {', '.join(map(str, args))}")
    if origin is tuple:
        return _tuple(raw, args)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {raw!r}")
    if hint is int:
        # bool is an int subclass, but `true` for a count is a mistake, not a 1.
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {raw!r}") from None
        raise ValueError(f"expected an integer, got {raw!r}")
    if hint is float:
        return _float(raw)
    if hint is str:
        if isinstance(raw, str):
            return raw.strip()
        raise ValueError(f"expected a string, got {raw!r}")
    if hint is Path:
        if isinstance(raw, str | Path) and str(raw).strip():
            return Path(raw)
        raise ValueError(f"expected a path, got {raw!r}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum(raw, hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(raw, hint)
    raise TypeError(f"settings of type {type_name(hint)} cannot be converted")


def type_name(hint: Any) -> str:
    """A readable name for a type hint (`int`, `Path | None`, `tuple[int, ...]`)."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("pathlib.", "")


def choices(hint: Any) -> tuple[str, ...]:
    """The fixed set of spellings a hint allows (an Enum's values, a Literal's, bool words); () if open-ended."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return choices(inner[0]) if len(inner) == 1 else ()
    if typing.get_origin(hint) is typing.Literal:
        return tuple(str(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(str(m.value) for m in hint)
    return ()


def _union(raw: object, args: tuple[Any, ...]) -> Any:
    if type(None) in args and (raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE)):
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(raw, arg)
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError("; ".join(errors))


def _float(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"expected a number, got {raw!r}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    # float("nan") parses, and JSON readers accept NaN and Infinity, but no setting
    # means anything with them: a nan learning rate trains silently to garbage.
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _tuple(raw: object, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if isinstance(raw, str):  # "a, b" -> ("a", "b")
        items: list[object] = [part.strip() for part in raw.split(",") if part.strip()]
    elif isinstance(raw, tuple | list):
        items = list(raw)
    else:
        raise ValueError(f"expected a list or comma-separated values, got {raw!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(item, args[0]) for item in items)
    if len(items) != len(args):
        raise ValueError(f"expected {len(args)} values, got {len(items)}")
    return tuple(convert(item, arg) for item, arg in zip(items, args, strict=True))


def _enum(raw: object, hint: type[enum.Enum]) -> enum.Enum:
    if isinstance(raw, hint):
        return raw
    for member in hint:
        if member.value == raw:
            return member
    if isinstance(raw, str):
        # Scenario names are upper case and access modes lower case; nobody should need to remember which.
        folded = [m for m in hint if str(m.value).lower() == raw.strip().lower()]
        if len(folded) == 1:
            return folded[0]
    available = ", ".join(str(m.value) for m in hint)
    raise ValueError(f"unknown {_words(hint.__name__)} {raw!r}; available: {available}")


def _dataclass(raw: object, hint: type) -> Any:
    if isinstance(raw, hint):
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a mapping of {hint.__name__} settings, got {raw!r}")
    hints = typing.get_type_hints(hint)
    names = [f.name for f in dataclasses.fields(hint)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown {hint.__name__} setting(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    values = {}
    for key, value in raw.items():
        try:
            values[key] = convert(value, hints[key])
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    try:
        return hint(**values)
    except TypeError as exc:  # a required setting is missing: the stored value is incomplete
        raise ValueError(f"{hint.__name__}: {exc}") from None


def _words(camel: str) -> str:
    """`QueryAccess` -> `query access`, for messages that read like the flag's own words."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", camel).lower()


# Field metadata keys that bound a number, checked for every field by `out_of_range`:
# min / max are inclusive, above / below exclusive. Declared next to the field, once.
_BOUNDS = {"min": ">=", "above": ">", "max": "<=", "below": "<"}


def out_of_range(obj: Any, *, prefix: str = "") -> list[tuple[str, object, str]]:
    """Every field of the dataclass `obj` (nested dataclasses included) outside its declared bounds.

    A field declares its range in its metadata (`field(metadata={"min": 1})`); None
    (an optional setting left unset) is never out of range, and a nan or infinite
    float always is.

    Returns:
        (dotted path, value, what it must be) for each bad field, e.g.
        ("finetune.learning_rate", 0.0, "> 0"), in field order.
    """
    bad: list[tuple[str, object, str]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            bad += out_of_range(value, prefix=f"{path}.")
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        bounds = [(op, f.metadata[key]) for key, op in _BOUNDS.items() if key in f.metadata]
        if isinstance(value, float) and not math.isfinite(value):
            bad.append((path, value, "a finite number"))
            continue
        failed = [
            f"{op} {limit}"
            for op, limit in bounds
            if not {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
        ]
        if failed:
            bad.append((path, value, " and ".join(f"{op} {limit}" for op, limit in bounds)))
    return bad


# numpy's seeding takes 0 .. 2**32 - 1; a seed outside breaks deep inside a run.
SEED_RANGE: dict[str, int] = {"min": 0, "max": 2**32 - 1}
