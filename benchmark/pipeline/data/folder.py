"""An image folder with `metadata.jsonl` (`file_name`, `text`): diffusers' training-example format.

Point it at a local copy of CelebA-Dialog, MS COCO or WIT. Every line and every
image is checked up front, so a bad file fails the run before any training.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark.kernel.errors import why_not_a_folder
from benchmark.pipeline.data.base import DatasetError, DatasetSpec, ImageTextDataset, register_dataset

METADATA = "metadata.jsonl"


class FolderDataset:
    name = "folder"

    def __init__(self, root: Path, *, resolution: int, size: int | None = None) -> None:
        root = _check_root(root)
        meta = root / METADATA
        files: list[str] = []
        captions: list[str] = []
        seen: set[str] = set()
        for number, raw in enumerate(meta.read_bytes().splitlines(), start=1):
            where = f"{meta}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{where}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
                    "save metadata.jsonl as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object with file_name and text")
            file_name, text = row.get("file_name"), row.get("text")
            if not isinstance(file_name, str) or not file_name:
                raise DatasetError(f"{where}: missing 'file_name'")
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{where}: missing or empty caption 'text' for {file_name!r}")
            if file_name in seen:
                raise DatasetError(f"{where}: duplicate file_name {file_name!r}; each image must appear once")
            seen.add(file_name)
            path = (root / file_name).resolve()
            if root not in path.parents:
                raise DatasetError(f"{where}: {file_name!r} points outside the dataset folder")
            if not path.is_file():
                raise DatasetError(f"{where}: image {file_name!r} not found in {root}")
            _check_image(path, where, file_name)
            files.append(file_name)
            captions.append(text.strip())
        if not files:
            raise DatasetError(f"{meta} lists no images")
        if size is not None:
            files, captions = files[:size], captions[:size]
        self.root = root
        self.resolution = resolution
        self._files = files
        self._captions = captions

    def __len__(self) -> int:
        return len(self._files)

    @property
    def ids(self) -> Sequence[str]:
        return self._files

    def caption(self, index: int) -> str:
        return self._captions[index]

    def image(self, index: int) -> np.ndarray:
        return _load(self.root / self._files[index], self.resolution)

    def describe(self) -> dict[str, object]:
        digest = hashlib.sha256((self.root / METADATA).read_bytes()).hexdigest()[:16]
        return {
            "name": self.name,
            "version": "1",
            "path": str(self.root),
            "metadata_sha256": digest,
            "size": len(self),
            "resolution": self.resolution,
        }


@lru_cache(maxsize=4096)
def _load(path: Path, resolution: int) -> np.ndarray:
    """Centre-crop to a square, resize, scale to [0, 1] (the SD fine-tuning preprocessing, no flips)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        array = np.asarray(im, dtype=np.float32) / 255.0
    array.setflags(write=False)
    return array


def _check_image(path: Path, where: str, file_name: str) -> None:
    """Decode the whole image, as training will: a header check passes truncated files.

    An image larger than PIL's `Image.MAX_IMAGE_PIXELS` is refused as a possible
    decompression bomb (PIL only warns below twice that size).

    Raises:
        DatasetError: naming the line and the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:  # verify() leaves the image unusable: open it again to decode
                im.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{where}: image {file_name!r} is too large to decode safely ({exc}); "
            "resize it or remove it from metadata.jsonl"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{where}: image {file_name!r} is unreadable ({exc}); replace or remove it") from None


def _check_root(root: Path) -> Path:
    """The resolved folder, if it exists and has a metadata file (cheap: no line or image is read)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} {why_not_a_folder(root)}; pass --dataset-path DIR")
    if not (root / METADATA).is_file():
        raise DatasetError(
            f"{root} has no {METADATA}; add one line per image like "
            '{"file_name": "0001.jpg", "text": "a caption"} (diffusers\' image-folder format)'
        )
    return root


def check_folder_spec(spec: DatasetSpec) -> None:
    """Before any training: the run names a folder, and it has a metadata file."""
    if spec.path is None:
        raise DatasetError("--dataset folder needs --dataset-path DIR (a folder with metadata.jsonl)")
    _check_root(spec.path)


@register_dataset("folder", check=check_folder_spec)
def build_folder(spec: DatasetSpec) -> ImageTextDataset:
    """Local image folder with metadata.jsonl (file_name, text), e.g. CelebA-Dialog or MS COCO."""
    check_folder_spec(spec)
    assert spec.path is not None
    return FolderDataset(spec.path, resolution=spec.resolution, size=spec.size)
