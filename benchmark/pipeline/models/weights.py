"""Weights files are read as safetensors only: a pickled file (.bin, .ckpt) can run code when loaded.

`check_weights(folder, flag=...)` is cheap (it reads each file's header, not its
tensors), so it runs before any training and a bad folder fails the run at once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from benchmark.kernel.errors import ModelError

PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# A safetensors file starts with the 8-byte little-endian length of its JSON header.
_MAX_HEADER = 100 << 20
CONVERT_HINT = (
    "convert it to safetensors where you trust the file, e.g. load it and call "
    "save_pretrained(DIR, safe_serialization=True); pickled weights are never loaded here"
)


def check_weights(folder: Path, *, flag: str) -> None:
    """`folder` holds readable safetensors weights, and no pickled weights in their place.

    Args:
        folder: a model component folder (`unet`, `text_encoder`, ...).
        flag: the flag that named the folder, for the message (`--model-path`).

    Raises:
        ModelError: no weights, only pickled weights, or a safetensors file whose header is damaged.
    """
    safe = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if not safe:
        if pickled:
            raise ModelError(f"{flag}: {folder} holds only pickled weights ({', '.join(pickled)}); {CONVERT_HINT}")
        raise ModelError(f"{flag}: {folder} holds no .safetensors weights; save it with save_pretrained(DIR)")
    for path in safe:
        problem = _header_problem(path)
        if problem:
            raise ModelError(
                f"{flag}: weights file {path} is not a readable safetensors file ({problem}); "
                "replace it with an intact copy"
            )


def _header_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"only {size} bytes"
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                return "its header length is larger than the file"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return exc.strerror or str(exc)
    except (ValueError, UnicodeDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and _entry_ok(v)), default=0)
    if any(k != "__metadata__" and not _entry_ok(v) for k, v in header.items()):
        return "its header lists a tensor without dtype, shape and offsets"
    if 8 + length + end > size:
        return f"it is truncated ({size} bytes, its header describes {8 + length + end})"
    return None


def _entry_ok(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    offsets = value.get("data_offsets")
    return (
        "dtype" in value
        and isinstance(value.get("shape"), list)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
    )
