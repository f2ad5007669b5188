"""The GPU check: the benchmark's heavy stages on a CUDA device, with the time and peak memory of each.

    python -m benchmark.app.bench_gpu                              # cuda, bf16, every stage
    python -m benchmark.app.bench_gpu --precision fp16 --device cuda:1
    python -m benchmark.app.bench_gpu --end-to-end-profile micro   # a seconds-long last stage
    python -m benchmark.app.bench_gpu --json gpu-check.json        # the figures, for a report

The stages, each timed (after `torch.cuda.synchronize`) and measured by
`torch.cuda.max_memory_allocated` since the stage began:

1. a tiny Stable Diffusion pipeline with Stable Diffusion v1-5's shapes (512 px images,
   64 px latents, a VAE that downsamples 8x) but a tiny width and random weights, saved
   as a diffusers folder and loaded the way `--model sd15` loads a user's model;
2. 20 fine-tuning steps of it (`train`, batches of 4) under autocast;
3. one DP-LoRA step (`dpsgd.eps8+lora.r4`; DP-SGD runs in fp32 or bf16, never fp16);
4. 64 generations (the default profile's sampler);
5. the default profile end to end, `python -m benchmark run --device cuda --precision bf16`
   with a temporary cache and results folder: the record's per-stage times and peak memory.

The weights are random: the check shows that the code runs on a GPU and what it costs,
not anything about privacy or image quality. Without CUDA it stops with a one-line error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmark.app.cli import main as cli_main
from benchmark.app.config import profile
from benchmark.kernel.compute import Compute, resolve_compute, use
from benchmark.kernel.errors import BenchmarkError, ConfigError
from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.finetune import TrainConfig, train
from benchmark.pipeline.models.diffusion import generate, load_model
from benchmark.pipeline.models.tiny_sd import build_tiny_sd_pipeline
from benchmark.pipeline.records import read_record, record_files
from defenses import resolve

# Stable Diffusion v1-5's shapes: 64 px latents, decoded 8x to 512 px images.
SAMPLE_SIZE = 64
LATENT_SCALE = 8


@dataclass(frozen=True)
class StageResult:
    """One stage of the check: wall time, peak accelerator memory (None on the CPU) and what it produced."""

    stage: str
    seconds: float
    peak_memory_mb: float | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        memory = "-" if self.peak_memory_mb is None else f"{self.peak_memory_mb:,.0f} MB"
        shown = ", ".join(f"{k} {_short(v)}" for k, v in self.details.items() if not isinstance(v, dict))
        return f"{self.stage:<16} {self.seconds:8.1f} s  peak {memory:>10}  {shown}"


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cuda_compute(device: str = "cuda", precision: str = "bf16") -> Compute:
    """The compute settings of the check: a CUDA device, in `precision`.

    Raises:
        ConfigError: no CUDA device here, a device that is not CUDA, or a precision the GPU lacks.
    """
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"the GPU check needs a CUDA device and none is available here (torch {torch.__version__}, {built}); "
            "run it on a machine with one (the CPU tests: python -m pytest -m 'not gpu')"
        )
    if not device.startswith("cuda"):
        raise ConfigError(f"the GPU check runs on CUDA: pass --device cuda or cuda:N, not {device!r}")
    return resolve_compute(device, precision)


@contextmanager
def _measured(compute: Compute, stage: str, details: dict[str, Any], out: list[StageResult]) -> Iterator[None]:
    """Time the block and take its peak memory; appends the stage's result to `out`."""
    if compute.device.type == "cuda":
        torch.cuda.synchronize(compute.device)
    compute.reset_peak_memory()
    start = time.perf_counter()
    with use(compute):
        yield
    if compute.device.type == "cuda":
        torch.cuda.synchronize(compute.device)
    out.append(StageResult(stage, time.perf_counter() - start, compute.peak_memory_mb(), details))


def _scenes(resolution: int, n: int) -> tuple[torch.Tensor, list[str]]:
    dataset = ScenesDataset(resolution=resolution, size=max(n, 60))
    return images_to_tensor([dataset.image(i) for i in range(n)]), [dataset.caption(i) for i in range(n)]


def save_pipeline(
    folder: Path, compute: Compute, *, sample_size: int = SAMPLE_SIZE, latent_scale: int = LATENT_SCALE, seed: int = 0
) -> StageResult:
    """Build the tiny Stable Diffusion pipeline, save it to `folder` and load it back once (on the device)."""
    details: dict[str, Any] = {}
    out: list[StageResult] = []
    with _measured(compute, "build and load", details, out):
        corpus = [ScenesDataset(resolution=8, size=200).caption(i) for i in range(200)]
        build_tiny_sd_pipeline(corpus, sample_size=sample_size, latent_scale=latent_scale, seed=seed).save_pretrained(
            folder, safe_serialization=True
        )
        model = load_model(folder)
        details.update(
            resolution=model.resolution,
            latent=int(model.unet.config.sample_size),
            device=str(model.device),
            attention=sorted({type(p).__name__ for p in model.unet.attn_processors.values()}),
        )
    return out[0]


def fine_tune(model_dir: Path, compute: Compute, *, steps: int = 20, batch_size: int = 4, seed: int = 0) -> StageResult:
    """`steps` fine-tuning steps of the saved model (one epoch over `steps * batch_size` images)."""
    details: dict[str, Any] = {}
    out: list[StageResult] = []
    model = load_model(model_dir)
    images, captions = _scenes(model.resolution, steps * batch_size)
    with _measured(compute, "fine-tune", details, out):
        report = train(
            model.place(compute),
            images,
            captions,
            TrainConfig(epochs=1, batch_size=batch_size, learning_rate=1e-4, seed=seed),
        )
    details.update(
        steps=report.steps,
        batch_size=batch_size,
        final_loss=report.final_loss,
        finite=all(math.isfinite(v) for v in report.loss_history),
        precision=compute.precision,
    )
    return out[0]


