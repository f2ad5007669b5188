"""Where a base model comes from: the embedded tiny default (pretrained once, cached) or a local folder."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmark.kernel.cache import cached, entry_path, has_entry
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.errors import ConfigError, ModelError
from benchmark.kernel.registry import Registry
from benchmark.pipeline.data.base import ImageTextDataset, images_to_tensor
from benchmark.pipeline.finetune import StepCallback, TrainConfig, train
from benchmark.pipeline.models.diffusion import DiffusionModel, check_model_folder, load_model
from benchmark.pipeline.models.tiny import TinyModelConfig, build_tiny_model


@dataclass(frozen=True)
class BaseModelRequest:
    """Everything that determines a base model (and so its cache key)."""

    dataset: ImageTextDataset
    public_indices: tuple[int, ...]
    resolution: int
    pretrain: TrainConfig
    cache_dir: Path
    model_path: Path | None = None
    tiny: TinyModelConfig = TinyModelConfig()


@dataclass(frozen=True)
class ModelSettings:
    """What a model source's `check` hook sees in `RunConfig.validate()`, before any data is loaded.

    Attributes:
        path: the local folder passed with --model-path, if any.
        resolution: the run's image resolution.
        public: size of the public split the run would draw (--public).
    """

    path: Path | None
    resolution: int
    public: int


@dataclass
class BaseModel:
    model_dir: Path
    from_cache: bool
    description: dict[str, object]

    def load(self) -> DiffusionModel:
        """A fresh copy: every fine-tune starts from the same weights."""
        return load_model(self.model_dir)


# A source may declare, at registration, `check=fn(ModelSettings)` (cheap validation
# before any training) and `needs_public_data=True` (the run must draw a public split).
ModelSource = Callable[[BaseModelRequest, StepCallback | None], BaseModel]
MODELS: Registry[ModelSource] = Registry("model", entry_point_group="benchmark.models")


def check_tiny(settings: ModelSettings) -> None:
    if settings.public < 1:
        raise ConfigError("the tiny model is pretrained on the public split: --public must be >= 1")


TINY_CACHE_KIND = "base-tiny"


def tiny_model_inputs(request: BaseModelRequest) -> dict[str, object]:
    """Everything that shapes the tiny model's weights: its cache key, for `tiny_model` and `locate_tiny` alike."""
    ds = request.dataset
    return {
        "dataset": ds.describe(),
        "public": list(request.public_indices),
        "resolution": request.resolution,
        "pretrain": request.pretrain.to_dict(),
        "architecture": request.tiny.to_dict(),
        "torch": torch.__version__.split("+")[0],
        # Pretrained under the run's precision: a bf16 run has its own base model.
        **current_compute().identity(),
    }


def _tiny_description(request: BaseModelRequest, inputs: dict[str, object]) -> dict[str, object]:
    return {"name": "tiny", "version": "1", **inputs, "dataset": request.dataset.name}


def locate_tiny(request: BaseModelRequest) -> BaseModel:
    """The tiny model `tiny_model` would return, without pretraining or loading it.

    Its folder is where the cache entry is or will be; `from_cache` says whether a valid one is there.
    """
    inputs = tiny_model_inputs(request)
    entry = entry_path(request.cache_dir, TINY_CACHE_KIND, inputs)
    return BaseModel(model_dir=entry, from_cache=has_entry(entry), description=_tiny_description(request, inputs))


# `locate`: the base model a request names, without training it or writing anything (a suite's plan).
@MODELS.register("tiny", check=check_tiny, needs_public_data=True, locate=locate_tiny)
def tiny_model(request: BaseModelRequest, on_step: StepCallback | None = None) -> BaseModel:
    """Embedded tiny pixel-space model, pretrained on the public split and cached."""
    ds = request.dataset
    inputs = tiny_model_inputs(request)

    def build(folder: Path) -> None:
        captions = [ds.caption(i) for i in request.public_indices]
        images = images_to_tensor([ds.image(i) for i in request.public_indices])
        model = build_tiny_model(
            corpus=captions, resolution=request.resolution, config=request.tiny, seed=request.pretrain.seed
        )
        train(model, images, captions, request.pretrain, on_step=on_step)
        model.save(folder)

    def check(folder: Path) -> Path:
        load_model(folder)  # a corrupt entry fails here and gets rebuilt
        return folder

    folder, hit, _ = cached(request.cache_dir, TINY_CACHE_KIND, inputs, build, check)
    return BaseModel(model_dir=folder, from_cache=hit, description=_tiny_description(request, inputs))


def check_local_folder(settings: ModelSettings) -> None:
    if settings.path is None:
        raise ModelError(
            "--model sd15 needs --model-path DIR: a local diffusers folder of Stable Diffusion v1-5 "
            "(model_index.json, unet/, text_encoder/, tokenizer/, scheduler/, vae/); nothing is downloaded"
        )
    check_model_folder(settings.path)


# Located by reading the folder (nothing is trained or written): its identity is in its files.
@MODELS.register("sd15", check=check_local_folder, locate=lambda request: local_folder_model(request))
def local_folder_model(request: BaseModelRequest, on_step: StepCallback | None = None) -> BaseModel:
    """Stable Diffusion v1-5 (or any diffusers text-to-image folder) from --model-path."""
    check_local_folder(ModelSettings(path=request.model_path, resolution=request.resolution, public=0))
    assert request.model_path is not None
    model = load_model(request.model_path)
    if model.resolution != request.resolution:
        raise ModelError(
            f"the model in {request.model_path} generates {model.resolution}px images but the run asks for "
            f"{request.resolution}px; pass --resolution {model.resolution}"
        )
    return BaseModel(
        model_dir=Path(request.model_path).resolve(),
        from_cache=True,
        description={
            "name": "sd15",
            "version": "1",
            "path": str(request.model_path),
            "resolution": model.resolution,
            "fingerprint": folder_fingerprint(Path(request.model_path)),
        },
    )


def folder_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of every file: new weights at the same
    path must not reuse fine-tunes cached for the old ones."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).resolve().rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path.resolve())}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]
