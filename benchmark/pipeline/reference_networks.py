"""The reference networks the utility metrics measure with, all offline.

No Inception or CLIP weights can be downloaded, so the embedded default measures
with a small reference CLIP model (transformers' `CLIPModel`) trained
contrastively on the public split and cached in `save_pretrained` format. Its own
zero-shot caption retrieval accuracy on held-out public data is recorded, so a
reader can judge the ruler. `--clip-model DIR` loads a local CLIP folder instead,
and `--fid-weights PATH` loads torch-fidelity's Inception network for FID/KID.

They run on the active device (`benchmark.kernel.compute`) but always in fp32, never
under autocast: a ruler must not change with the `--precision` of the model it measures.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.kernel.cache import cached
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.convert import SEED_RANGE
from benchmark.kernel.errors import ConfigError, ModelError, why_not_a_folder
from benchmark.pipeline.models.tiny import TinyModelConfig, build_tokenizer

REPORT_FILE = "reference_report.json"
INCEPTION_FEATURES = 2048


@dataclass(frozen=True)
class ReferenceClipTraining:
    """Architecture and training of the reference CLIP model (trained on the public split)."""

    image_size: int = field(
        default=16, metadata={"help": "image side the vision tower sees (images are resized)", "min": 1}
    )
    patch_size: int = field(default=4, metadata={"help": "vision patch side in pixels", "min": 1})
    hidden_size: int = field(default=64, metadata={"help": "width of both towers", "min": 1})
    layers: int = field(default=2, metadata={"help": "transformer layers per tower", "min": 1})
    heads: int = field(default=2, metadata={"help": "attention heads per layer", "min": 1})
    projection_dim: int = field(default=64, metadata={"help": "size of the shared image-text embedding", "min": 1})
    max_caption_tokens: int = field(default=32, metadata={"help": "captions are cut to this many tokens", "min": 1})
    tokenizer_vocab_size: int = field(default=400, metadata={"help": "word-level vocabulary size", "min": 1})
    steps: int = field(default=200, metadata={"help": "contrastive training steps", "min": 1})
    batch_size: int = field(default=128, metadata={"help": "image-caption pairs per step", "min": 1})
    learning_rate: float = field(
        default=3e-3, metadata={"help": "peak AdamW learning rate (one-cycle schedule)", "above": 0}
    )
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "fraction held out for the zero-shot retrieval figure", "min": 0, "below": 1}
    )
    seed: int = field(
        default=0, metadata={"help": "seeds initialisation, shuffling and the held-out draw", **SEED_RANGE}
    )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ClipBundle:
    """A CLIP model with its processor, how it is named in records, and its weights hash."""

    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPProcessor
    name: str
    weights_sha256: str
    details: dict[str, Any]


# --- the reference CLIP model ---------------------------------------------------------------


def _clip_config(tokenizer: Any, t: ReferenceClipTraining) -> Any:
    from transformers import CLIPConfig

    common = {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.hidden_size * 4,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
    }
    return CLIPConfig(
        text_config={
            **common,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": t.max_caption_tokens,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**common, "image_size": t.image_size, "patch_size": t.patch_size},
        projection_dim=t.projection_dim,
    )


def _processor(tokenizer: Any, image_size: int) -> Any:
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> CLIP pixel values at `size` px, normalised to [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


def _tokens(tokenizer: Any, captions: Sequence[str], max_length: int) -> Any:
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def train_reference_clip(
    images: np.ndarray,
    captions: Sequence[str],
    training: ReferenceClipTraining,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train the reference model contrastively; returns (model, processor, report).

    The last `held_out_fraction` of the data (after a seeded shuffle) is held out
    for the zero-shot retrieval figure.
    """
    from transformers import CLIPModel

    torch.manual_seed(training.seed)
    rng = np.random.default_rng(training.seed)
    order = rng.permutation(len(captions))
    n_held = max(2, int(round(len(order) * training.held_out_fraction))) if len(order) >= 4 else 0
    train_idx, held_idx = order[: len(order) - n_held], order[len(order) - n_held :]
    tokenizer = build_tokenizer(
        [captions[i] for i in train_idx],
        TinyModelConfig(
            tokenizer_vocab_size=training.tokenizer_vocab_size, max_caption_tokens=training.max_caption_tokens
        ),
    )
    model = current_compute().place(CLIPModel(_clip_config(tokenizer, training)))
    device = model.device
    pixels = _pixels(images, training.image_size)
    tokens = _tokens(tokenizer, captions, training.max_caption_tokens)
    optimiser = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=training.learning_rate, total_steps=max(1, training.steps), pct_start=0.1
    )
    model.train()
    losses: list[float] = []
    for step in range(training.steps):
        batch = torch.from_numpy(rng.choice(train_idx, size=min(training.batch_size, len(train_idx)), replace=False))
        # Batches are drawn by the CPU's generator (numpy), then moved: the same batches on every device.
        out = model(
            input_ids=tokens.input_ids[batch].to(device),
            attention_mask=tokens.attention_mask[batch].to(device),
            pixel_values=pixels[batch].to(device),
            return_loss=True,
        )
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(out.loss.detach()))
        if on_step is not None:
            on_step(step + 1, training.steps, losses[-1])
    model.eval()
    report: dict[str, Any] = {
        "training": training.to_dict(),
        "train_pairs": len(train_idx),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
    }
    if n_held:
        report["retrieval"] = retrieval_accuracy(
            model, tokenizer, pixels[held_idx], [captions[i] for i in held_idx], training.max_caption_tokens
        )
    return model, _processor(tokenizer, training.image_size), report


