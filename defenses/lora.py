"""LoRA-limited fine-tuning (PEFT): low-rank adapters on the UNet's attention projections, base frozen.

Fewer trainable parameters means less capacity to memorise members; the rank is
the knob. After training the adapters are merged (`merge_and_unload`), so the
fine-tuned model is a plain `UNet2DConditionModel` saved like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import metadata

from benchmark.kernel.errors import ConfigError, DefenseError
from benchmark.pipeline.finetune import TrainingHooks, TrainingState
from defenses.base import Defense, DefenseConfig, register_defense

# The paper's setup (and diffusers' train_text_to_image_lora.py).
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoRAConfig(DefenseConfig):
    """Rank and scale of the adapters; `alpha` None means alpha = rank (scale 1)."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora rank must be an integer >= 1, got {self.rank} (the paper uses 4)")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(
                f"lora alpha must be a finite number > 0, got {self.alpha}; leave it unset for alpha = rank"
            )
        if not (0 <= self.dropout < 1):
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"lora target_modules is empty; the usual set is {','.join(ATTENTION_PROJECTIONS)}")


class LoRAHooks(TrainingHooks):
    """Adds adapters in `setup` (trainable parameters = adapters only) and merges them in `finish`."""

    def __init__(self, config: LoRAConfig) -> None:
        self.config = config
        self._peft_model = None
        self._details: dict[str, object] = {}

    def setup(self, state: TrainingState) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        unet = state.model.unet
        total = sum(p.numel() for p in unet.parameters())
        names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()} | {
            ".".join(name.split(".")[-2:]) for name, _ in unet.named_modules()
        }
        missing = [m for m in cfg.target_modules if m not in names]
        if missing:
            raise ConfigError(
                f"lora target_modules {', '.join(missing)} match no module of this UNet; "
                f"the attention projections are {','.join(ATTENTION_PROJECTIONS)}"
            )
        lora_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,  # B = 0: training starts from the base model exactly
        )
        # get_peft_model freezes every base weight; only adapter matrices require grad.
        peft_model = get_peft_model(unet, lora_config)
        adapters = [p for p in peft_model.parameters() if p.requires_grad]
        unet_ids = {id(p) for p in unet.parameters()}
        extra = [p for p in state.parameters if id(p) not in unet_ids]
        state.parameters = adapters + extra  # extra: the text encoder, if the recipe trains it
        state.optimizer = state.make_optimizer(state.parameters)
        state.model.unet = peft_model  # type: ignore[assignment]
        self._peft_model = peft_model
        adapter_count = sum(p.numel() for p in adapters)
        adapted = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
        self._details = {
            "rank": cfg.rank,
            "alpha": float(lora_config.lora_alpha),
            "dropout": cfg.dropout,
            "target_modules": list(cfg.target_modules),
            "adapted_layers": adapted,
            "trainable_parameters": adapter_count,
            "base_parameters": total,
            "trainable_fraction": adapter_count / total,
            "merged": False,
            "peft_version": metadata.version("peft"),
        }

    def finish(self, state: TrainingState) -> None:
        if self._peft_model is None:
            return
        peft_model, self._peft_model = self._peft_model, None
        if state.model.unet is not peft_model:
            raise DefenseError("lora: the UNet is still wrapped by another defense when merging adapters")
        merged = peft_model.merge_and_unload()
        # Base weights were frozen only for training; leave the module as load_model would.
        merged.requires_grad_(True)
        state.model.unet = merged
        self._details["merged"] = True

    def details(self) -> dict[str, object]:
        return dict(self._details)


@register_defense("lora", presets={"r1": {"rank": 1}, "r4": {"rank": 4}, "r16": {"rank": 16}})
class LoRA(Defense):
    """LoRA (PEFT) on the UNet attention projections; base frozen, adapters merged afterwards."""

    Config = LoRAConfig
    config: LoRAConfig
    stage = 30
    claims = frozenset({"trainable parameters"})

    def training_hooks(self) -> TrainingHooks:
        return LoRAHooks(self.config)
