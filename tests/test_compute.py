"""Device and precision (`benchmark.kernel.compute`), checked on the CPU: errors that name the fix,
bf16 autocast, gradient checkpointing, per-stage accelerator memory, DP-LoRA on a latent model, SDPA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmark.app import bench_gpu
from benchmark.app.cli import main
from benchmark.kernel.compute import Compute, resolve_compute, use
from benchmark.kernel.errors import ConfigError
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.finetune import TrainConfig, diffusion_loss, train
from benchmark.pipeline.models.diffusion import DiffusionModel, generate, load_model
from benchmark.pipeline.records import ResultRecord, read_record, record_files, validate
from defenses import resolve
from tests.factories import make_record, tiny_sd_pipeline


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, also where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with one CUDA device, as far as resolving flags goes (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# ------------------------------------------------------------------- resolving the flags


def test_cuda_without_cuda_names_the_cpu(no_cuda: None) -> None:
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=f"--device {name}: no CUDA device.*pass --device cpu"):
            resolve_compute(name)


def test_a_cluster_driver_leaves_the_device_to_its_workers(no_cuda: None) -> None:
    # A Ray driver on a CPU-only head node may send units to GPU workers: it checks names only,
    # and the worker's own validation (devices here) still refuses a device it lacks.
    from benchmark.app.config import RunConfig

    config = RunConfig(device="cuda", precision="bf16")
    assert config.validate(devices_here=False) is config
    with pytest.raises(ConfigError, match="pass --device cpu"):
        config.validate()
    with pytest.raises(ConfigError, match="unknown --device"):
        RunConfig(device="tpu").validate(devices_here=False)
    with pytest.raises(ConfigError, match="pass --precision bf16"):
        RunConfig(device="cpu", precision="fp16").validate(devices_here=False)
    with pytest.raises(ConfigError, match="dpsgd with --precision fp16"):
        RunConfig(device="cuda", precision="fp16", defense="dpsgd.eps8").validate(devices_here=False)


def test_mps_without_mps_names_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device mps: no Apple MPS device.*pass --device cpu"):
        resolve_compute("mps")


def test_fp16_on_the_cpu_names_bf16() -> None:
    with pytest.raises(ConfigError, match="--precision fp16 needs a GPU.*pass --precision bf16"):
        resolve_compute("cpu", "fp16")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cpu:0", "gpu"])
def test_unknown_device_names_the_available_ones(name: str) -> None:
    with pytest.raises(ConfigError, match=r"available: auto, cpu, cuda, mps \(or cuda:N\)"):
        resolve_compute(name)


def test_unknown_precision_names_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unknown --precision 'fp8'; available: fp32, bf16, fp16"):
        resolve_compute("cpu", "fp8")


def test_cuda_index_out_of_range_names_the_devices(one_cuda_device: None) -> None:
    with pytest.raises(ConfigError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\) \(cuda:0 to cuda:0\)"):
        resolve_compute("cuda:3")
    assert resolve_compute("cuda:0").device == torch.device("cuda:0")


def test_bf16_on_a_gpu_without_it_names_fp16(one_cuda_device: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has no bf16 support; pass --precision fp16"):
        resolve_compute("cuda", "bf16")


def test_auto_without_accelerators_is_the_cpu_at_fp32(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    compute = resolve_compute()
    assert compute == Compute() and compute.dtype is None and compute.grad_scaler() is None
    assert compute.describe() == {
        "device": "cpu",
        "device_name": "cpu",
        "precision": "fp32",
        "gradient_checkpointing": False,
    }
    # The CPU at fp32 keys caches as before precisions existed; bf16 keys its own entries.
    assert compute.identity() == {}
    assert resolve_compute("cpu", "bf16").identity() == {"precision": "bf16"}


# ------------------------------------------------------------------- the command line


@pytest.fixture
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich wraps at 80 columns when not on a terminal; a message must be one line whatever its length.
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """Run `run --profile micro FLAGS`, expect exit 2 before any work, and return the one error line."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    code = main(
        ["run", "--profile", "micro", "--quiet", "--results-dir", str(results), "--cache-dir", str(cache), *flags]
    )
    captured = capsys.readouterr()
    output = (captured.err + captured.out).strip()
    assert code == 2, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert not results.exists() and not cache.exists(), "nothing may be computed for a refused configuration"
    return output


