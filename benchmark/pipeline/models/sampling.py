"""The points where a defense may change generation inside the black box.

A generation-time defense (a memorisation mitigation) never touches the weights:
it changes how the provider samples. `SamplingHooks` is to sampling what
`TrainingHooks` is to fine-tuning: every default is plain DDIM sampling, a defense
overrides what it changes, and `ComposedSamplingHooks` chains several. The hooks
run inside `generate` and `img2img` (the black box and the utility protocol), never
inside a gray-box noise prediction: an attacker who queries the denoiser directly
sees the weights' answer, which is exactly the finding a mitigation of this kind
must be measured against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """One batch about to be sampled: what a hook may read (and, for `context`, replace).

    With classifier-free guidance the UNet sees `[uncond; cond]` stacked on the batch
    axis (`guided`); without it, `cond` alone.
    """

    unet: torch.nn.Module
    cond: torch.Tensor  # (B, tokens, width) text embedding of each caption
    uncond: torch.Tensor  # (B, tokens, width) the null caption's embedding
    token_mask: torch.Tensor  # (B, tokens) bool: the caption's own tokens (start, words, end), not padding
    latents: torch.Tensor  # (B, C, H, W) the noisy start of sampling
    timestep: torch.Tensor  # the first timestep sampled
    guided: bool


class SamplingHooks:
    """Where a defense may change sampling. Every default is plain sampling.

    Order of calls per batch in `generate`/`img2img`: `context` once (before the first
    step), then the whole denoising loop runs inside `attention(batch)`. `details`
    says what the hooks did over every batch so far (for the record).
    """

    def context(self, batch: SamplingBatch) -> torch.Tensor:
        """The conditional text embedding the batch is sampled with."""
        return batch.cond

    def attention(self, batch: SamplingBatch) -> contextlib.AbstractContextManager[None]:
        """A context inside which the UNet's attention is changed for this batch's denoising."""
        return contextlib.nullcontext()

    def details(self) -> dict[str, object]:
        """What the hooks did (JSON-serialisable, finite numbers); {} when nothing."""
        return {}

    @property
    def changes_sampling(self) -> bool:
        """Whether any hook differs from plain sampling (plain sampling skips the bookkeeping)."""
        return type(self).context is not SamplingHooks.context or type(self).attention is not SamplingHooks.attention


class ComposedSamplingHooks(SamplingHooks):
    """Several hooks on one sampler: `context` chains in order, `attention` contexts nest."""

    def __init__(self, hooks: list[SamplingHooks]) -> None:
        self.hooks = [h for h in hooks if h.changes_sampling]

    def context(self, batch: SamplingBatch) -> torch.Tensor:
        for hook in self.hooks:
            batch.cond = hook.context(batch)
        return batch.cond

    @contextlib.contextmanager
    def _nested(self, batch: SamplingBatch) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.attention(batch))
            yield

    def attention(self, batch: SamplingBatch) -> contextlib.AbstractContextManager[None]:
        return self._nested(batch)

    def details(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for hook in self.hooks:
            out.update(hook.details())
        return out

    @property
    def changes_sampling(self) -> bool:
        return bool(self.hooks)


PLAIN_SAMPLING = SamplingHooks()
