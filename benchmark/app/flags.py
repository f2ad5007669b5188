"""Command-line flags generated from a configuration dataclass: one place per setting.

Every field of the dataclass is a flag named after it (`dataset_path` ->
`--dataset-path`), with the field's `help`. A field whose type is itself a
dataclass (`finetune: TrainConfig`) contributes one flag per field of that
dataclass, named by its dotted path in the stored configuration
(`--finetune.epochs`, `--sampling.num-inference-steps`, `--reference-clip.steps`) and listed under a
heading of its own in `--help`. A bool field is a `--x / --no-x` pair.

Field metadata, read here and nowhere else:
    help: what the setting means (required: a flag without help is a bug).
    choices: the allowed spellings where the set is fixed but the type is a str
        (an Enum's or Literal's values are found from the type).
    aliases: further flag names kept from earlier versions, e.g. `("--strength",)`;
        for a bool, a `--no-...` alias sets it to False. On a nested dataclass
        field, a mapping from its field names to aliases: `{"epochs": ("--epochs",)}`.
    deprecated: flag names that still work but print a warning naming the flag to use.

Values are parsed after argparse by `benchmark.kernel.convert`, the converter that
also reads stored configurations, and a bad value is a `ConfigError` naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.kernel.convert import choices as choices_of
from benchmark.kernel.convert import convert
from benchmark.kernel.errors import ConfigError

# Flags of config fields store under this prefix, so hand-written flags (which may
# share a field's name, like run's multi-valued --scenario) never collide with them.
DEST_PREFIX = "config."
_KEY_VALUE_PAIRS = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ConfigFlag:
    """One setting as a flag: where it lives in the configuration and how it is spelled."""

    path: str  # dotted: "members", "finetune.epochs"
    flag: str  # "--members", "--finetune.epochs"
    hint: Any
    help: str
    default: Any
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    deprecated: tuple[str, ...] = ()
    group: str | None = None  # the nested dataclass field it belongs to

    @property
    def dest(self) -> str:
        return DEST_PREFIX + self.path

    @property
    def is_bool(self) -> bool:
        return self.hint is bool

    @property
    def is_key_values(self) -> bool:
        return self.hint == _KEY_VALUE_PAIRS


def config_flags(cls: type, *, exclude: Sequence[str] = ()) -> list[ConfigFlag]:
    """The flags of every field of `cls` (nested dataclasses expanded), except the paths in `exclude`.

    Excluding a nested dataclass field (`finetune`) excludes all of its flags.

    Raises:
        TypeError: a field without help, or a bool alias that is not a `--no-` form.
    """
    flags = _flags(cls, prefix="", group=None, aliases={}, defaults=None)
    return [f for f in flags if f.path not in exclude and f.path.partition(".")[0] not in exclude]


def _flags(
    cls: type, *, prefix: str, group: str | None, aliases: Mapping[str, Sequence[str]], defaults: Any
) -> list[ConfigFlag]:
    hints = typing.get_type_hints(cls)
    out: list[ConfigFlag] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        path = prefix + f.name
        meta = f.metadata
        # A nested field's default is the enclosing default's (RunConfig.pretrain has 30 epochs, not TrainConfig's).
        default = getattr(defaults, f.name) if defaults is not None else f.default
        default = None if default is dataclasses.MISSING else default
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += _flags(hint, prefix=f"{path}.", group=f.name, aliases=meta.get("aliases", {}), defaults=default)
            continue
        help_text = meta.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text; every setting that is a flag needs one")
        flag = ConfigFlag(
            path=path,
            flag="--" + path.replace("_", "-"),
            hint=hint,
            help=help_text,
            default=default,
            choices=tuple(meta.get("choices", ())) or choices_of(hint),
            aliases=tuple(meta.get("aliases", ())) + tuple(aliases.get(f.name, ())),
            deprecated=tuple(meta.get("deprecated", ())),
            group=group,
        )
        bad = [a for a in flag.aliases if flag.is_bool and not a.startswith("--no-")]
        if bad:
            raise TypeError(f"{path}: a bool's alias must be a --no-... form, got {', '.join(bad)}")
        out.append(flag)
    return out


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: Sequence[str] = ()) -> list[ConfigFlag]:
    """Add a flag per field of `cls` to `parser`; returns them. Absent flags leave no attribute on the namespace.

    The flags of a nested dataclass field go under a heading of their own, described by that field's help.
    """
    flags = config_flags(cls, exclude=exclude)
    headings = {f.name: f.metadata.get("help") for f in dataclasses.fields(cls)}
    groups: dict[str | None, Any] = {None: parser}
    for flag in flags:
        if flag.group not in groups:
            title = f"{flag.group} settings (--{flag.group.replace('_', '-')}.*)"
            groups[flag.group] = parser.add_argument_group(title, headings.get(flag.group))
        _add(groups[flag.group], flag)
    return flags


def _add(target: Any, flag: ConfigFlag) -> None:
    # argparse %-formats help text.
    help_text = flag.help.replace("%", "%%")
    if flag.default is not None and not flag.is_key_values and flag.default != ():
        shown = getattr(flag.default, "value", flag.default)
        help_text += f" (default: {str(shown).replace('%', '%%')})"
    if flag.is_bool:
        if flag.aliases:
            help_text += f"; also {', '.join(flag.aliases)}"
        target.add_argument(
            flag.flag, dest=flag.dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
        for alias in flag.aliases:
            target.add_argument(
                alias, dest=flag.dest, action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        return
    common: dict[str, Any] = {"dest": flag.dest, "default": argparse.SUPPRESS, "metavar": _metavar(flag)}
    if flag.is_key_values:
        # Repeatable; the pairs are split after parsing so a bad one is a ConfigError like any other value.
        target.add_argument(flag.flag, *flag.aliases, action="append", help=help_text, **common)
    else:
        target.add_argument(flag.flag, *flag.aliases, help=help_text, **common)
    for old in flag.deprecated:
        target.add_argument(
            old, action=_Deprecated, replacement=flag.flag, help=f"deprecated: use {flag.flag}", **common
        )


def _metavar(flag: ConfigFlag) -> str:
    if flag.choices:
        return "{" + ",".join(flag.choices) + "}"
    if flag.is_key_values:
        return "KEY=VALUE"
    inner = [a for a in typing.get_args(flag.hint) if a is not type(None)] or [flag.hint]
    names = {int: "N", float: "X", Path: "PATH", str: "NAME"}
    return names.get(inner[0], "VALUE")


class _Deprecated(argparse.Action):
    """An old flag name: it still sets the setting, and says which flag to use instead."""

    def __init__(self, *args: Any, replacement: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replacement = replacement

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        # Written by the parser, as argparse's own errors are, so it shows whatever the command's output.
        print(
            f"warning: {option_string} is deprecated and will be removed in the next version; use {self.replacement}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def given(args: argparse.Namespace, flags: Sequence[ConfigFlag]) -> dict[str, Any]:
    """The settings given on the command line, converted, by dotted path.

    Raises:
        ConfigError: a value that is not of its setting's type, naming the flag.
    """
    out: dict[str, Any] = {}
    values = vars(args)
    for flag in flags:
        if flag.dest not in values:
            continue
        raw = values[flag.dest]
        if flag.is_key_values:
            raw = [_key_value(flag.flag, item) for item in raw]
        try:
            out[flag.path] = convert(raw, flag.hint)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{flag.flag}: {exc}") from None
    return out


def apply(config: Any, settings: Mapping[str, Any]) -> Any:
    """`config` with `settings` (dotted paths, one level of nesting) replaced."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in settings.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[path] = value
    for head, changes in nested.items():
        top[head] = dataclasses.replace(getattr(config, head), **changes)
    return dataclasses.replace(config, **top)


def _key_value(flag: str, item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} target_epsilon=4)")
    return key.strip(), value