@torch.no_grad()
def retrieval_accuracy(
    model: Any, tokenizer: Any, pixels: torch.Tensor, captions: Sequence[str], max_length: int
) -> dict[str, float | int]:
    """Zero-shot caption retrieval: for each image, is its own caption the closest of all candidates?"""
    tokens = _tokens(tokenizer, captions, max_length)
    device = model.device
    image = _features(model.get_image_features(pixel_values=pixels.to(device)))
    text = _features(
        model.get_text_features(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
    )
    sims = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    ranks = (sims > sims.diag()[:, None]).sum(dim=1)
    n = len(captions)
    return {
        "candidates": n,
        "top1": float((ranks < 1).float().mean()),
        "top5": float((ranks < 5).float().mean()),
        "chance_top1": 1.0 / n,
    }


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ModelError(
        f"{folder} has no model.safetensors or pytorch_model.bin; give a CLIP folder saved with save_pretrained"
    )


def reference_clip(
    *,
    public: Any,  # attacks.training_data.TrainingData
    cache_dir: Path,
    training: ReferenceClipTraining,
    on_step: Callable[[int, int, float], None] | None = None,
) -> ClipBundle:
    """The reference CLIP model for `public`, trained once and cached (a corrupt entry is rebuilt)."""
    import transformers

    inputs = {
        "public": public.fingerprint,
        "training": training.to_dict(),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }

    def build(folder: Path) -> None:
        images, captions = public.loaded
        model, processor, report = train_reference_clip(images, captions, training, on_step=on_step)
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))

    def load(folder: Path) -> ClipBundle:
        bundle = load_clip_folder(folder)
        bundle.name = "reference-clip"
        bundle.details = {**json.loads((folder / REPORT_FILE).read_text()), **bundle.details}
        return bundle

    bundle, hit, entry = cached(Path(cache_dir), "utility-clip", inputs, build, load)
    bundle.details.update(from_cache=hit, cache_key=entry.name)
    return bundle


def check_clip_folder(folder: Path) -> Path:
    """The folder, if its config.json names a CLIP model (cheap: no weights are read).

    Raises:
        ModelError: missing folder, unreadable config.json, or another kind of model.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelError(
            f"--clip-model {folder} {why_not_a_folder(folder)}; give a local CLIP folder (save_pretrained layout)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"--clip-model {folder}: no config.json there; give a local CLIP folder (save_pretrained layout)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"--clip-model {folder}: config.json is not readable JSON ({exc}); replace it") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise ModelError(
            f"--clip-model {folder} is not a CLIP model (config.json model_type {model_type!r}, expected 'clip'); "
            "give a folder such as a local copy of openai/clip-vit-large-patch14"
        )
    return folder


def load_clip_folder(folder: Path) -> ClipBundle:
    """A local CLIP folder (model + processor, save_pretrained layout); never downloads.

    Raises:
        ModelError: the folder is missing or is not a CLIP model with its processor.
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = check_clip_folder(folder)
    weights = _weights_file(folder)
    try:
        model = current_compute().place(CLIPModel.from_pretrained(folder, local_files_only=True).eval())
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"--clip-model {folder}: could not load the CLIP model and its processor "
            f"(tokenizer and preprocessor_config.json are needed): {exc}"
        ) from None
    return ClipBundle(
        model=model,
        processor=processor,
        name=str(getattr(model.config, "_name_or_path", "") or folder.name),
        weights_sha256=sha256_file(weights),
        details={"weights_file": weights.name},
    )


# --- feature networks for torchmetrics ----------------------------------------------------


