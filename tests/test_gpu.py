"""The GPU check (`benchmark.app.bench_gpu`) with assertions: run with `python -m pytest -m gpu` on a CUDA machine.

Every test here is marked `gpu`; CI deselects them (`-m "not slow and not gpu"`), and
anywhere without CUDA they are skipped with the reason, listed by `-ra`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmark.app import bench_gpu
from benchmark.app.cli import main
from benchmark.kernel.compute import Compute, resolve_compute, use
from benchmark.pipeline.models import diffusion
from benchmark.pipeline.models.diffusion import generate, load_model
from benchmark.pipeline.records import read_record, record_files

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def compute() -> Compute:
    return bench_gpu.cuda_compute("cuda", "bf16")


@pytest.fixture(scope="module")
def sd512(tmp_path_factory: pytest.TempPathFactory, compute: Compute) -> Path:
    """The 512 px tiny Stable Diffusion pipeline, saved once; its build is checked here too."""
    folder = tmp_path_factory.mktemp("gpu") / "tiny-sd-512"
    built = bench_gpu.save_pipeline(folder, compute)
    assert built.details["resolution"] == 512 and built.details["latent"] == 64
    assert built.details["device"].startswith("cuda")
    assert built.details["attention"] == ["AttnProcessor2_0"]
    return folder


def _peak_reported(result: bench_gpu.StageResult) -> None:
    assert result.peak_memory_mb is not None and result.peak_memory_mb > 0, result
    assert result.seconds > 0


def test_fine_tune_20_steps_in_bf16(sd512: Path, compute: Compute) -> None:
    result = bench_gpu.fine_tune(sd512, compute, steps=20)
    assert result.details["steps"] == 20 and result.details["precision"] == "bf16"
    assert result.details["finite"] and math.isfinite(result.details["final_loss"])
    _peak_reported(result)


def test_fine_tune_in_fp16_scales_the_loss(sd512: Path) -> None:
    result = bench_gpu.fine_tune(sd512, bench_gpu.cuda_compute("cuda", "fp16"), steps=4)
    assert result.details["finite"] and result.details["steps"] == 4
    _peak_reported(result)


def test_one_dp_lora_step(sd512: Path, compute: Compute) -> None:
    result = bench_gpu.dp_lora_step(sd512, compute)
    assert result.details["steps"] == 1 and 0 < result.details["epsilon"] <= 8.01
    assert result.details["finite"]
    _peak_reported(result)


def test_64_generations(sd512: Path, compute: Compute) -> None:
    result = bench_gpu.generation(sd512, compute, images=64)
    assert result.details["shape"] == [64, 3, 512, 512]
    assert result.details["dtype"] == "float32" and result.details["device"] == "cpu"
    assert result.details["finite"] and result.details["in_range"]
    _peak_reported(result)


def test_generation_halves_its_batch_on_out_of_memory(
    tmp_path: Path, compute: Compute, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tiny-sd"
    bench_gpu.save_pipeline(folder, compute, sample_size=8, latent_scale=2)
    with use(compute):
        model = load_model(folder)
        captions = [f"a scene {i}" for i in range(8)]
        whole = generate(model, captions, seed=0, num_inference_steps=4, guidance_scale=1.0)
        sample, sizes = diffusion._sample, []

        def cramped(model, scheduler, latents, captions, *args, **kwargs):  # type: ignore[no-untyped-def]
            sizes.append(len(captions))
            if len(captions) > 2:
                raise torch.OutOfMemoryError("pretend: CUDA out of memory")
            return sample(model, scheduler, latents, captions, *args, **kwargs)

        monkeypatch.setattr(diffusion, "_sample", cramped)
        split = generate(model, captions, seed=0, num_inference_steps=4, guidance_scale=1.0)
    assert sizes[:3] == [8, 4, 2], "halved until the batch fits"
    # The noise is drawn before the split, so only the batch size of the kernels differs.
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-3)


def test_cpu_and_cuda_draw_the_same_noise(tmp_path: Path, compute: Compute) -> None:
    folder = tmp_path / "tiny-sd"
    bench_gpu.save_pipeline(folder, compute, sample_size=8, latent_scale=2)
    images = {}
    for name, where in (("cpu", Compute()), ("cuda", resolve_compute("cuda", "fp32"))):
        with use(where):
            model = load_model(folder)
            images[name] = generate(model, ["a red circle"] * 4, seed=3, num_inference_steps=4, guidance_scale=1.0)
    # Seeded noise is drawn on the CPU's generator on both devices; what remains is float (and TF32
    # convolution) error, far below the difference between two seeds (of order 1).
    difference = float((images["cpu"] - images["cuda"]).abs().max())
    assert difference < 0.05, difference


def test_end_to_end_run_records_the_gpu(tmp_path: Path, compute: Compute) -> None:
    # The micro profile here; `python -m benchmark.app.bench_gpu` runs the default one.
    result = bench_gpu.end_to_end(tmp_path, compute, profile_name="micro")
    _peak_reported(result)
    [path] = record_files(tmp_path / "results")
    record = read_record(path)
    assert record.provenance.device is not None and record.provenance.device.startswith("cuda")
    assert record.provenance.precision == "bf16" and record.provenance.device_name not in (None, "cpu")
    memory = record.accelerator_memory_mb
    assert memory and all(v > 0 for v in memory.values()) and "fine-tune target" in memory, memory
    assert math.isfinite(record.privacy.auc)
    assert record.utility is not None and math.isfinite(record.utility.target.fid)


def test_every_scenario_with_a_trained_encoder(tmp_path: Path) -> None:
    # Every network placed on the GPU: the tiny captioner (scenarios II and IV), the cnn encoder,
    # the reference CLIP; each trains or runs there and hands its results back to the CPU.
    results, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["run", "--profile", "micro", "--device", "cuda", "--precision", "bf16", "--scenario", "all"]
    assert main([*argv, "--encoder", "cnn", "--results-dir", str(results), "--cache-dir", str(cache), "--quiet"]) == 0
    records = [read_record(path) for path in record_files(results)]
    assert sorted(r.scenario for r in records) == ["I", "II", "III", "IV"]
    for record in records:
        assert record.attack.encoder == "cnn" and math.isfinite(record.privacy.auc)
        assert record.accelerator_memory_mb, record.scenario


def test_the_script_prints_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "check.json"
    assert bench_gpu.main(["--end-to-end-profile", "micro", "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    for stage in ("build and load", "fine-tune", "DP-LoRA step", "generation", "run --profile micro"):
        assert stage in printed
    assert output.is_file()
