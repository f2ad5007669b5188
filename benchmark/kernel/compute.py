"""Where tensors live and in which precision: the one place for device placement, autocast and memory figures.

A run resolves `--device`, `--precision` and `--gradient-checkpointing` once
(`resolve_compute`) and activates the result for its duration (`use`). Code that
builds or runs a network asks `current()` where to put it, so no module calls
`.cuda()` itself, and the CPU default (fp32, no autocast) is the code path the
embedded default has always taken: its figures do not change.

Random draws stay on the CPU's generators and are moved to the device after the
draw, so a seed names the same noise on every device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from benchmark.kernel.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True)
class Compute:
    """A resolved device and precision.

    Attributes:
        device: where networks and their inputs live.
        precision: fp32 (no autocast), bf16 or fp16 (autocast; weights stay fp32 masters).
        gradient_checkpointing: recompute UNet activations in the backward pass (memory for time).
    """

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return PRECISIONS[self.precision]

    @property
    def accelerated(self) -> bool:
        return self.device.type != "cpu"

    def place(self, module: M) -> M:
        """`module` on this device (in place, as `Module.to` does); a no-op on the CPU."""
        return module.to(self.device)

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for a forward pass; nothing at fp32, so the CPU default is unchanged."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "mps":
            return "Apple MPS"
        return "cpu"

    def identity(self) -> dict[str, str]:
        """What of these settings changes a result, for cache keys: the precision, and only where it is not
        fp32, so the keys of everything cached before precisions existed stay valid. Devices are left out:
        the same seed on another device answers the same question."""
        return {} if self.precision == "fp32" else {"precision": self.precision}

    def describe(self) -> dict[str, object]:
        """What a record keeps of where and how it was computed."""
        return {
            "device": str(self.device),
            "device_name": self.device_name(),
            "precision": self.precision,
            "gradient_checkpointing": self.gradient_checkpointing,
        }

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float | None:
        """Peak accelerator memory since the last reset (MPS: memory held now); None on the CPU."""
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self.device.type == "mps":
            return round(torch.mps.driver_allocated_memory() / 2**20, 1)
        return None


CPU = Compute()
_CURRENT: ContextVar[Compute] = ContextVar("compute", default=CPU)


def current() -> Compute:
    """The active compute settings (the CPU at fp32 unless a run activated others)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(compute: Compute) -> Iterator[Compute]:
    """Activate `compute` for the block (a run, a benchmark, a test)."""
    token = _CURRENT.set(compute)
    try:
        yield compute
    finally:
        _CURRENT.reset(token)


def resolve_compute(
    device: str = "auto", precision: str = "fp32", *, gradient_checkpointing: bool = False, here: bool = True
) -> Compute:
    """Turn the flags into a `Compute`, or say what this machine cannot do.

    `auto` picks CUDA, then MPS, then the CPU.

    Args:
        here: whether the work runs on this machine. A cluster's driver (False) checks only the names
            and what no device can run; each worker resolves the device again where it runs.

    Raises:
        ConfigError: an unknown name, a device this machine lacks, or a precision the device cannot run,
            each naming the flag value to use instead.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if not here:
        _check_name(device)
        if precision == "fp16" and device == "cpu":
            raise ConfigError(FP16_ON_CPU)
        named = torch.device("cpu" if device == "auto" else device)
        return Compute(device=named, precision=precision, gradient_checkpointing=gradient_checkpointing)
    resolved = _device(device)
    if precision == "fp16" and resolved.type == "cpu":
        raise ConfigError(FP16_ON_CPU)
    if precision == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--precision bf16: {torch.cuda.get_device_name(resolved)} has no bf16 support; pass --precision fp16"
        )
    return Compute(device=resolved, precision=precision, gradient_checkpointing=gradient_checkpointing)


FP16_ON_CPU = "--precision fp16 needs a GPU: CPU autocast runs bf16; pass --precision bf16 (or fp32) on the CPU"


def _check_name(name: str) -> None:
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown --device {name!r}; available: {', '.join(DEVICES)} (or cuda:N)")


def _device(name: str) -> torch.device:
    _check_name(name)
    kind, _, index = name.partition(":")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"--device {name}: no CUDA device is available here (torch {torch.__version__}, {built}); "
                "pass --device cpu (or auto)"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pass one of those or --device cpu"
            )
        return torch.device(name)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: no Apple MPS device is available here; pass --device cpu (or auto)")
    return torch.device(kind)
