"""A text-to-image diffusion model in diffusers' folder layout, tiny or Stable Diffusion.

The embedded default and Stable Diffusion v1-5 go through the same class, the same
loader and the same training and sampling code; only the folder differs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers.utils.logging
import numpy as np
import torch
import transformers.utils.logging
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from benchmark.kernel.compute import Compute
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.errors import ModelError, why_not_a_folder
from benchmark.pipeline.data.base import images_to_tensor, tensor_to_images
from benchmark.pipeline.models.sampling import SamplingBatch, SamplingHooks
from benchmark.pipeline.models.weights import check_weights
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget, SamplingConfig

# Images per VAE encoder call.
VAE_CHUNK = 16
REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
WEIGHTS_SUBFOLDERS = ("unet", "text_encoder", "vae")

# Their per-file bars would drown the benchmark's own progress display.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


@dataclass
class DiffusionModel:
    """Components of a (latent or pixel-space) text-conditioned diffusion model."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None
    # A generation-time defense's changes to sampling (not saved with the weights:
    # they come from the defense's config, which keys the cache).
    sampling_hooks: SamplingHooks = field(default_factory=SamplingHooks)

    @property
    def latent_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.latent_scale

    @property
    def device(self) -> torch.device:
        # From a parameter, not `unet.device`: during training the UNet may be wrapped (PEFT, Opacus).
        return next(self.unet.parameters()).device

    def place(self, compute: Compute | None = None) -> DiffusionModel:
        """Every network of the model on the active (or given) device; weights keep their fp32 masters."""
        compute = compute or current_compute()
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                compute.place(module)
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.text_context(captions)

    def text_context(self, captions: list[str]) -> torch.Tensor:
        """The text encoder's hidden states for `captions`, with gradients where the encoder trains."""
        return self.text_encoder(self._tokens(captions).input_ids.to(self.text_encoder.device))[0]

    def token_mask(self, captions: list[str]) -> torch.Tensor:
        """(N, tokens) bool: which positions of each caption's context are its own tokens, not padding."""
        return self._tokens(captions).attention_mask.bool().to(self.text_encoder.device)

    def _tokens(self, captions: list[str]) -> object:
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    def images_to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the space the UNet denoises."""
        images = images.to(self.device)
        if self.vae is None:
            return images
        # The VAE runs outside autocast (Stable Diffusion's VAE overflows in fp16), in chunks:
        # at 512 px its activations for a few dozen images fill a GPU.
        with torch.no_grad():
            latents = torch.cat(
                [self.vae.encode(chunk.to(self.vae.dtype)).latent_dist.sample() for chunk in images.split(VAE_CHUNK)]
            )
        return latents * self.vae.config.scaling_factor

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.float()
        if self.vae is None:
            return latents.clamp(-1, 1)
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def save(self, path: Path) -> None:
        """Write a diffusers-format folder (safetensors weights), loadable by `load_model`."""
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.noise_scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae", safe_serialization=True)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "vae": ["diffusers", "AutoencoderKL"] if self.vae is not None else [None, None],
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def check_model_folder(path: Path) -> Path:
    """The resolved folder, if it has a diffusers text-to-image layout (cheap: no weights are read).

    Raises:
        ModelError: the folder is missing or is not a diffusers text-to-image folder.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(
            f"model folder {path} {why_not_a_folder(path)}. Pass --model-path DIR pointing at a local "
            "diffusers folder (e.g. a copy of stable-diffusion-v1-5 made with save_pretrained); "
            "nothing is downloaded."
        )
    missing = [sub + "/" for sub in REQUIRED_SUBFOLDERS if not (path / sub).is_dir()]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise ModelError(
            f"{path} is not a diffusers text-to-image folder: expected model_index.json and the "
            f"subfolders {', '.join(REQUIRED_SUBFOLDERS)} (+ vae for latent models); "
            f"missing: {', '.join(missing)}. Save one with "
            "StableDiffusionPipeline.save_pretrained(DIR)."
        )
    for sub in WEIGHTS_SUBFOLDERS:
        if (path / sub).is_dir():
            check_weights(path / sub, flag="--model-path")
    return path


