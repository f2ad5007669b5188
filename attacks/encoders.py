"""Image encoders: map images to patch embeddings the similarity is computed on.

Registered encoders are built from an `EncoderRequest` (everything optional):
- `pixels`: average-pooled, mean-centred raw pixels (no network);
- `cnn`: a small convolutional network trained on the public split as a denoising
  autoencoder (cached, safetensors), whose feature map gives patch embeddings;
- `hf`: any transformers vision model from a local folder (DeiT, the paper's
  default, BEiT, ViT, CLIP's vision tower, ...), patch embeddings = the last hidden
  state without its CLS/distillation tokens.
Distances average a per-patch similarity over patches, as the paper does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.training_data import TrainingData
from benchmark.kernel.cache import cached
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.errors import ConfigError, ModelError, why_not_a_folder
from benchmark.kernel.registry import Registry


class ImageEncoder(Protocol):
    name: str
    # Recorded with each result; bump when the embedding changes.
    version: str

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) images in [0, 1] -> (N, patches, dim) embeddings."""
        ...

    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class EncoderTraining:
    """How the `cnn` encoder is trained on the public split."""

    epochs: int = field(default=8, metadata={"help": "passes over the public split", "min": 1})
    batch_size: int = field(default=64, metadata={"help": "images per optimizer step", "min": 1})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate", "above": 0})
    noise_std: float = field(
        default=0.1, metadata={"help": "std of the Gaussian noise added to the input images", "min": 0}
    )
    mask_fraction: float = field(
        default=0.25, metadata={"help": "fraction of input pixels masked out", "min": 0, "below": 1}
    )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class EncoderRequest:
    """What an encoder may need to build itself; each encoder uses what it needs.

    Attributes:
        path: a local model folder (`hf`).
        public: the public split (`cnn` trains on it).
        cache_dir: where trained encoders are cached (None: train in memory).
        training: the `cnn` encoder's recipe.
        seed: seeds any training.
    """

    path: Path | None = None
    public: TrainingData | None = None
    cache_dir: Path | None = None
    training: EncoderTraining = field(default_factory=EncoderTraining)
    seed: int = 0


# A builder takes an optional EncoderRequest; it may carry `check(request)` (cheap
# validation before any training) and `needs_public_data`.
EncoderBuilder = Callable[..., ImageEncoder]
ENCODERS: Registry[EncoderBuilder] = Registry("encoder", entry_point_group="benchmark.encoders")


# The decorator: `@register_encoder("name", check=fn, needs_public_data=True)`; capabilities may also
# be attributes of a builder class.
register_encoder = ENCODERS.register


def build_encoder(name: str, request: EncoderRequest | None = None) -> ImageEncoder:
    return ENCODERS.get(name)(request or EncoderRequest())


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in [0, 1], got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


@dataclass
class PixelEncoder:
    """Raw pixels, average-pooled, each image centred on its own mean colour.

    Pooling removes sampling noise finer than the detail a model memorises;
    centring stops the (captioned) overall colour from dominating the similarity.
    """

    pool: int = 2
    name: str = "pixels"
    version: ClassVar[str] = "1"

    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = _as_tensor(images)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        x = x.flatten(1)
        return (x - x.mean(dim=1, keepdim=True)).unsqueeze(1)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "pool": self.pool, "centred": True, "patches": 1}


@register_encoder("pixels")
def build_pixel_encoder(request: EncoderRequest | None = None) -> ImageEncoder:
    """Average-pooled, mean-centred raw pixels (no network)."""
    return PixelEncoder()


# --- cnn: trained on the public split -------------------------------------------------

CNN_VERSION = "1"


