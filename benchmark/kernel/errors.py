"""Errors a user can act on: each message names the problem and the fix."""

from pathlib import Path


class BenchmarkError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ModelError(BenchmarkError):
    """A model folder or model name that cannot be used."""


class ConfigError(BenchmarkError, ValueError):
    """A run configuration that fails validation."""


class PluginError(BenchmarkError):
    """A plugin the user asked for could not be loaded."""


class DefenseError(BenchmarkError):
    """A defense that cannot be built or that failed while fine-tuning."""


class CacheError(BenchmarkError):
    """A cache folder that cannot be written: a file, read-only, or full."""


def why_not_a_folder(path: Path) -> str:
    """How a path given as a folder falls short, for a message: "is a file, not a folder" or "does not exist"."""
    if path.is_file():
        return "is a file, not a folder"
    if path.exists():
        return "is not a folder"
    return "does not exist"