def load_model(path: Path) -> DiffusionModel:
    """Load a diffusers text-to-image folder (Stable Diffusion v1-5 layout) from disk only.

    Raises:
        ModelError: the folder is missing or is not a diffusers text-to-image folder.
    """
    path = check_model_folder(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
        vae = None
        if (path / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load the diffusers folder {path}: {exc}") from exc
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval()
    text_encoder.requires_grad_(False)
    if vae is not None:
        vae.requires_grad_(False)
    model = DiffusionModel(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=scheduler, vae=vae
    )
    return model.place()


@torch.no_grad()
def generate(
    model: DiffusionModel,
    captions: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 256,
) -> torch.Tensor:
    """Sample one image per caption with DDIM and classifier-free guidance; NCHW in [-1, 1]."""
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    unet = model.unet
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    channels = unet.config.in_channels
    size = unet.config.sample_size
    uncond = model.encode_text([""])
    outputs = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        # Drawn on the CPU, then moved: a seed names the same starting noise on every device.
        latents = torch.randn((len(chunk), channels, size, size), generator=generator).to(model.device)
        latents = latents * scheduler.init_noise_sigma
        images = _fitting(
            lambda sub, lat: model.latents_to_images(
                _sample(model, scheduler, lat, sub, uncond, scheduler.timesteps, guidance_scale)
            ),
            chunk,
            latents,
        )
        outputs.append(images)
    unet.train(was_training)
    return torch.cat(outputs)


def _fitting(
    run: Callable[[list[str], torch.Tensor], torch.Tensor], captions: list[str], latents: torch.Tensor
) -> torch.Tensor:
    """`run` over one batch, halved and retried where the accelerator runs out of memory.

    The batch's noise is drawn before the split, so the images do not depend on
    where it was split; results come back to the CPU.
    """
    try:
        return run(captions, latents).float().cpu()
    except torch.OutOfMemoryError:
        if len(captions) == 1 or latents.device.type == "cpu":
            raise
        torch.cuda.empty_cache()
        half = len(captions) // 2
        return torch.cat(
            [_fitting(run, captions[:half], latents[:half]), _fitting(run, captions[half:], latents[half:])]
        )


def _sample(
    model: DiffusionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    captions: list[str],
    uncond: torch.Tensor,
    timesteps: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Denoise one batch from `latents` with its captions, through the model's sampling hooks."""
    use_cfg = guidance_scale != 1.0
    cond = model.encode_text(captions)
    uncond = uncond.expand(len(captions), -1, -1)
    hooks = model.sampling_hooks
    attention: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if hooks.changes_sampling:
        batch = SamplingBatch(
            unet=model.unet,
            cond=cond,
            uncond=uncond,
            token_mask=model.token_mask(captions),
            latents=latents,
            timestep=timesteps[0],
            guided=use_cfg,
        )
        cond = batch.cond = hooks.context(batch)
        attention = hooks.attention(batch)
    context = torch.cat([uncond, cond]) if use_cfg else cond
    with attention:
        return _denoise(model.unet, scheduler, latents, context, timesteps, guidance_scale)


def _denoise(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    context: torch.Tensor,
    timesteps: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """DDIM from `latents` over `timesteps`; with guidance, `context` is [uncond; cond]."""
    use_cfg = guidance_scale != 1.0
    autocast = current_compute().autocast
    for t in timesteps:
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        with autocast():
            # The scheduler's arithmetic stays fp32; only the UNet runs in the autocast dtype.
            prediction = unet(model_in, t, encoder_hidden_states=context).sample.float()
        if use_cfg:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents


@torch.no_grad()
def img2img(
    model: DiffusionModel,
    images: torch.Tensor,
    captions: list[str],
    *,
    strength: float,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 256,
) -> torch.Tensor:
    """Noise each image to `strength` and denoise it with its caption (SDEdit, as diffusers'
    img2img pipeline does): DDIM over the last `strength` fraction of the schedule.

    Args:
        images: NCHW in [-1, 1], one per caption.
        strength: in (0, 1]; 1 starts from pure noise (plain text-to-image).

    Returns:
        NCHW in [-1, 1].
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    # At least one denoising step, however small the strength.
    start_steps = min(num_inference_steps, max(1, int(round(num_inference_steps * strength))))
    timesteps = scheduler.timesteps[num_inference_steps - start_steps :]
    unet = model.unet
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    uncond = model.encode_text([""])
    outputs = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        init = model.images_to_latents(images[start : start + batch_size].float())
        noise = torch.randn(init.shape, generator=generator).to(init.device)
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(chunk)).to(init.device))
        images_out = _fitting(
            lambda sub, lat: model.latents_to_images(
                _sample(model, scheduler, lat, sub, uncond, timesteps, guidance_scale)
            ),
            chunk,
            latents,
        )
        outputs.append(images_out)
    unet.train(was_training)
    return torch.cat(outputs)


def black_box(model: object, sampling: SamplingConfig, *, name: str) -> BlackBoxTarget:
    """Text-to-image and image-to-image access to `model`, sampled as `sampling` says."""
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"expected a DiffusionModel, got {type(model).__name__}")

    def generate_fn(captions: list[str], seed: int) -> np.ndarray:
        images = generate(
            model,
            captions,
            seed=seed,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            batch_size=sampling.batch_size,
        )
        return tensor_to_images(images)

    def img2img_fn(images: np.ndarray, captions: list[str], strength: float, seed: int) -> np.ndarray:
        out = img2img(
            model,
            images_to_tensor(list(images)),
            captions,
            strength=strength,
            seed=seed,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            batch_size=sampling.batch_size,
        )
        return tensor_to_images(out)

    return BlackBoxTarget(generate_fn, name=name, img2img_fn=img2img_fn)


@torch.no_grad()
def predict_noise(
    model: DiffusionModel,
    images: torch.Tensor,
    captions: list[str],
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """eps_theta(x_t, t, c) where x_t is each image's latent noised with `noise` at `timesteps`.

    The latent is the VAE posterior's mean (deterministic, as attack code on Stable
    Diffusion encodes queries). A v-prediction model's output is converted to the
    noise it implies, so callers always compare against the noise.

    Args:
        images: NCHW in [-1, 1].
        captions: one per image ("" is the null caption).
        timesteps: (N,) int64 training timesteps.
        noise: (N, *latent_shape).
    """
    unet, scheduler = model.unet, model.noise_scheduler
    was_training = unet.training
    unet.eval()
    outputs = []
    alphas = scheduler.alphas_cumprod
    for start in range(0, len(captions), batch_size):
        stop = start + batch_size
        x = images[start:stop].float().to(model.device)
        if model.vae is None:
            latents = x
        else:
            latents = model.vae.encode(x).latent_dist.mean * model.vae.config.scaling_factor
        eps, t = noise[start:stop].to(latents.device), timesteps[start:stop].to(latents.device)
        noisy = scheduler.add_noise(latents, eps, t)
        with current_compute().autocast():
            out = unet(noisy, t, encoder_hidden_states=model.encode_text(captions[start:stop])).sample.float()
        if scheduler.config.prediction_type == "v_prediction":
            a = alphas.to(t.device)[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - alphas.to(t.device)[t]).sqrt().view(-1, 1, 1, 1)
            out = a * out + s * noisy
        elif scheduler.config.prediction_type != "epsilon":
            raise ModelError(
                f"gray-box access needs an epsilon or v-prediction model, not {scheduler.config.prediction_type!r}"
            )
        outputs.append(out.float().cpu())
    unet.train(was_training)
    return torch.cat(outputs)


def gray_box(model: object, *, name: str, batch_size: int = 256) -> GrayBoxTarget:
    """Gray-box access to `model`: its noise prediction for caller-chosen inputs, never its weights.

    Deterministic for a fixed seed (the noise is drawn for all N inputs at once, so the
    answer does not depend on `batch_size`, only the number of images per UNet call does).
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"expected a DiffusionModel, got {type(model).__name__}")
    size = int(model.unet.config.sample_size)
    latent_shape = (int(model.unet.config.in_channels), size, size)

    def predict_fn(
        images: np.ndarray, captions: list[str], timesteps: np.ndarray, noise: np.ndarray | None, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if noise is None:
            drawn = torch.randn((len(images), *latent_shape), generator=torch.Generator().manual_seed(seed))
        else:
            drawn = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
        prediction = predict_noise(
            model,
            images_to_tensor(list(images)),
            captions,
            torch.from_numpy(np.asarray(timesteps, dtype=np.int64)),
            drawn,
            batch_size=batch_size,
        )
        return drawn.numpy().astype(np.float32), prediction.numpy().astype(np.float32)

    return GrayBoxTarget(
        predict_fn,
        name=name,
        num_train_timesteps=int(model.noise_scheduler.config.num_train_timesteps),
        latent_shape=latent_shape,
    )