@pytest.mark.usefixtures("_wide_console")
def test_cli_device_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_cuda: None) -> None:
    line = _refused(tmp_path, capsys, "--device", "cuda")
    assert line.startswith("error: --device cuda: no CUDA device") and "pass --device cpu" in line


@pytest.mark.usefixtures("_wide_console")
def test_cli_fp16_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(tmp_path, capsys, "--device", "cpu", "--precision", "fp16")
    assert "--precision fp16 needs a GPU" in line and "--precision bf16" in line


@pytest.mark.usefixtures("_wide_console")
def test_cli_dpsgd_refuses_fp16(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_cuda_device: None) -> None:
    # On a (pretended) GPU, where fp16 itself is allowed: the refusal is DP-SGD's own.
    line = _refused(tmp_path, capsys, "--device", "cuda", "--defense", "dpsgd.eps8", "--precision", "fp16")
    assert "dpsgd with --precision fp16" in line and "--precision bf16" in line


@pytest.mark.usefixtures("_wide_console")
def test_cli_dp_lora_refuses_gradient_checkpointing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(tmp_path, capsys, "--device", "cpu", "--defense", "dpsgd.eps8+lora.r4", "--gradient-checkpointing")
    assert "dpsgd with --gradient-checkpointing" in line and "max_physical_batch_size" in line


# ------------------------------------------------------------------- bf16 autocast on the CPU


def _unet_output_dtypes(model: DiffusionModel) -> tuple[list[torch.dtype], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.dtype] = []
    handle = model.unet.register_forward_hook(lambda module, args, output: seen.append(output.sample.dtype))
    return seen, handle


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_unet_runs_in_the_chosen_precision(tiny_model_dir: Path, precision: str, dtype: torch.dtype) -> None:
    dataset = ScenesDataset(resolution=8, size=60)
    images = images_to_tensor([dataset.image(i) for i in range(4)])
    captions = [dataset.caption(i) for i in range(4)]
    model = load_model(tiny_model_dir)
    seen, handle = _unet_output_dtypes(model)
    with use(resolve_compute("cpu", precision)):
        report = train(model, images, captions, TrainConfig(epochs=1, batch_size=2, learning_rate=1e-3))
        trained = len(seen)
        out = generate(model, captions, seed=0, num_inference_steps=2, guidance_scale=2.0)
    handle.remove()
    assert trained == report.steps == 2 and len(seen) > trained
    assert set(seen) == {dtype}, "fine-tuning and generation must both run the UNet in the chosen precision"
    # Master weights stay fp32, and what leaves the model is fp32 whatever it computed in.
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    assert math.isfinite(report.final_loss)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 8, 8) and torch.isfinite(out).all()


def test_micro_run_in_bf16_records_its_precision(tmp_path: Path) -> None:
    # Through the GPU check's last stage, i.e. `python -m benchmark run --device cpu --precision bf16`.
    stage = bench_gpu.end_to_end(tmp_path, resolve_compute("cpu", "bf16"), profile_name="micro")
    assert stage.peak_memory_mb is None and stage.details["accelerator_memory_mb"] == {}
    [path] = record_files(tmp_path / "results")
    record = read_record(path)
    assert record.config["precision"] == "bf16" and record.config["device"] == "cpu"
    provenance = record.provenance
    assert (provenance.device, provenance.device_name, provenance.precision) == ("cpu", "cpu", "bf16")
    assert provenance.gradient_checkpointing is False
    assert record.accelerator_memory_mb is None, "the CPU has no accelerator memory to report"
    figures = record.figures()
    assert any(f.name.startswith("utility.") for f in figures)
    for figure in figures:
        assert figure.value is not None and math.isfinite(figure.value), figure.name
    assert math.isfinite(record.training.target["final_loss"])


