"""A randomly initialised, tiny but real Stable Diffusion pipeline: VAE, CLIP text encoder, UNet.

For tests and the GPU check (`benchmark.app.bench_gpu`), which need a latent model
in the layout of a user's Stable Diffusion folder without downloading one. Its
weights are random, so nothing it generates or leaks means anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def build_tiny_sd_pipeline(corpus: Sequence[str], *, sample_size: int = 8, latent_scale: int = 2, seed: int = 0) -> Any:
    """A `StableDiffusionPipeline` at a tiny width; save it with `save_pretrained`, load it with `load_model`.

    The defaults give 16 px images from 8 px latents; `sample_size=64, latent_scale=8`
    gives Stable Diffusion v1-5's shapes, 512 px images from 64 px latents.

    Args:
        corpus: captions the tokenizer's vocabulary is learnt from.
        sample_size: the latent side the UNet denoises.
        latent_scale: how much the VAE downsamples: 2 ** (VAE blocks - 1).
        seed: seeds every weight.

    Raises:
        ValueError: `latent_scale` is not a power of 2 from 2.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vae_blocks = latent_scale.bit_length()
    if latent_scale < 2 or latent_scale != 1 << (vae_blocks - 1):
        raise ValueError(f"latent_scale must be a power of 2 from 2, got {latent_scale}")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer().train_new_from_iterator(list(corpus), vocab_size=300)
    tokenizer.model_max_length = 16
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32,) + (64,) * (vae_blocks - 1),
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        latent_channels=4,
        sample_size=sample_size * latent_scale,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
