"""Errors a user can act on: each message names the problem and the fix."""


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