def test_gpu_check_stages_run_on_the_cpu(tmp_path: Path) -> None:
    # The GPU check's stages at a CPU-sized scale (16 px, a few steps), so that CI keeps them working.
    compute = resolve_compute("cpu", "bf16")
    folder = tmp_path / "tiny-sd"
    built = bench_gpu.save_pipeline(folder, compute, sample_size=8, latent_scale=2)
    assert built.details["resolution"] == 16 and built.details["attention"] == ["AttnProcessor2_0"]
    tuned = bench_gpu.fine_tune(folder, compute, steps=2, batch_size=2)
    assert tuned.details["steps"] == 2 and tuned.details["finite"]
    private = bench_gpu.dp_lora_step(folder, compute, batch_size=4)
    assert private.details["steps"] == 1 and 0 < private.details["epsilon"] <= 8.01
    generated = bench_gpu.generation(folder, compute, images=2)
    assert generated.details["shape"] == [2, 3, 16, 16] and generated.details["finite"]
    for stage in (built, tuned, private, generated):
        assert stage.peak_memory_mb is None and stage.seconds > 0
        assert stage.stage in stage.line()


@pytest.mark.usefixtures("_wide_console")
def test_gpu_check_without_cuda_is_one_line(no_cuda: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_gpu.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: the GPU check needs a CUDA device") and "Traceback" not in line


# ------------------------------------------------------------------- a tiny Stable Diffusion pipeline


@pytest.fixture(scope="module")
def sd_scenes() -> ScenesDataset:
    return ScenesDataset(resolution=16, size=40)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory, sd_scenes: ScenesDataset) -> Path:
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tiny_sd_pipeline([sd_scenes.caption(i) for i in range(len(sd_scenes))]).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


def _sd_batch(dataset: ScenesDataset, n: int) -> tuple[torch.Tensor, list[str]]:
    return images_to_tensor([dataset.image(i) for i in range(n)]), [dataset.caption(i) for i in range(n)]


def _loss_and_grads(
    folder: Path, dataset: ScenesDataset, *, checkpointing: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    model = load_model(folder)
    images, captions = _sd_batch(dataset, 4)
    model.unet.train()
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    assert model.unet.is_gradient_checkpointing == checkpointing
    torch.manual_seed(0)  # the VAE samples its latents from the global generator
    latents = model.images_to_latents(images)
    loss = diffusion_loss(model, latents, model.encode_text(captions), torch.Generator().manual_seed(1))
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.unet.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(sd_folder: Path, sd_scenes: ScenesDataset) -> None:
    loss, grads = _loss_and_grads(sd_folder, sd_scenes, checkpointing=False)
    loss_ckpt, grads_ckpt = _loss_and_grads(sd_folder, sd_scenes, checkpointing=True)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 100
    # Recomputation repeats the same forward ops, so the gradients agree to float error (measured:
    # bit-identical on the CPU); 1e-6 leaves room for another kernel choice in the recomputed pass.
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_train_turns_gradient_checkpointing_on_only_while_training(sd_folder: Path, sd_scenes: ScenesDataset) -> None:
    model = load_model(sd_folder)
    images, captions = _sd_batch(sd_scenes, 4)
    during: list[bool] = []
    with use(Compute(gradient_checkpointing=True)):
        train(
            model,
            images,
            captions,
            TrainConfig(epochs=1, batch_size=2, learning_rate=1e-3),
            on_step=lambda step, total, loss: during.append(model.unet.is_gradient_checkpointing),
        )
    assert during == [True, True]
    assert not model.unet.is_gradient_checkpointing and not model.unet.training


def test_dp_lora_fine_tunes_a_latent_model(sd_folder: Path, sd_scenes: ScenesDataset) -> None:
    model = load_model(sd_folder)
    assert model.vae is not None
    images, captions = _sd_batch(sd_scenes, 8)
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    frozen_before = {
        part: {k: v.clone() for k, v in getattr(model, part).state_dict().items()} for part in ("vae", "text_encoder")
    }
    # A fixed noise multiplier: calibrating one to a target epsilon (PRV) takes ~10 s here, and
    # test_dpsgd.py checks it; what is new is DP-LoRA on a latent model.
    result = resolve("dpsgd.sigma1+lora.r4").fine_tune(
        model=model,
        images=images,
        captions=captions,
        train_config=TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3, seed=0),
    )
    dp = result.details["dpsgd"]
    assert dp["steps"] > 0 and dp["noise_multiplier"] == 1.0, dp
    assert math.isfinite(dp["epsilon"]) and dp["epsilon"] > 0, "the spent epsilon is recorded"
    assert result.details["lora"]["merged"] is True
    unet_after = model.unet.state_dict()
    changed = {k for k in unet_before if not torch.equal(unet_before[k], unet_after[k])}
    projections = {k for k in unet_before if any(f".{p}.weight" in k for p in ("to_q", "to_k", "to_v", "to_out.0"))}
    # The merged adapters moved every attention projection, and nothing else of the UNet.
    assert changed == projections and projections
    for part, before in frozen_before.items():
        for key, value in getattr(model, part).state_dict().items():
            assert torch.equal(before[key], value), f"the {part} must stay frozen ({key})"
    assert math.isfinite(result.report.final_loss)


