"""The embedded default: a tiny Stable-Diffusion-shaped model built from diffusers/transformers classes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from benchmark.pipeline.models.diffusion import DiffusionModel


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture of the embedded default model (pixel space, no VAE)."""

    block_out_channels: tuple[int, ...] = (32, 48, 64)
    # Cross-attention only at the coarsest level(s): 3x faster on a CPU than at
    # full resolution, and captions only describe coarse layout anyway.
    attention_levels: int = 1
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_caption_tokens: int = 24
    tokenizer_vocab_size: int = 400
    train_timesteps: int = 1000
    prediction_type: str = "v_prediction"
    tokenizer_ids: str = "sorted"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def build_tokenizer(corpus: Sequence[str], config: TinyModelConfig) -> CLIPTokenizer:
    """Train a CLIP BPE tokenizer on the captions locally (no download)."""
    trained = CLIPTokenizer().train_new_from_iterator(list(corpus), vocab_size=config.tokenizer_vocab_size)
    # The BPE trainer hands out ids in hash-map order, which changes from call to call;
    # renumbering the learned tokens in sorted order makes the model a function of its seed.
    state = json.loads(trained.backend_tokenizer.to_str())
    specials = [str(trained.bos_token), str(trained.eos_token)]
    ordered = specials + sorted(token for token in state["model"]["vocab"] if token not in specials)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(ordered)}, merges=merges)
    tokenizer.model_max_length = config.max_caption_tokens
    return tokenizer


def build_tiny_model(*, corpus: Sequence[str], resolution: int, config: TinyModelConfig, seed: int) -> DiffusionModel:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus, config)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_hidden_size * 4,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_caption_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    plain = len(config.block_out_channels) - config.attention_levels
    unet = UNet2DConditionModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * config.attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * config.attention_levels + ("UpBlock2D",) * plain,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=8,
    )
    # v-prediction: with epsilon-prediction a small pixel-space model barely learns to
    # use the caption, because at high noise predicting the noise is trivial.
    scheduler = DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=config.prediction_type,
    )
    return DiffusionModel(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=scheduler)