def dp_lora_step(model_dir: Path, compute: Compute, *, batch_size: int = 8, seed: int = 0) -> StageResult:
    """One DP-LoRA step (`dpsgd.eps8+lora.r4`): `batch_size` images, a sample rate of 1, one epoch."""
    details: dict[str, Any] = {}
    out: list[StageResult] = []
    model = load_model(model_dir)
    images, captions = _scenes(model.resolution, batch_size)
    with _measured(compute, "DP-LoRA step", details, out):
        result = resolve("dpsgd.eps8+lora.r4").fine_tune(
            model=model.place(compute),
            images=images,
            captions=captions,
            train_config=TrainConfig(epochs=1, batch_size=batch_size, learning_rate=1e-4, seed=seed),
        )
    dp = result.details["dpsgd"]
    assert isinstance(dp, dict)
    details.update(
        steps=dp["steps"],
        epsilon=dp["epsilon"],
        noise_multiplier=dp["noise_multiplier"],
        physical_batches=dp["physical_batches"],
        final_loss=result.report.final_loss,
        finite=math.isfinite(result.report.final_loss),
    )
    return out[0]


def generation(model_dir: Path, compute: Compute, *, images: int = 64, seed: int = 0) -> StageResult:
    """`images` generations with the default profile's sampler (DDIM steps, guidance, batch size)."""
    details: dict[str, Any] = {}
    out: list[StageResult] = []
    model = load_model(model_dir)
    sampling = profile("default").sampling
    captions = [ScenesDataset(resolution=8, size=max(images, 60)).caption(i) for i in range(images)]
    with _measured(compute, "generation", details, out):
        generated = generate(
            model.place(compute),
            captions,
            seed=seed,
            num_inference_steps=sampling.num_inference_steps,
            guidance_scale=sampling.guidance_scale,
            batch_size=sampling.batch_size,
        )
    details.update(
        shape=list(generated.shape),
        dtype=str(generated.dtype).removeprefix("torch."),
        device=str(generated.device),
        finite=bool(torch.isfinite(generated).all()),
        in_range=bool(generated.min() >= -1 and generated.max() <= 1),
        num_inference_steps=sampling.num_inference_steps,
    )
    details["images_per_second"] = round(images / out[0].seconds, 2)
    return out[0]


def end_to_end(folder: Path, compute: Compute, *, profile_name: str = "default") -> StageResult:
    """`python -m benchmark run --profile NAME --device D --precision P` with its cache and results in `folder`.

    Raises:
        BenchmarkError: the run exited with an error (its message is on stderr).
    """
    results, cache = folder / "results", folder / "cache"
    argv = ["run", "--profile", profile_name, "--device", str(compute.device), "--precision", compute.precision]
    argv += ["--results-dir", str(results), "--cache-dir", str(cache), "--quiet"]
    details: dict[str, Any] = {}
    out: list[StageResult] = []
    with _measured(compute, f"run --profile {profile_name}", details, out):
        code = cli_main(argv)
    if code != 0:
        raise BenchmarkError(f"python -m benchmark {' '.join(argv)} exited with {code}")
    [path] = record_files(results)
    record = read_record(path)
    memory = record.accelerator_memory_mb or {}
    details.update(
        auc=record.privacy.auc,
        precision=record.provenance.precision,
        device_name=record.provenance.device_name,
        timings_s={k: round(v, 2) for k, v in record.timings_s.items()},
        accelerator_memory_mb=memory,
    )
    # The timer resets the peak at every stage, so the run's peak is the largest stage's.
    peak = max(memory.values(), default=None)
    return StageResult(out[0].stage, out[0].seconds, peak, details)


def run_check(
    compute: Compute,
    workdir: Path,
    *,
    end_to_end_profile: str | None = "default",
    report: Callable[[StageResult], None] = lambda result: None,
) -> list[StageResult]:
    """Every stage of the check in order, each reported as it finishes; `end_to_end_profile` None skips the last."""
    model_dir = workdir / "tiny-sd-512"
    stages = [save_pipeline(model_dir, compute)]
    report(stages[-1])
    for stage in (fine_tune, dp_lora_step, generation):
        stages.append(stage(model_dir, compute))
        report(stages[-1])
    if end_to_end_profile is not None:
        stages.append(end_to_end(workdir / "run", compute, profile_name=end_to_end_profile))
        report(stages[-1])
    return stages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.app.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--end-to-end-profile",
        default="default",
        choices=["default", "micro", "none"],
        help="the profile of the last stage (none: skip it)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the stages' figures to this file")
    args = parser.parse_args(argv)
    try:
        compute = cuda_compute(args.device, args.precision)
        print(f"{compute.device_name()} ({compute.device}), {compute.precision}, torch {torch.__version__}")
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            stages = run_check(
                compute,
                Path(tmp),
                end_to_end_profile=None if args.end_to_end_profile == "none" else args.end_to_end_profile,
                report=lambda result: print(result.line(), flush=True),
            )
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in stages:
        for name, seconds in result.details.get("timings_s", {}).items():
            memory = result.details["accelerator_memory_mb"].get(name)
            print(f"  {name:<32} {seconds:8.1f} s  peak {'-' if memory is None else f'{memory:,.0f} MB':>10}")
    if args.json is not None:
        args.json.write_text(json.dumps({"describe": compute.describe(), "stages": [s.to_dict() for s in stages]}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