def test_attention_runs_through_pytorch_sdpa(sd_folder: Path, tiny_model_dir: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    for folder in (sd_folder, tiny_model_dir):
        processors = load_model(folder).unet.attn_processors
        assert processors, folder
        # AttnProcessor2_0 calls F.scaled_dot_product_attention, which picks the flash or memory-efficient kernel.
        assert {type(p) for p in processors.values()} == {AttnProcessor2_0}, folder


# ------------------------------------------------------------------- accelerator memory per stage


def test_stage_timer_records_accelerator_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    resets: list[str] = []
    peaks = iter([300.0, 120.5, 80.0])
    monkeypatch.setattr(Compute, "reset_peak_memory", lambda self: resets.append(str(self.device)))
    monkeypatch.setattr(Compute, "peak_memory_mb", lambda self: next(peaks))
    timer = StageTimer(show=False)
    with timer:
        for name in ("fine-tune target", "attack", "fine-tune target"):
            with timer.stage(name):
                pass
    assert len(resets) == 3, "the peak is reset as each stage starts"
    # A stage run twice keeps its larger peak.
    assert timer.memory_mb == {"fine-tune target": 300.0, "attack": 120.5}


def test_stage_timer_records_nothing_on_the_cpu() -> None:
    timer = StageTimer(show=False)
    with use(Compute()), timer, timer.stage("fine-tune target"):
        pass
    assert "fine-tune target" in timer.timings and timer.memory_mb == {}


def test_accelerator_memory_round_trips_through_the_record() -> None:
    memory = {"fine-tune target": 2048.5, "attack": 1024.0}
    record = make_record(accelerator_memory_mb=memory)
    data = validate(record.to_dict())
    assert data["accelerator_memory_mb"] == memory
    assert ResultRecord.from_dict(data).accelerator_memory_mb == memory
    # A CPU record has no such field at all, and reads back as None.
    cpu = make_record().to_dict()
    assert "accelerator_memory_mb" not in cpu
    assert ResultRecord.from_dict(validate(cpu)).accelerator_memory_mb is None


def test_a_step_the_fp16_scaler_skips_is_not_counted() -> None:
    # GradScaler runs on the CPU too; fp16 autocast does not, so the scaler is driven by hand.
    from benchmark.pipeline.finetune import TrainingHooks, TrainingState

    weight = torch.nn.Parameter(torch.ones(3))
    state = TrainingState(
        model=None,  # type: ignore[arg-type]
        parameters=[weight],
        optimizer=torch.optim.SGD([weight], lr=0.1),
        images=torch.zeros(1),
        captions=[""],
        config=TrainConfig(epochs=1, batch_size=1, learning_rate=0.1),
        generator=torch.Generator(),
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
    )
    hooks = TrainingHooks()
    hooks.backward(torch.stack([weight.sum() * float("inf")]), state)
    assert hooks.optimizer_step(state) is False
    assert torch.equal(weight.detach(), torch.ones(3))
    state.optimizer.zero_grad()
    hooks.backward(torch.stack([weight.sum()]), state)
    assert hooks.optimizer_step(state) is True
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9))