class ClipAdapter(nn.Module):
    """Presents a CLIP model to torchmetrics with get_*_features returning tensors."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _features(self.model.get_text_features(*args, **kwargs))


class ClipImageFeatures(nn.Module):
    """Feature network for torchmetrics FID/KID: (N, 3, H, W) floats in [0, 1] -> CLIP image embeddings.

    Runs where the CLIP model is; the features come back on the images' device.
    """

    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.model = bundle.model
        vision = bundle.model.config.vision_config
        self.image_size = int(vision.image_size)
        processor = bundle.processor.image_processor
        self.register_buffer("mean", torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1))
        self.num_features = int(bundle.model.config.projection_dim)
        self.to(bundle.model.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.model.device)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = (x - self.mean) / self.std
        return _features(self.model.get_image_features(pixel_values=x)).to(images.device)


def fidelity_inception() -> type[nn.Module]:
    """torch-fidelity's FID Inception class, the network torchmetrics' FID runs.

    Raises:
        ConfigError: torch-fidelity is missing, or installed but cannot be imported
            (it imports torchvision, which must be built for the installed torch).
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ConfigError(
            "--fid-weights needs torch-fidelity for torchmetrics' Inception network: pip install torch-fidelity "
            "(or pip install 'torchmetrics[image]')"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as exc:  # an ImportError, or torchvision's operator registration failing
        raise ConfigError(
            f"--fid-weights needs torch-fidelity, which is installed but fails to import ({exc}); it imports "
            f"torchvision, which must be the build for torch {torch.__version__}: install the matching pair "
            "(e.g. pip install torch==2.14.1 torchvision==0.29.1), or drop --fid-weights to use the reference network"
        ) from None
    return FeatureExtractorInceptionV3


def inception_without_weights(device: str = "cpu") -> nn.Module:
    """torch-fidelity's FID Inception at its random initialisation (`meta`: shapes only, no memory)."""
    import tempfile

    cls = fidelity_inception()
    original = cls.load_state_dict
    with tempfile.TemporaryDirectory() as tmp:
        # Its constructor loads a weights file (or downloads one): hand it an empty state
        # dict and skip loading it, which leaves the layers as initialised.
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        try:
            cls.load_state_dict = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
            with torch.device(device):
                return cls("inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=str(empty))
        finally:
            cls.load_state_dict = original  # type: ignore[method-assign]


def inception_shapes() -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in inception_without_weights("meta").state_dict().items()}


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (torch-fidelity's) with weights from a local file, fed [0, 1] images.

    One instance serves FID and KID: torchmetrics' KID takes no weights path and,
    given the integer 2048, would download its own weights.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, weights: Path) -> None:
        super().__init__()
        check_fid_weights(weights)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = current_compute().place(
            NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(INCEPTION_FEATURES)],
                feature_extractor_weights_path=str(Path(weights).expanduser()),
            )
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        # What torchmetrics does with [0, 1] input (normalize=True) for its own Inception.
        features = self.net((images.to(device) * 255).byte()).reshape(len(images), -1)
        return features.to(images.device)


def check_fid_weights(path: Path) -> None:
    """A usable Inception weights file for torchmetrics' FID (torch-fidelity's FID Inception).

    Loaded with `weights_only=True` here, so a file that holds anything but tensors
    is refused before torch-fidelity (which unpickles it fully) ever opens it.

    Raises:
        ConfigError: missing file, not a state dict of the right shapes, or torch-fidelity unusable.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--fid-weights {path}: no such file; give torch-fidelity's FID Inception weights "
            "(pt_inception-2015-12-05-6726825d.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user error
        # torch's own message runs to paragraphs and suggests weights_only=False, which this refuses on purpose.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise ConfigError(
            f"--fid-weights {path} is not a PyTorch weights file of tensors only ({reason}); give torch-fidelity's "
            "FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"
        ) from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape)[-1] != INCEPTION_FEATURES:
        shape = None if fc is None else tuple(fc.shape)
        raise ConfigError(
            f"--fid-weights {path} is not an Inception-v3 state dict (fc.weight shape {shape}, expected (*, 2048)); "
            "give torch-fidelity's FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"
        )
    expected = inception_shapes()
    got = {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}
    wrong = [name for name in expected if got.get(name) != expected[name]]
    if wrong:
        name = wrong[0]
        raise ConfigError(
            f"--fid-weights {path} does not fit torch-fidelity's FID Inception: {len(wrong)} of {len(expected)} "
            f"tensors missing or of another shape (e.g. {name}: {got.get(name)} in the file, {expected[name]} "
            "expected); give pt_inception-2015-12-05-6726825d.pth or a file in its format"
        )
