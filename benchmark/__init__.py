"""Privacy-defense benchmark for fine-tuned text-to-image diffusion models."""

import os

# No code path may download weights or data: fail fast and say which local path to give.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from benchmark.kernel.version import __version__  # noqa: E402

__all__ = ["__version__"]
