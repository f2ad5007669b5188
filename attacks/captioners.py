"""Captioners for scenarios II and IV, where a query holds an image but no caption.

As in the paper (BLIP2 fine-tuned on the auxiliary data), a captioner is
pretrained, then fine-tuned on the attacker's auxiliary data; running it without
that fine-tuning reproduces the paper's ablation. Registered captioners:
- `tiny`: the embedded default, a small CNN + GRU trained on the public split
  with a word vocabulary learnt from the public captions (cached, safetensors);
- `blip`: a local BLIP or BLIP-2 folder (transformers), fine-tuned the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.training_data import TrainingData
from benchmark.kernel.cache import cached
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.errors import ConfigError, ModelError, why_not_a_folder
from benchmark.kernel.registry import Registry


class Captioner(Protocol):
    name: str
    # Recorded with each result; bump when the captioning changes.
    version: str

    def caption(self, images: np.ndarray) -> list[str]:
        """(N, H, W, 3) images in [0, 1] -> N captions."""
        ...

    def describe(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class CaptionerTraining:
    """Pretraining (public split) and fine-tuning (auxiliary data) recipes."""

    pretrain_epochs: int = field(
        default=40, metadata={"help": "tiny: pretraining epochs on the public split", "min": 1}
    )
    finetune_epochs: int = field(
        default=40, metadata={"help": "tiny: fine-tuning epochs on the auxiliary data", "min": 1}
    )
    batch_size: int = field(default=64, metadata={"help": "examples per optimizer step", "min": 1})
    learning_rate: float = field(default=3e-3, metadata={"help": "tiny: pretraining learning rate", "above": 0})
    finetune_learning_rate: float = field(
        default=1e-3, metadata={"help": "tiny: fine-tuning learning rate", "above": 0}
    )
    # Against forgetting.
    finetune_replay: float = field(
        default=1.0, metadata={"help": "public examples replayed per auxiliary example while fine-tuning", "min": 0}
    )
    # Pretrained transformers captioners (blip) need far gentler fine-tuning.
    hf_finetune_epochs: int = field(default=3, metadata={"help": "blip: fine-tuning epochs", "min": 1})
    hf_learning_rate: float = field(default=1e-5, metadata={"help": "blip: fine-tuning learning rate", "above": 0})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class CaptionerRequest:
    """What a captioner may need; each captioner uses what it needs.

    Attributes:
        public: data to pretrain on (`tiny`).
        auxiliary: the attacker's auxiliary data (captioned), to fine-tune on.
        fine_tune: False runs the pretrained captioner as is (the paper's ablation).
        path: a local model folder (`blip`).
        cache_dir: where trained captioners are cached (None: train in memory).
    """

    public: TrainingData | None = None
    auxiliary: TrainingData | None = None
    fine_tune: bool = True
    path: Path | None = None
    cache_dir: Path | None = None
    training: CaptionerTraining = field(default_factory=CaptionerTraining)
    seed: int = 0


CaptionerBuilder = Callable[..., Captioner]
CAPTIONERS: Registry[CaptionerBuilder] = Registry("captioner", entry_point_group="benchmark.captioners")


# The decorator: `@register_captioner("name", check=fn, needs_public_data=True)`; capabilities may also
# be attributes of a builder class.
register_captioner = CAPTIONERS.register


def build_captioner(name: str, request: CaptionerRequest | None = None) -> Captioner:
    return CAPTIONERS.get(name)(request or CaptionerRequest())


def _torch_version() -> str:
    from importlib import metadata

    return metadata.version("torch").split("+")[0]


def _device(net: nn.Module) -> torch.device:
    # Captioners stay in fp32 (no autocast) on every device: the captions an attack queries
    # with do not depend on --precision, which only changes the target's arithmetic.
    return next(net.parameters()).device


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in [0, 1], got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


# --- tiny: CNN + GRU -------------------------------------------------------------------

TINY_VERSION = "1"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
_WORD = re.compile(r"\w+|[^\w\s]")


def words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


@dataclass(frozen=True)
class WordVocabulary:
    """A word-level tokenizer learnt from the public captions (no download)."""

    tokens: tuple[str, ...]

    @classmethod
    def learn(cls, captions: Sequence[str], max_size: int) -> WordVocabulary:
        counts = Counter(w for c in captions for w in words(c))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, max_size - len(SPECIALS))]
        return cls(SPECIALS + tuple(ranked))

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.tokens)}

    def encode(self, captions: Sequence[str], max_words: int) -> torch.Tensor:
        """<bos> words <eos>, padded: (N, max_words + 2)."""
        index = self.index
        out = torch.full((len(captions), max_words + 2), PAD, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = [BOS] + [index.get(w, UNK) for w in words(caption)][:max_words] + [EOS]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.tokens[i])
        return re.sub(r" ([^\w\s])", r"\1", " ".join(out))


@dataclass(frozen=True)
class TinyCaptionerConfig:
    # Measured on scenes at 16 px: a third convolution or wider layers trained
    # slower AND captioned worse within the same budget.
    width: int = 16
    channels: int = 32
    grid: int = 4
    hidden: int = 128
    embedding: int = 64
    max_words: int = 24
    max_vocabulary: int = 2000
    max_side: int = 64

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _network(config: TinyCaptionerConfig, vocab_size: int) -> nn.ModuleDict:
    # Stock modules only; `_logits` and `_greedy` below are the forward passes.
    return nn.ModuleDict(
        {
            "cnn": nn.Sequential(
                nn.Conv2d(3, config.width, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(config.width, config.channels, 3, stride=2, padding=1),
                nn.GELU(),
                nn.AdaptiveAvgPool2d(config.grid),
                nn.Flatten(),
            ),
            "image": nn.Linear(config.channels * config.grid**2, config.hidden),
            "embed": nn.Embedding(vocab_size, config.embedding, padding_idx=PAD),
            "gru": nn.GRU(config.embedding + config.hidden, config.hidden, batch_first=True),
            "out": nn.Linear(config.hidden, vocab_size),
        }
    )


def _prepare(images: np.ndarray, max_side: int) -> torch.Tensor:
    x = _as_tensor(images).mul(2).sub(1)
    side = max(x.shape[-2:])
    if side > max_side:
        scale = max_side / side
        x = F.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)), mode="area")
    return x


def _image_state(net: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(net["image"](net["cnn"](x)))


def _logits(net: nn.ModuleDict, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    image = _image_state(net, x)
    inputs = torch.cat([net["embed"](tokens), image[:, None].expand(-1, tokens.shape[1], -1)], dim=-1)
    hidden, _ = net["gru"](inputs, image[None].contiguous())
    return net["out"](hidden)


@torch.no_grad()
def _greedy(net: nn.ModuleDict, x: torch.Tensor, max_words: int) -> list[list[int]]:
    image = _image_state(net, x)
    state = image[None].contiguous()
    token = torch.full((len(x), 1), BOS, dtype=torch.long, device=x.device)
    out = []
    for _ in range(max_words + 1):
        step_in = torch.cat([net["embed"](token), image[:, None]], dim=-1)
        hidden, state = net["gru"](step_in, state)
        token = net["out"](hidden).argmax(dim=-1)
        out.append(token)
    return torch.cat(out, dim=1).tolist()


def train_tiny_captioner(
    net: nn.ModuleDict,
    vocab: WordVocabulary,
    data: TrainingData,
    config: TinyCaptionerConfig,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    replay: TrainingData | None = None,
    replay_ratio: float = 0.0,
) -> list[float]:
    """Teacher-forced cross-entropy on (image, caption) pairs, cosine learning-rate decay.

    Args:
        replay: earlier training data mixed into every epoch (`replay_ratio` replayed
            examples per example of `data`), so fine-tuning does not forget it.

    Returns:
        per-epoch mean losses.
    """
    torch.manual_seed(seed)
    # Shuffles are drawn on the CPU's generator and batches moved after: a seed names the same
    # order on every device.
    generator = torch.Generator().manual_seed(seed)
    device = _device(current_compute().place(net))
    images, captions = data.images, data.captions
    n_data, n_replay = len(images), 0
    if replay is not None and replay_ratio > 0:
        images = np.concatenate([images, replay.images])
        captions = captions + replay.captions
        n_replay = min(len(replay.images), int(round(replay_ratio * n_data)))
    x_all = _prepare(images, config.max_side)
    tokens = vocab.encode(captions, config.max_words)
    # Padding to the longest caption rather than max_words halves the GRU's work.
    tokens = tokens[:, : int((tokens != PAD).sum(dim=1).max())]
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    per_epoch = n_data + n_replay
    total = max(1, epochs * -(-per_epoch // batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + float(np.cos(np.pi * min(step, total) / total)))
    )
    net.train()
    losses = []
    for _epoch in range(epochs):
        replayed = n_data + torch.randperm(len(x_all) - n_data, generator=generator)[:n_replay]
        chosen = torch.cat([torch.arange(n_data), replayed])
        order = chosen[torch.randperm(len(chosen), generator=generator)]
        epoch_losses = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seq = tokens[idx].to(device)
            logits = _logits(net, x_all[idx].to(device), seq[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), ignore_index=PAD)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(float(np.mean(epoch_losses)))
    net.eval()
    return losses


def _save_tiny(folder: Path, net: nn.ModuleDict, vocab: WordVocabulary, info: dict[str, object]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.cpu().contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "vocabulary.json").write_text(json.dumps(list(vocab.tokens)))
    (folder / "info.json").write_text(json.dumps(info, indent=2, default=str))


def _load_tiny(folder: Path, config: TinyCaptionerConfig) -> tuple[nn.ModuleDict, WordVocabulary, dict[str, Any]]:
    from safetensors.torch import load_file

    vocab = WordVocabulary(tuple(json.loads((folder / "vocabulary.json").read_text())))
    net = _network(config, len(vocab.tokens))
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return current_compute().place(net.eval()), vocab, json.loads((folder / "info.json").read_text())


@register_captioner("tiny")
class TinyCaptioner:
    """Small CNN + GRU, pretrained on the public split, fine-tuned on the auxiliary data (cached)."""

    name = "tiny"
    version = TINY_VERSION
    needs_public_data = True

    def __init__(self, request: CaptionerRequest | None = None) -> None:
        request = request or CaptionerRequest()
        self.check(request)
        assert request.public is not None
        self.config = TinyCaptionerConfig()
        self.fine_tuned = bool(request.fine_tune and request.auxiliary is not None)
        training, seed, config = request.training, request.seed, self.config
        public = request.public
        base_inputs: dict[str, object] = {
            "public": public.fingerprint,
            "architecture": config.to_dict(),
            "epochs": training.pretrain_epochs,
            "batch_size": training.batch_size,
            "learning_rate": training.learning_rate,
            "seed": seed,
            "version": TINY_VERSION,
            "torch": _torch_version(),
        }

        def build_base(folder: Path) -> None:
            vocab = WordVocabulary.learn(public.captions, config.max_vocabulary)
            torch.manual_seed(seed)
            net = _network(config, len(vocab.tokens))
            losses = train_tiny_captioner(
                net,
                vocab,
                public,
                config,
                epochs=training.pretrain_epochs,
                batch_size=training.batch_size,
                learning_rate=training.learning_rate,
                seed=seed,
            )
            _save_tiny(folder, net, vocab, {"pretrain_loss_per_epoch": losses})

        def build_tuned(folder: Path) -> None:
            assert request.auxiliary is not None
            net, vocab, info = self.load_or_build("captioner-tiny", base_inputs, build_base, request.cache_dir)
            losses = train_tiny_captioner(
                net,
                vocab,
                request.auxiliary,
                config,
                epochs=training.finetune_epochs,
                batch_size=training.batch_size,
                learning_rate=training.finetune_learning_rate,
                seed=seed + 1,
                replay=public,
                replay_ratio=training.finetune_replay,
            )
            _save_tiny(folder, net, vocab, {**info, "finetune_loss_per_epoch": losses})

        if self.fine_tuned:
            assert request.auxiliary is not None
            inputs = {
                "base": base_inputs,
                "auxiliary": request.auxiliary.fingerprint,
                "epochs": training.finetune_epochs,
                "learning_rate": training.finetune_learning_rate,
                "replay": training.finetune_replay,
            }
            self.net, self.vocab, info = self.load_or_build("captioner-tiny-ft", inputs, build_tuned, request.cache_dir)
        else:
            self.net, self.vocab, info = self.load_or_build(
                "captioner-tiny", base_inputs, build_base, request.cache_dir
            )
        self.details: dict[str, object] = {
            "pretrained_on": "public split",
            "fine_tuned_on": "auxiliary data" if self.fine_tuned else None,
            "training": training.to_dict(),
            "seed": seed,
            "vocabulary_size": len(self.vocab.tokens),
            **info,
        }

    def load_or_build(
        self, kind: str, inputs: dict[str, object], build: Callable[[Path], None], cache_dir: Path | None
    ) -> tuple[nn.ModuleDict, WordVocabulary, dict[str, Any]]:
        def load(folder: Path) -> tuple[nn.ModuleDict, WordVocabulary, dict[str, Any]]:
            return _load_tiny(folder, self.config)

        if cache_dir is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                build(Path(tmp))
                return load(Path(tmp))
        loaded, hit, _ = cached(Path(cache_dir), kind, inputs, build, load)
        return loaded[0], loaded[1], {**loaded[2], f"{kind}_from_cache": hit}

    @staticmethod
    def check(request: CaptionerRequest) -> None:
        if request.public is None:
            raise ConfigError(
                "captioner 'tiny' is pretrained on the public split, but this run has none; "
                "use --captioner blip --captioner-path DIR"
            )

    def caption(self, images: np.ndarray) -> list[str]:
        x = _prepare(images, self.config.max_side)
        device = _device(self.net)
        out: list[str] = []
        for start in range(0, len(x), 256):
            ids = _greedy(self.net, x[start : start + 256].to(device), self.config.max_words)
            out += [self.vocab.decode(row) for row in ids]
        return out

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "fine_tuned": self.fine_tuned,
            "architecture": self.config.to_dict(),
            **self.details,
        }


# --- blip: a local BLIP / BLIP-2 folder --------------------------------------------------

BLIP_TYPES = {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration"}
# BLIP's image processor defaults (OpenAI CLIP statistics) if the folder has no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def inspect_blip_folder(path: Path) -> str:
    """The folder's model type ('blip' or 'blip-2'), from its config alone.

    Raises:
        ModelError: missing folder, no transformers config, or not a BLIP/BLIP-2 model.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(
            f"captioner folder {path} {why_not_a_folder(path)}; pass --captioner-path DIR, a local BLIP or BLIP-2 "
            "folder saved with save_pretrained; nothing is downloaded"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json: not a transformers model folder")
    try:
        model_type = str(json.loads(config_file.read_text()).get("model_type", ""))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc.msg})") from None
    if model_type not in BLIP_TYPES:
        raise ModelError(
            f"{path} holds a {model_type or 'unknown'!r} model; --captioner blip needs a BLIP or BLIP-2 "
            "captioning model (BlipForConditionalGeneration / Blip2ForConditionalGeneration)"
        )
    return model_type


