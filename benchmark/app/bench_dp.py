"""DP-SGD step time relative to the same non-private step, on the embedded default model.

    python -m benchmark.app.bench_dp                    # resolution and batch of the default profile
    python -m benchmark.app.bench_dp --lora-rank 4      # DP-LoRA against LoRA
    python -m benchmark.app.bench_dp --steps 30 --threads 2

Both steps run the code the benchmark trains with: `diffusion_loss` (one noise draw
and timestep per example), backward, and the optimizer step; the private one goes
through the dpsgd defense's hooks (Opacus GradSampleModule, per-example clipping,
noise, accounting). Batches have a fixed size (no Poisson draw) so that both steps
do the same work. The two models are stepped alternately, so a change in machine
load hits both, and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from benchmark.app.config import profile
from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.finetune import TrainConfig, TrainingHooks, TrainingState, diffusion_loss
from benchmark.pipeline.models.tiny import TinyModelConfig, build_tiny_model
from defenses.dpsgd import GRAD_SAMPLE_MODES, DPSGDConfig, DPSGDHooks
from defenses.lora import LoRAConfig, LoRAHooks


@dataclass(frozen=True)
class StepTimes:
    """Median seconds per optimizer step, and their ratio (private / plain)."""

    plain_s: float
    dp_s: float
    ratio: float
    resolution: int
    batch_size: int
    steps: int
    threads: int
    lora_rank: int | None
    grad_sample_mode: str
    trainable_parameters: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _state(model, images, captions, config, hooks: list[TrainingHooks]) -> TrainingState:  # type: ignore[no-untyped-def]
    params = [p for p in model.unet.parameters() if p.requires_grad]
    state = TrainingState(
        model=model,
        parameters=params,
        optimizer=torch.optim.AdamW(params, lr=config.learning_rate),
        images=images,
        captions=captions,
        config=config,
        generator=torch.Generator().manual_seed(config.seed),
    )
    model.unet.train()
    for hook in hooks:
        hook.setup(state)
    return state


def measure(
    *,
    resolution: int | None = None,
    batch_size: int | None = None,
    steps: int = 12,
    warmup: int = 2,
    threads: int = 1,
    lora_rank: int | None = None,
    grad_sample_mode: str = "hooks",
    seed: int = 0,
) -> StepTimes:
    """Time `steps` plain and `steps` private steps, alternately, after `warmup` of each.

    `resolution` and `batch_size` default to the default profile's (the embedded default).
    """

    default = profile("default")
    resolution = resolution if resolution is not None else default.resolution
    batch_size = batch_size if batch_size is not None else default.finetune.batch_size
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dataset = ScenesDataset(resolution=resolution, size=max(2 * batch_size, 60))
        captions = [dataset.caption(i) for i in range(len(dataset))]
        images = images_to_tensor([dataset.image(i) for i in range(2 * batch_size)])
        config = TrainConfig(epochs=1, batch_size=batch_size, learning_rate=1e-4, seed=seed)

        def build(private: bool) -> tuple[TrainingState, list[TrainingHooks], TrainingHooks]:
            model = build_tiny_model(corpus=captions, resolution=resolution, config=TinyModelConfig(), seed=seed)
            hooks: list[TrainingHooks] = [LoRAHooks(LoRAConfig(rank=lora_rank))] if lora_rank else []
            if private:
                dp = DPSGDConfig(target_epsilon=None, noise_multiplier=1.0, grad_sample_mode=grad_sample_mode)  # type: ignore[arg-type]
                hooks.append(DPSGDHooks(dp))
            state = _state(model, images, captions[: len(images)], config, hooks)
            # The step the training loop takes: the DP hooks' own, or the plain recipe's.
            stepper = hooks[-1] if private else TrainingHooks()
            return state, hooks, stepper

        plain, plain_hooks, plain_step = build(private=False)
        private, private_hooks, private_step = build(private=True)
        context = plain.model.encode_text(plain.captions)
        generator = torch.Generator().manual_seed(seed)

        def one(state: TrainingState, stepper: TrainingHooks) -> float:
            idx = torch.randperm(len(images), generator=generator)[:batch_size]
            start = time.perf_counter()
            losses = diffusion_loss(state.model, images[idx], context[idx], state.generator, reduction="none")
            state.optimizer.zero_grad(set_to_none=True)
            stepper.backward(losses, state)
            stepper.optimizer_step(state)
            return time.perf_counter() - start

        plain_times, private_times = [], []
        for i in range(warmup + steps):
            a, b = one(plain, plain_step), one(private, private_step)
            if i >= warmup:
                plain_times.append(a)
                private_times.append(b)
        trainable = sum(p.numel() for p in private.parameters)
        for state, hooks in ((plain, plain_hooks), (private, private_hooks)):
            for hook in reversed(hooks):  # unwrap (and remove the DP warning filter)
                hook.finish(state)
        plain_s, dp_s = statistics.median(plain_times), statistics.median(private_times)
        return StepTimes(
            plain_s=plain_s,
            dp_s=dp_s,
            ratio=dp_s / plain_s,
            resolution=resolution,
            batch_size=batch_size,
            steps=steps,
            threads=threads,
            lora_rank=lora_rank,
            grad_sample_mode=grad_sample_mode,
            trainable_parameters=trainable,
        )
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.app.bench_dp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=None, help="default: the default profile's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the default profile's fine-tuning batch")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--lora-rank", type=int, default=None, help="compare DP-LoRA with LoRA at this rank")
    parser.add_argument("--grad-sample-mode", default="hooks", choices=list(GRAD_SAMPLE_MODES))
    args = parser.parse_args(argv)
    times = measure(
        resolution=args.resolution,
        batch_size=args.batch_size,
        steps=args.steps,
        threads=args.threads,
        lora_rank=args.lora_rank,
        grad_sample_mode=args.grad_sample_mode,
    )
    kind = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full UNet"
    print(
        f"{kind}, {times.resolution} px, batch {times.batch_size}, {times.threads} thread(s), "
        f"{times.trainable_parameters:,} trainable parameters, {times.grad_sample_mode}: "
        f"plain step {times.plain_s * 1000:.1f} ms, DP-SGD step {times.dp_s * 1000:.1f} ms, "
        f"ratio {times.ratio:.2f}x (median of {times.steps})"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
