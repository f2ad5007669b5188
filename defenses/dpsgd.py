"""DP-SGD with Opacus: per-example clipping, Gaussian noise, Poisson sampling, real accounting.

What is private: the fine-tuning set (the owner's members), at the example level.
Only the UNet's trainable parameters are trained; the text encoder (and a VAE)
stay frozen, so captions are encoded once and the privacy analysis covers
exactly the parameters that see member data.

Known traps, and how they are handled here:
  * empty Poisson batches: the step is still taken (noise only), with zero
    per-sample gradients, so the accountant's step count stays honest;
  * frozen and trainable parameters together (and PEFT + Opacus ordering): the
    UNet is wrapped *after* any LoRA adapters exist, the optimizer holds only
    trainable parameters, and `finish` checks that trained weights changed;
  * per-example noise draw: `diffusion_loss` draws one noise sample and one
    timestep per example, and no layer mixes examples (GroupNorm, not BatchNorm);
  * unsupported layers: every trainable layer of a diffusers UNet (Conv2d,
    Linear, GroupNorm, LayerNorm) has an Opacus grad sampler; anything else falls
    back to functorch inside "hooks" mode. grad_sample_mode="ew" (expanded
    weights) fails on the UNet's convolutions (a non-contiguous view in
    torch's conv_utils), so it is not offered; "functorch" works but is slower.
  * fast gradient clipping ("ghost"): Opacus computes ghost norms for Linear and
    Embedding layers only, so it saves memory where those hold the trainable
    weights (DP-LoRA on attention projections) and little on a full UNet, whose
    convolutions and norms still get per-example gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmark.kernel.compute import Compute
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.errors import ConfigError, DefenseError
from benchmark.pipeline.finetune import TrainConfig, TrainingHooks, TrainingState
from defenses.base import Defense, DefenseConfig, register_defense

ACCOUNTANTS = ("prv", "rdp")
# Measured with Opacus 1.6's PRVAccountant over 100 epochs: noise 0.3 needs seconds, 0.2 gives an
# infinite epsilon or a failed allocation, 0.1 and below ask for GiBs to TiBs. A floor with margin.
PRV_MIN_NOISE = 0.5
# The smallest noise Opacus' calibration search may probe under prv before it is refused (see
# `_calibrated_noise`): 20 / 2**6, the search's own step; few-step runs do calibrate below 0.5.
PRV_SEARCH_FLOOR = 0.3125
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


class DeltaWarning(UserWarning):
    """delta is not small next to 1/N: the guarantee allows publishing a member outright."""


@dataclass(frozen=True)
class DPSGDConfig(DefenseConfig):
    """DP-SGD knobs. Give `target_epsilon` (noise calibrated for the run) or `noise_multiplier`, not both."""

    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None
    # None: 1 / (10 N) for N members, known only at fine-tune time.
    delta: float | None = None
    clipping_norm: float = 1.0
    accountant: Literal["prv", "rdp"] = "prv"
    # Poisson batches vary in size; larger ones are split (BatchMemoryManager).
    max_physical_batch_size: int = 64
    # "ghost": Opacus' fast gradient clipping, per-example gradient norms without per-example
    # gradients for Linear layers (LoRA adapters, attention projections); other layers
    # (convolutions, norms) still materialise theirs. Two backward passes per step.
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    # True: cryptographically secure noise (slow, not reproducible); False: seeded.
    secure_mode: bool = False
    # Caps on the fine-tuning recipe (None: no cap). A learning rate tuned for clean
    # gradients lets the noise walk the model away from the base (on the embedded default,
    # 3e-3 for 600 epochs left every epsilon worse than not fine-tuning at all), and the noise
    # is calibrated for the epochs actually run. Chosen on the embedded default (README).
    max_learning_rate: float | None = 1e-4
    max_epochs: int | None = 100

    def __post_init__(self) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ConfigError("dpsgd needs target_epsilon (e.g. 8) or noise_multiplier (e.g. 1.0)")
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError(
                "dpsgd takes target_epsilon or noise_multiplier, not both; "
                "to fix the noise, pass noise_multiplier=X with target_epsilon=none"
            )
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ConfigError(
                f"dpsgd target_epsilon must be a finite number > 0, got {self.target_epsilon}; "
                "smaller is more private (e.g. 1, 4 or 8)"
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise ConfigError(
                f"dpsgd noise_multiplier must be a finite number > 0, got {self.noise_multiplier}; "
                "for no noise use the defense 'none'"
            )
        if self.delta is not None and not (0 < self.delta < 1):
            raise ConfigError(
                f"dpsgd delta must be in (0, 1), got {self.delta}; use a value below 1/N for N members "
                "(e.g. 1e-5), or leave it unset for 1/(10 N)"
            )
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ConfigError(
                f"dpsgd clipping_norm must be a finite number > 0, got {self.clipping_norm} "
                "(per-example gradient L2 bound; 1.0 is the usual choice)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"dpsgd accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.accountant == "prv" and self.noise_multiplier is not None and self.noise_multiplier < PRV_MIN_NOISE:
            raise ConfigError(
                f"dpsgd noise_multiplier {self.noise_multiplier} is below {PRV_MIN_NOISE}, where the prv accountant's "
                "grid outgrows memory (at 0.1 it needs GiBs, at 0.01 the process is killed after training); "
                "pass accountant=rdp for small noise multipliers"
            )
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                f"dpsgd grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {self.grad_sample_mode!r}"
            )
        if self.max_physical_batch_size < 1:
            raise ConfigError(f"dpsgd max_physical_batch_size must be >= 1, got {self.max_physical_batch_size}")
        if self.max_learning_rate is not None and not (
            math.isfinite(self.max_learning_rate) and self.max_learning_rate > 0
        ):
            raise ConfigError(
                f"dpsgd max_learning_rate must be a finite number > 0, got {self.max_learning_rate} "
                "(or none to keep the fine-tuning recipe's)"
            )
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(
                f"dpsgd max_epochs must be >= 1, got {self.max_epochs} (or none to keep the fine-tuning recipe's)"
            )


def check_dp_compute(compute: Compute) -> None:
    """The compute settings DP-SGD cannot run under.

    Raises:
        ConfigError: fp16 (loss scaling acts before per-example clipping) or gradient checkpointing.
    """
    if compute.precision == "fp16":
        raise ConfigError(
            "dpsgd with --precision fp16: loss scaling would scale each example's gradient before it is "
            "clipped, changing the clipping bound; pass --precision bf16 (no loss scaling) or fp32"
        )
    if compute.gradient_checkpointing:
        raise ConfigError(
            "dpsgd with --gradient-checkpointing: Opacus' per-example hooks would see each recomputed "
            "activation twice; drop --gradient-checkpointing and bound memory with "
            "--defense-arg max_physical_batch_size=N instead"
        )


@functools.cache
def _fast_dp_optimizer_class() -> type:
    from opacus.optimizers import DPOptimizer

    class _DPOptimizer(DPOptimizer):
        # Opacus recomputes `accumulated_iterations` (a pass over every parameter)
        # once per parameter here: quadratic in the number of parameter tensors,
        # about a third of the DP overhead for a UNet. Same arithmetic, once.
        def scale_grad(self) -> None:
            if self.loss_reduction == "mean":
                denominator = self.expected_batch_size * self.accumulated_iterations
                for p in self.params:
                    p.grad /= denominator

    return _DPOptimizer


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    # Expected and recorded instead: secure_mode is a field of the config, and the
    # RDP bound PRV uses for its domain may sit at the largest order for tiny runs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # log(1 - q) at sample rate 1 in PRV's domain computation: handled, but noisy.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.")
        yield


@functools.lru_cache(maxsize=64)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str) -> float:
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    if accountant == "prv":
        # Opacus' search starts at 20 and halves the noise while epsilon stays under the target: past
        # 0.625 it probes 0.3125 and, if that is still under, 0.156, where the prv grid outgrows
        # memory. So a target that 0.3125 already meets is refused before the search starts.
        steps = int(epochs / sample_rate)

        def prv_epsilon(sigma: float) -> float:
            prv = create_accountant(accountant)
            prv.history = [(sigma, sample_rate, steps)]
            return float(prv.get_epsilon(delta=delta))

        if (
            prv_epsilon(2 * PRV_SEARCH_FLOOR) < target_epsilon
            and (at_floor := prv_epsilon(PRV_SEARCH_FLOOR)) < target_epsilon
        ):
            raise ConfigError(
                f"dpsgd target_epsilon {target_epsilon:g} needs a noise multiplier below {PRV_SEARCH_FLOOR} "
                f"(there the prv accountant already gives epsilon {at_floor:.3g} over {epochs} epochs), "
                "where its grid outgrows memory; pass accountant=rdp, or a smaller target_epsilon"
            )
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            epochs=epochs,
            accountant=accountant,
        )
    )


def _fingerprint(parameters: list[torch.nn.Parameter]) -> list[tuple[float, float]]:
    # Two float64 moments per tensor: enough to see a change, without copying a
    # Stable-Diffusion-sized UNet.
    return [(float(p.detach().double().sum()), float(p.detach().double().square().sum())) for p in parameters]


class DPSGDHooks(TrainingHooks):
    """Wraps the UNet in Opacus's GradSampleModule and the optimizer in its DPOptimizer."""

    def __init__(self, config: DPSGDConfig) -> None:
        self.config = config
        self._module = None
        self._warning_filter: tuple[object, ...] | None = None
        self._details: dict[str, object] = {}
        self.noisy_steps = 0
        self.empty_batches = 0
        self.physical_batches = 0
        self.largest_physical_batch = 0
        self.examples_sampled = 0

    def recipe(self, config: TrainConfig) -> TrainConfig:
        cfg = self.config
        return dataclasses.replace(
            config,
            learning_rate=min(config.learning_rate, cfg.max_learning_rate or math.inf),
            epochs=min(config.epochs, cfg.max_epochs or config.epochs),
        )

    def setup(self, state: TrainingState) -> None:
        from opacus import PrivacyEngine
        from opacus.optimizers import DPOptimizer

        cfg, train_config = self.config, state.config
        n = len(state.images)
        if train_config.train_text_encoder:
            raise ConfigError(
                "dpsgd trains the UNet only (the text encoder would see member captions outside the "
                "privacy analysis); set finetune.train_text_encoder=False"
            )
        check_dp_compute(current_compute())
        if train_config.max_grad_norm is not None:
            raise ConfigError(
                "dpsgd clips each example's gradient (clipping_norm); unset finetune.max_grad_norm, "
                "which would clip the already-private sum again"
            )
        self.delta = cfg.delta if cfg.delta is not None else 1.0 / (10 * n)
        self.warnings: list[str] = []
        if self.delta >= 1.0 / n:
            message = (
                f"dpsgd delta={self.delta:g} is >= 1/N = {1 / n:g} for N={n} members: a mechanism that "
                "publishes one member outright meets this guarantee; use delta < 1/N (default 1/(10 N))"
            )
            warnings.warn(message, DeltaWarning, stacklevel=2)
            self.warnings.append(message)
        self.trainable = sum(p.numel() for p in state.parameters)
        self._before = _fingerprint(state.parameters)
        self._parameters = state.parameters
        # The dataset is the members' positions: a batch of indices selects latents and contexts.
        loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=train_config.batch_size)
        device = state.parameters[0].device if state.parameters else torch.device("cpu")
        # Opacus draws the noise on the parameters' device, so its generator lives there too.
        noise = None if cfg.secure_mode else torch.Generator(device=device).manual_seed(train_config.seed + 7919)
        common = {
            "module": state.model.unet,
            "optimizer": state.optimizer,
            "data_loader": loader,
            "max_grad_norm": cfg.clipping_norm,
            "poisson_sampling": True,
            "loss_reduction": "mean",
            "grad_sample_mode": cfg.grad_sample_mode,
            "noise_generator": noise,
        }
        with _quiet_opacus():
            engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
            sigma = cfg.noise_multiplier
            if sigma is None:
                assert cfg.target_epsilon is not None
                # What make_private_with_epsilon does (calibrate on sample rate 1/len(loader)
                # for `epochs` epochs, then make_private), with the calibration, a binary
                # search over the accountant taking seconds, cached: target and shadow share it.
                sigma = _calibrated_noise(
                    cfg.target_epsilon, self.delta, 1.0 / len(loader), train_config.epochs, cfg.accountant
                )
            if cfg.grad_sample_mode == "ghost":
                # The criterion Opacus returns is not used: `backward` wraps the loop's own per-example losses.
                module, optimizer, _, dp_loader = engine.make_private(
                    noise_multiplier=sigma, criterion=torch.nn.MSELoss(), **common
                )
            else:
                module, optimizer, dp_loader = engine.make_private(noise_multiplier=sigma, **common)
        if type(optimizer) is DPOptimizer:
            optimizer.__class__ = _fast_dp_optimizer_class()
        accountant_hook = optimizer.step_hook

        def count_noisy_step(opt: DPOptimizer) -> None:
            self.noisy_steps += 1
            if accountant_hook is not None:
                accountant_hook(opt)

        optimizer.attach_step_hook(count_noisy_step)
        self._engine, self._module, self._optimizer, self._loader = engine, module, optimizer, dp_loader
        self.sample_rate = 1.0 / len(dp_loader)
        self.noise_multiplier = float(optimizer.noise_multiplier)
        state.model.unet = module  # type: ignore[assignment]
        state.optimizer = optimizer
        # Opacus's full backward hooks make torch warn on every UNet whose input needs
        # no grad (the noisy latents never do): expected, so silenced while training.
        # catch_warnings cannot span the loop, so the filter is added here and removed in finish.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        self._warning_filter = warnings.filters[0]

    def batches(self, state: TrainingState) -> Iterator[torch.Tensor]:
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        with BatchMemoryManager(
            data_loader=self._loader,
            max_physical_batch_size=self.config.max_physical_batch_size,
            optimizer=self._optimizer,
        ) as physical:
            for (idx,) in physical:
                self.physical_batches += 1
                self.largest_physical_batch = max(self.largest_physical_batch, len(idx))
                self.examples_sampled += len(idx)
                yield idx

    def backward(self, losses: torch.Tensor, state: TrainingState) -> None:
        if self.config.grad_sample_mode != "ghost":
            super().backward(losses, state)
            return
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        # Two passes: per-example gradient norms, then the loss reweighted by each example's clipping factor.
        DPTensorFastGradientClipping(self._module, self._optimizer, losses, "mean").backward()

    def optimizer_step(self, state: TrainingState) -> bool:
        before = self.noisy_steps
        self._optimizer.step()
        return self.noisy_steps > before

    def empty_batch_step(self, state: TrainingState) -> bool:
        # Poisson sampling drew nobody: the step still happens (noise only) and is
        # accounted, exactly as the analysis assumes. Clear the previous step's sums first.
        self.empty_batches += 1
        self._optimizer.zero_grad(set_to_none=True)
        for p in self._optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return self.optimizer_step(state)

    def finish(self, state: TrainingState) -> None:
        if self._warning_filter is not None:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(self._warning_filter)
            self._warning_filter = None
        if self._module is None:
            return
        self._optimizer.zero_grad(set_to_none=True)
        state.model.unet = self._module.to_standard_module()
        self._module = None
        for p in self._parameters:
            # What the DPOptimizer attached (the GradSampleModule removes its own).
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        after = _fingerprint(self._parameters)
        changed = sum(a != b for a, b in zip(self._before, after, strict=True))
        if self.noisy_steps > 0 and changed == 0:
            raise DefenseError(
                f"dpsgd took {self.noisy_steps} noisy steps but no trainable weight changed: the optimizer "
                "does not hold the parameters the GradSampleModule samples (wrap after adding adapters)"
            )
        with _quiet_opacus():
            epsilon = float(self._engine.get_epsilon(self.delta)) if self.noisy_steps > 0 else 0.0
        self._details = {
            "epsilon": epsilon,
            "delta": self.delta,
            "accountant": self._engine.accountant.mechanism(),
            "target_epsilon": self.config.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.noisy_steps,
            "learning_rate": state.config.learning_rate,
            "epochs": state.config.epochs,
            "empty_batches": self.empty_batches,
            "clipping_norm": self.config.clipping_norm,
            "expected_batch_size": int(self._optimizer.expected_batch_size),
            "max_physical_batch_size": self.config.max_physical_batch_size,
            "physical_batches": self.physical_batches,
            "largest_physical_batch": self.largest_physical_batch,
            "examples_sampled": self.examples_sampled,
            "poisson_sampling": True,
            "grad_sample_mode": self.config.grad_sample_mode,
            "secure_mode": self.config.secure_mode,
            "trainable_parameters": self.trainable,
            "trainable_tensors_changed": int(changed),
            "opacus_version": metadata.version("opacus"),
            "warnings": list(self.warnings),
        }

    def details(self) -> dict[str, object]:
        return dict(self._details)


@register_defense(
    "dpsgd",
    presets={
        "eps1": {"target_epsilon": 1.0},
        "eps4": {"target_epsilon": 4.0},
        "eps8": {"target_epsilon": 8.0},
        "sigma1": {"target_epsilon": None, "noise_multiplier": 1.0},
    },
)
class DPSGD(Defense):
    """DP-SGD (Opacus): per-example clipping + Gaussian noise, Poisson sampling, epsilon recorded."""

    Config = DPSGDConfig
    config: DPSGDConfig
    # Last to set up: it wraps whatever the other defenses made trainable.
    stage = 90
    claims = frozenset({"sampling", "optimizer step"})

    def training_hooks(self) -> TrainingHooks:
        return DPSGDHooks(self.config)

    def check_compute(self, compute: Compute) -> None:
        check_dp_compute(compute)