def _folder_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _load_blip(path: Path, model_type: str) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoTokenizer

    model_class = getattr(transformers, BLIP_TYPES[model_type])
    try:
        model = model_class.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the captioner in {path}: {exc}") from exc
    return current_compute().place(model.eval()), tokenizer


@register_captioner("blip")
class BlipCaptioner:
    """A local BLIP or BLIP-2 folder (transformers), fine-tuned on the auxiliary data (cached)."""

    name = "blip"
    version = "1"
    needs_public_data = False
    batch_size = 16
    max_new_tokens = 30

    def __init__(self, request: CaptionerRequest | None = None) -> None:
        request = request or CaptionerRequest()
        self.check(request)
        assert request.path is not None
        source = Path(request.path).expanduser().resolve()
        self.model_type = inspect_blip_folder(source)
        self.source = source
        self.fingerprint = _folder_fingerprint(source)
        self.fine_tuned = bool(request.fine_tune and request.auxiliary is not None)
        self.training = request.training
        folder = source
        self.details: dict[str, object] = {}
        if self.fine_tuned:
            assert request.auxiliary is not None
            auxiliary = request.auxiliary
            inputs = {
                "source": str(source),
                "fingerprint": self.fingerprint,
                "auxiliary": auxiliary.fingerprint,
                "epochs": self.training.hf_finetune_epochs,
                "learning_rate": self.training.hf_learning_rate,
                "batch_size": self.batch_size,
                "seed": request.seed,
            }

            def build(out: Path) -> None:
                model, tokenizer = _load_blip(source, self.model_type)
                losses = self.fine_tune(model, tokenizer, auxiliary, seed=request.seed)
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)
                for extra in ("preprocessor_config.json",):
                    if (source / extra).is_file():
                        (out / extra).write_text((source / extra).read_text())
                (out / "finetune.json").write_text(json.dumps({"loss_per_epoch": losses}))

            if request.cache_dir is None:
                raise ConfigError("fine-tuning a BLIP captioner needs a cache folder (--cache-dir)")
            folder, hit, _ = cached(Path(request.cache_dir), "captioner-blip-ft", inputs, build, lambda f: f)
            self.details = {"from_cache": hit, **json.loads((folder / "finetune.json").read_text())}
        self.model, self.tokenizer = _load_blip(folder, self.model_type)

    @staticmethod
    def check(request: CaptionerRequest) -> None:
        if request.path is None:
            raise ConfigError("--captioner blip needs --captioner-path DIR: a local BLIP or BLIP-2 folder")
        inspect_blip_folder(request.path)

    def pixels(self, images: np.ndarray, model: Any) -> torch.Tensor:
        size = int(model.config.vision_config.image_size)
        x = _as_tensor(images)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        processor = self.source / "preprocessor_config.json"
        mean, std = CLIP_MEAN, CLIP_STD
        if processor.is_file():
            data = json.loads(processor.read_text())
            mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    def fine_tune(self, model: Any, tokenizer: Any, data: TrainingData, *, seed: int) -> list[float]:
        """Language-modelling loss on the auxiliary captions; BLIP-2's language model stays frozen."""
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        if self.model_type == "blip-2":
            model.requires_grad_(False)
            for part in (model.qformer, model.language_projection):
                part.requires_grad_(True)
            model.query_tokens.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.training.hf_learning_rate)
        pixels = self.pixels(data.images, model)
        device = _device(model)
        model.train()
        losses = []
        for _epoch in range(self.training.hf_finetune_epochs):
            order = torch.randperm(len(pixels), generator=generator)
            epoch = []
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size].tolist()
                tokens = tokenizer(
                    [data.captions[i] for i in idx], padding=True, truncation=True, max_length=40, return_tensors="pt"
                )
                input_ids = tokens.input_ids.clone()
                if self.model_type == "blip":
                    # BLIP's generate() starts every caption with the decoder's BOS token.
                    input_ids[:, 0] = model.config.text_config.bos_token_id
                labels = input_ids.masked_fill(tokens.attention_mask == 0, -100)
                out = model(
                    pixel_values=pixels[idx].to(device),
                    input_ids=input_ids.to(device),
                    attention_mask=tokens.attention_mask.to(device),
                    labels=labels.to(device),
                )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                epoch.append(float(out.loss.detach()))
            losses.append(float(np.mean(epoch)))
        model.eval()
        return losses

    def caption(self, images: np.ndarray) -> list[str]:
        out: list[str] = []
        device = _device(self.model)
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                pixels = self.pixels(images[start : start + self.batch_size], self.model).to(device)
                ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False)
                out += [t.strip() for t in self.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)]
        return out

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.source),
            "model_type": self.model_type,
            "fingerprint": self.fingerprint,
            "fine_tuned": self.fine_tuned,
            "training": {
                "epochs": self.training.hf_finetune_epochs,
                "learning_rate": self.training.hf_learning_rate,
            },
            **self.details,
        }
