"""Cross-attention mitigation of memorisation at generation time (Ren et al., ECCV 2024).

Ren et al. find that a memorised prompt concentrates the UNet's cross-attention on
a few of its tokens, while ordinary prompts spread it and lean on the start token.
Their inference-time fix changes only how the UNet attends to the text, in the
conditional branch of sampling (their ``text2img.py --c1 1.25 --cross_attn_mask``):

- ``bos_scale`` (c1): the pre-softmax attention logit of the start token is
  multiplied by this factor (1.25 in their script), which moves attention towards
  the start token and away from the prompt's words;
- ``mask_padding``: attention to positions past the prompt's own tokens (the padding
  that CLIP's fixed-length context adds) is masked out.

Weights are unchanged and no UNet call is added; the hooks run inside the black
box only, so a gray-box attacker who queries the denoiser directly sees the
unmitigated model. With classifier-free guidance the unconditional half gets the
same padding mask and no start-token scaling, as in their code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.models.sampling import SamplingBatch, SamplingHooks
from defenses.base import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class RenConfig(DefenseConfig):
    """How the conditional cross-attention is changed during sampling."""

    # Factor on the start token's pre-softmax logit in the conditional branch (Ren et al.: 1.25; 1: unchanged).
    bos_scale: float = 1.25
    # Mask attention to the padding past each prompt's own tokens.
    mask_padding: bool = True

    def __post_init__(self) -> None:
        scale = self.bos_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"ren bos_scale must be a finite number > 0, got {scale!r}")
        if not isinstance(self.mask_padding, bool):
            raise ConfigError(f"ren mask_padding must be true or false, got {self.mask_padding!r}")
        if scale == 1 and not self.mask_padding:
            raise ConfigError("ren with bos_scale 1 and mask_padding false changes nothing; use the 'none' defense")


class _Attending:
    """One attention processor of the UNet, with cross-attention changed for the current batch."""

    def __init__(self, inner: object, config: RenConfig, batch: SamplingBatch) -> None:
        self.inner, self.config, self.batch = inner, config, batch

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:  # self-attention is left alone
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)  # type: ignore[operator]
        return cross_attention(attn, hidden_states, encoder_hidden_states, temb, self.config, self.batch)


def cross_attention(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    temb: torch.Tensor | None,
    config: RenConfig,
    batch: SamplingBatch,
) -> torch.Tensor:
    """diffusers' scaled dot-product cross-attention, with the logits changed before the softmax."""
    a: object = attn
    residual = hidden_states
    if getattr(a, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    four_d = hidden_states.ndim == 4
    if four_d:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(a, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if getattr(a, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    rows, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(rows, -1, heads, head_dim).transpose(1, 2)
    key = key.view(rows, -1, heads, head_dim).transpose(1, 2)
    value = value.view(rows, -1, heads, head_dim).transpose(1, 2)
    if getattr(a, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(a, "norm_k", None) is not None:
        key = attn.norm_k(key)
    logits = (query @ key.transpose(-2, -1)) * attn.scale
    n = len(batch.token_mask)
    conditional = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    conditional[rows - n :] = True  # [uncond; cond] under guidance, cond alone otherwise
    if config.bos_scale != 1:
        logits[conditional, :, :, 0] = logits[conditional, :, :, 0] * config.bos_scale
    if config.mask_padding:
        mask = batch.token_mask.repeat(rows // n, 1)  # the prompt's mask for both halves
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.softmax(logits.float(), dim=-1).to(value.dtype) @ value
    out = out.transpose(1, 2).reshape(rows, -1, heads * head_dim)
    out = attn.to_out[1](attn.to_out[0](out))
    if four_d:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if getattr(a, "residual_connection", False):
        out = out + residual
    return out / getattr(a, "rescale_output_factor", 1.0)


class RenSampling(SamplingHooks):
    """Installs the changed cross-attention for each batch's denoising and restores the UNet after."""

    def __init__(self, config: RenConfig) -> None:
        self.config = config
        self.prompts = 0

    @contextlib.contextmanager
    def _installed(self, batch: SamplingBatch) -> Iterator[None]:
        unet = batch.unet
        original = dict(unet.attn_processors)  # type: ignore[attr-defined]
        unet.set_attn_processor({k: _Attending(p, self.config, batch) for k, p in original.items()})  # type: ignore[operator]
        try:
            yield
        finally:
            unet.set_attn_processor(original)  # type: ignore[operator]
        self.prompts += len(batch.token_mask)

    def attention(self, batch: SamplingBatch) -> contextlib.AbstractContextManager[None]:
        return self._installed(batch)

    def details(self) -> dict[str, object]:
        return {"bos_scale": self.config.bos_scale, "mask_padding": self.config.mask_padding, "prompts": self.prompts}


@register_defense(
    "ren",
    presets={
        "both": {"bos_scale": 1.25, "mask_padding": True},
        "bos": {"bos_scale": 1.25, "mask_padding": False},
        "mask": {"bos_scale": 1.0, "mask_padding": True},
    },
)
class Ren(Defense):
    """Cross-attention memorisation fix at sampling (Ren et al. 2024): start-token logit x c1, padding masked."""

    # Generation only: its training hooks are the plain recipe's, so its stage does not matter.
    claims = frozenset({"cross-attention at sampling"})
    Config = RenConfig
    config: RenConfig

    def training_identity(self) -> dict[str, object] | None:
        return None  # the weights are the plain recipe's

    def sampling_hooks(self) -> SamplingHooks:
        return RenSampling(self.config)