@dataclass(frozen=True)
class ConvEncoderConfig:
    width: int = 32
    dim: int = 64
    # Larger images are area-downsampled first: the encoder's cost stays small.
    max_side: int = 64

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _conv_network(config: ConvEncoderConfig) -> nn.ModuleDict:
    # Built from stock modules (no subclass): the feature map at half resolution is
    # the patch grid; the decoder only exists to train it.
    encoder = nn.Sequential(
        nn.Conv2d(3, config.width, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(config.width, config.dim, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(config.dim, config.dim, 3, padding=1),
    )
    decoder = nn.Sequential(
        nn.GELU(),
        nn.ConvTranspose2d(config.dim, config.width, 4, stride=2, padding=1),
        nn.GELU(),
        nn.Conv2d(config.width, 3, 3, padding=1),
    )
    net = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    # Per-channel statistics of public features: standardised features make a
    # per-patch cosine compare patterns rather than the common offset.
    net.register_buffer("feature_mean", torch.zeros(config.dim))
    net.register_buffer("feature_std", torch.ones(config.dim))
    return net


def _prepare(images: np.ndarray, max_side: int) -> torch.Tensor:
    x = _as_tensor(images).mul(2).sub(1)
    side = max(x.shape[-2:])
    if side > max_side:
        scale = max_side / side
        size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=size, mode="area")
    return x


def train_conv_encoder(
    images: np.ndarray, config: ConvEncoderConfig, training: EncoderTraining, *, seed: int
) -> nn.ModuleDict:
    """Denoising-autoencoder training: reconstruct clean images from noised, masked ones.

    The network trains on the active device; its noise and masks are drawn on the
    CPU's generator, so a seed names the same draws on every device.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = current_compute().place(_conv_network(config))
    device = _device(net)
    x_all = _prepare(images, config.max_side)
    optimizer = torch.optim.AdamW(net.parameters(), lr=training.learning_rate)
    net.train()
    for _epoch in range(training.epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), training.batch_size):
            clean = x_all[order[start : start + training.batch_size]]
            noisy = clean + training.noise_std * torch.randn(clean.shape, generator=generator)
            keep = (
                torch.rand((len(clean), 1, *clean.shape[-2:]), generator=generator) >= training.mask_fraction
            ).float()
            clean, noisy, keep = clean.to(device), noisy.to(device), keep.to(device)
            recon = net["decoder"](net["encoder"](noisy * keep))
            loss = F.mse_loss(recon, clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        feats = torch.cat([net["encoder"](x_all[i : i + 256].to(device)) for i in range(0, len(x_all), 256)])
        net.feature_mean.copy_(feats.mean(dim=(0, 2, 3)))
        net.feature_std.copy_(feats.std(dim=(0, 2, 3)) + 1e-6)
    return net


@register_encoder("cnn")
class ConvEncoder:
    """Small CNN trained on the public split as a denoising autoencoder (cached); feature-map patches.

    The standardised feature map at half resolution is the patch grid.
    """

    name = "cnn"
    version = CNN_VERSION
    needs_public_data = True

    def __init__(self, request: EncoderRequest | None = None) -> None:
        request = request or EncoderRequest()
        self.check(request)
        assert request.public is not None
        public, training, seed = request.public, request.training, request.seed
        self.config = ConvEncoderConfig()
        inputs: dict[str, object] = {
            "public": public.fingerprint,
            "architecture": self.config.to_dict(),
            "training": training.to_dict(),
            "seed": seed,
            "version": CNN_VERSION,
            "torch": _torch_version(),
        }
        config = self.config

        def build(folder: Path) -> None:
            from safetensors.torch import save_file

            net = train_conv_encoder(public.images, config, training, seed=seed)
            save_file({k: v.cpu().contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(inputs, indent=2, default=str))

        def load(folder: Path) -> nn.ModuleDict:
            from safetensors.torch import load_file

            net = _conv_network(config)
            net.load_state_dict(load_file(str(folder / "model.safetensors")))
            return net.eval()

        self.details: dict[str, object] = {"trained_on": "public split", "training": training.to_dict(), "seed": seed}
        if request.cache_dir is None:
            self.net = train_conv_encoder(public.images, config, training, seed=seed)
            self.details["from_cache"] = False
        else:
            self.net, hit, entry = cached(Path(request.cache_dir), "encoder-cnn", inputs, build, load)
            self.details.update(from_cache=hit, cache_key=entry.name)
        self.net = current_compute().place(self.net)

    @staticmethod
    def check(request: EncoderRequest) -> None:
        if request.public is None:
            raise ConfigError(
                "encoder 'cnn' is trained on the public split, but this run has none "
                "(the public split is drawn for the tiny model); use --encoder pixels or hf"
            )

    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = _prepare(images, self.config.max_side)
        mean = self.net.feature_mean[:, None, None]
        std = self.net.feature_std[:, None, None]
        device = _device(self.net)
        with torch.no_grad():
            out = [
                ((self.net["encoder"](x[i : i + 256].to(device)) - mean) / std).flatten(2).transpose(1, 2).cpu()
                for i in range(0, len(x), 256)
            ]
        return torch.cat(out)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "architecture": self.config.to_dict(), **self.details}


def _torch_version() -> str:
    from importlib import metadata

    return metadata.version("torch").split("+")[0]


def _device(net: nn.Module) -> torch.device:
    # The encoders stay in fp32 (no autocast) on every device: the attack's similarities, and so
    # its figures, do not depend on --precision, which only changes the target's arithmetic.
    return next(net.parameters()).device


# --- hf: any transformers vision model from a local folder ----------------------------


@dataclass(frozen=True)
class VisionFolder:
    """What `inspect_vision_folder` found in a local transformers folder."""

    path: Path
    model_type: str
    loader: str  # "auto" | "clip_vision" | "vision_tower"
    image_size: tuple[int, int]
    patch_size: int | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def inspect_vision_folder(path: Path) -> VisionFolder:
    """Read a local transformers folder's config (no weights) and check it holds a vision model.

    Raises:
        ModelError: the folder is missing, is not a transformers folder, or is not a vision model.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_MAPPING_NAMES

    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(
            f"encoder folder {path} {why_not_a_folder(path)}; pass --encoder-path DIR, a local transformers vision "
            "model (e.g. DeiT saved with save_pretrained); nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} has no config.json: not a transformers model folder; save one with model.save_pretrained(DIR)"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not read the transformers config in {path}: {exc}") from None
    model_type = str(getattr(config, "model_type", ""))
    vision_config = getattr(config, "vision_config", None)
    if model_type == "clip":
        loader, vision = "clip_vision", vision_config
    elif model_type in MODEL_FOR_IMAGE_MAPPING_NAMES or (
        # Vision towers saved on their own (clip_vision_model, siglip_vision_model, ...).
        hasattr(config, "image_size") and hasattr(config, "num_channels")
    ):
        loader, vision = "auto", config
    elif vision_config is not None:
        loader, vision = "vision_tower", vision_config
    else:
        raise ModelError(
            f"{path} holds a {model_type or 'unknown'!r} model, which is not a vision model: "
            "--encoder hf needs an image encoder such as DeiT, BEiT, ViT or CLIP (vision tower)"
        )
    image_size = _pair(getattr(vision, "image_size", 224))
    patch = getattr(vision, "patch_size", None)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        try:
            data = json.loads(processor.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{processor} is not valid JSON ({exc.msg})") from None
        mean = tuple(float(v) for v in data.get("image_mean", mean))  # type: ignore[assignment]
        std = tuple(float(v) for v in data.get("image_std", std))  # type: ignore[assignment]
    return VisionFolder(
        path=path,
        model_type=model_type,
        loader=loader,
        image_size=image_size,
        patch_size=None if patch is None else int(_pair(patch)[0]),
        image_mean=mean,  # type: ignore[arg-type]
        image_std=std,  # type: ignore[arg-type]
    )


def _folder_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _load_vision_model(folder: VisionFolder) -> nn.Module:
    from transformers import AutoModel, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    # Loading CLIP's vision tower from a full CLIP folder lists every unused text
    # weight: expected here, and noise on the benchmark's console.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if folder.loader == "clip_vision":
            model = CLIPVisionModel.from_pretrained(folder.path, local_files_only=True)
        elif folder.loader == "auto":
            model = AutoModel.from_pretrained(folder.path, local_files_only=True)
        else:
            full = AutoModel.from_pretrained(folder.path, local_files_only=True)
            model = getattr(full, "vision_model", None)
            if model is None:
                raise ModelError(f"{folder.path}: a {folder.model_type!r} model without a vision_model tower")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the vision model in {folder.path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


@register_encoder("hf")
class HFVisionEncoder:
    """Any transformers vision model from a local folder (DeiT, BEiT, ViT, CLIP); patch tokens.

    Patch embeddings are the last hidden state without the CLS (and DeiT's
    distillation) tokens; images are resized and normalised as the folder's
    preprocessor_config.json says.
    """

    name = "hf"
    version = "1"
    needs_public_data = False
    batch_size = 64

    def __init__(self, request: EncoderRequest | None = None) -> None:
        request = request or EncoderRequest()
        self.check(request)
        assert request.path is not None
        self.folder = inspect_vision_folder(request.path)
        self.model = current_compute().place(_load_vision_model(self.folder))
        self.fingerprint = _folder_fingerprint(self.folder.path)

    @staticmethod
    def check(request: EncoderRequest) -> None:
        if request.path is None:
            raise ConfigError(
                "--encoder hf needs --encoder-path DIR: a local transformers vision model folder "
                "(DeiT, BEiT, ViT, CLIP); nothing is downloaded"
            )
        inspect_vision_folder(request.path)

    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = _as_tensor(images)
        device = _device(self.model)
        mean = torch.tensor(self.folder.image_mean)[:, None, None].to(device)
        std = torch.tensor(self.folder.image_std)[:, None, None].to(device)
        out = []
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                chunk = x[start : start + self.batch_size].to(device)
                if tuple(chunk.shape[-2:]) != self.folder.image_size:
                    chunk = F.interpolate(chunk, size=self.folder.image_size, mode="bilinear", antialias=True)
                hidden = self.model(pixel_values=(chunk - mean) / std).last_hidden_state
                out.append(self.patches(hidden).cpu())
        return torch.cat(out)

    def patches(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drop the CLS (and DeiT's distillation) tokens; convolutional maps become token grids."""
        if hidden.ndim == 4:  # (N, C, H, W) from convolutional backbones
            return hidden.flatten(2).transpose(1, 2)
        if self.folder.patch_size is None:
            return hidden
        h, w = self.folder.image_size
        n_patches = (h // self.folder.patch_size) * (w // self.folder.patch_size)
        prefix = hidden.shape[1] - n_patches
        return hidden[:, prefix:] if prefix >= 0 else hidden

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.folder.path),
            "model_type": self.folder.model_type,
            "model_class": str(type(self.model)).split("'")[1],
            "image_size": list(self.folder.image_size),
            "patch_size": self.folder.patch_size,
            "image_mean": list(self.folder.image_mean),
            "image_std": list(self.folder.image_std),
            "fingerprint": self.fingerprint,
        }
