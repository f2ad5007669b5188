"""Model folders: the tiny default's round trip, load errors, and a tiny real Stable Diffusion pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.kernel.errors import ModelError
from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.finetune import TrainConfig, train
from benchmark.pipeline.models.diffusion import REQUIRED_SUBFOLDERS, DiffusionModel, generate, load_model
from benchmark.pipeline.models.registry import MODELS, BaseModelRequest
from benchmark.pipeline.models.tiny import TinyModelConfig, build_tiny_model
from tests.factories import tiny_sd_pipeline

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def _assert_no_pickles(folder: Path) -> None:
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickled weights written: {pickles}"


def test_tiny_model_save_load_round_trip(tmp_path: Path, scene_captions: list[str]) -> None:
    model = build_tiny_model(corpus=scene_captions, resolution=8, config=TinyModelConfig(), seed=3)
    folder = tmp_path / "tiny"
    model.save(folder)
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    assert not (folder / "vae").exists()
    _assert_no_pickles(folder)

    loaded = load_model(folder)
    assert loaded.vae is None
    assert loaded.resolution == 8 and loaded.latent_scale == 1
    _assert_same_weights(model.unet, loaded.unet)
    _assert_same_weights(model.text_encoder, loaded.text_encoder)
    assert loaded.tokenizer(scene_captions[:3]).input_ids == model.tokenizer(scene_captions[:3]).input_ids
    assert loaded.tokenizer.model_max_length == model.tokenizer.model_max_length
    assert loaded.noise_scheduler.config.num_train_timesteps == model.noise_scheduler.config.num_train_timesteps
    # Loaded for inference: nothing trains by accident.
    assert not loaded.text_encoder.training and not loaded.unet.training
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())


def test_tiny_model_seed_controls_weights(scene_captions: list[str]) -> None:
    a = build_tiny_model(corpus=scene_captions, resolution=8, config=TinyModelConfig(), seed=0)
    b = build_tiny_model(corpus=scene_captions, resolution=8, config=TinyModelConfig(), seed=0)
    c = build_tiny_model(corpus=scene_captions, resolution=8, config=TinyModelConfig(), seed=1)
    _assert_same_weights(a.unet, b.unet)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_load_model_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        load_model(tmp_path / "nowhere")
    message = str(info.value)
    assert "does not exist" in message and "--model-path" in message
    assert "nothing is downloaded" in message


def test_load_model_without_model_index(tmp_path: Path, tiny_model_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as info:
        load_model(empty)
    message = str(info.value)
    assert "model_index.json" in message
    assert all(sub in message for sub in REQUIRED_SUBFOLDERS)
    assert "save_pretrained" in message

    # All subfolders present, only model_index.json missing: that is what it names.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "model_index.json").unlink()
    with pytest.raises(ModelError, match="missing: model_index.json"):
        load_model(copy)


def test_load_model_missing_subfolder_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "scheduler")
    with pytest.raises(ModelError, match="missing: scheduler"):
        load_model(copy)


def test_load_model_corrupt_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    # Caught by the cheap folder check (the safetensors header), before any weights are read.
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_model(copy)


# ---------------------------------------------------------------- Stable Diffusion layout


@pytest.fixture(scope="module")
def sd_scenes() -> ScenesDataset:
    return ScenesDataset(resolution=16, size=40)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory, sd_scenes: ScenesDataset) -> Path:
    corpus = [sd_scenes.caption(i) for i in range(len(sd_scenes))]
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tiny_sd_pipeline(corpus).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def sd_model(sd_folder: Path) -> DiffusionModel:
    return load_model(sd_folder)


def test_sd_folder_loads_as_latent_model(sd_model: DiffusionModel) -> None:
    assert sd_model.vae is not None
    assert sd_model.latent_scale == 2
    assert sd_model.resolution == 16
    assert sd_model.unet.config.in_channels == 4
    context = sd_model.encode_text(["a red circle", "a blue square"])
    assert context.shape == (2, 16, 32)


def test_sd_latent_round_trip_shapes(sd_model: DiffusionModel, sd_scenes: ScenesDataset) -> None:
    images = images_to_tensor([sd_scenes.image(i) for i in range(2)])
    latents = sd_model.images_to_latents(images)
    assert latents.shape == (2, 4, 8, 8)
    decoded = sd_model.latents_to_images(latents)
    assert decoded.shape == (2, 3, 16, 16)


def test_sd_fine_tune_and_generate(sd_model: DiffusionModel, sd_scenes: ScenesDataset) -> None:
    images = images_to_tensor([sd_scenes.image(i) for i in range(4)])
    captions = [sd_scenes.caption(i) for i in range(4)]
    before = {k: v.clone() for k, v in sd_model.unet.state_dict().items()}
    vae_before = {k: v.clone() for k, v in sd_model.vae.state_dict().items()}  # type: ignore[union-attr]
    steps: list[tuple[int, int, float]] = []
    report = train(
        sd_model,
        images,
        captions,
        TrainConfig(epochs=1, batch_size=2, learning_rate=1e-3),
        on_step=lambda step, total, loss: steps.append((step, total, loss)),
    )
    assert report.steps == 2 and report.epochs_completed == 1
    assert [s[:2] for s in steps] == [(1, 2), (2, 2)]
    assert np.isfinite(report.final_loss) and len(report.loss_history) == 2
    changed = any(not torch.equal(before[k], v) for k, v in sd_model.unet.state_dict().items())
    assert changed, "one epoch of training left the UNet unchanged"
    for key, value in sd_model.vae.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(vae_before[key], value), f"the VAE must stay frozen ({key})"

    out = generate(sd_model, captions[:3], seed=0, num_inference_steps=2, guidance_scale=1.0)
    assert out.shape == (3, 3, 16, 16)
    assert out.min() >= -1.0 and out.max() <= 1.0
    guided = generate(sd_model, captions[:3], seed=0, num_inference_steps=2, guidance_scale=3.0, batch_size=2)
    assert guided.shape == (3, 3, 16, 16)
    again = generate(sd_model, captions[:3], seed=0, num_inference_steps=2, guidance_scale=1.0)
    torch.testing.assert_close(out, again)


def test_sd_saved_again_round_trips(tmp_path: Path, sd_model: DiffusionModel) -> None:
    folder = tmp_path / "resaved"
    sd_model.save(folder)
    _assert_no_pickles(folder)
    loaded = load_model(folder)
    assert loaded.vae is not None and loaded.resolution == 16
    _assert_same_weights(sd_model.vae, loaded.vae)  # type: ignore[arg-type]
    _assert_same_weights(sd_model.unet, loaded.unet)


def _request(dataset: ScenesDataset, tmp_path: Path, model_path: Path | None, resolution: int) -> BaseModelRequest:
    return BaseModelRequest(
        dataset=dataset,
        public_indices=(),
        resolution=resolution,
        pretrain=TrainConfig(epochs=1, batch_size=1, learning_rate=1e-3),
        cache_dir=tmp_path / "cache",
        model_path=model_path,
    )


def test_sd15_model_source(tmp_path: Path, sd_folder: Path, sd_scenes: ScenesDataset) -> None:
    base = MODELS.get("sd15")(_request(sd_scenes, tmp_path, sd_folder, 16), None)
    assert base.model_dir == sd_folder.resolve()
    assert base.description["name"] == "sd15" and base.description["resolution"] == 16
    loaded = base.load()
    assert loaded.vae is not None and loaded.resolution == 16
    assert not (tmp_path / "cache").exists(), "a local folder model must not be copied into the cache"


def test_sd15_model_source_errors(tmp_path: Path, sd_folder: Path, sd_scenes: ScenesDataset) -> None:
    source = MODELS.get("sd15")
    with pytest.raises(ModelError, match="--model-path"):
        source(_request(sd_scenes, tmp_path, None, 16), None)
    with pytest.raises(ModelError, match="--resolution 16"):
        source(_request(sd_scenes, tmp_path, sd_folder, 8), None)


def test_sd15_description_identifies_the_weights(tmp_path: Path, sd_scenes: ScenesDataset) -> None:
    corpus = [sd_scenes.caption(i) for i in range(len(sd_scenes))]
    folder = tmp_path / "model"
    tiny_sd_pipeline(corpus).save_pretrained(folder, safe_serialization=True)
    first = MODELS.get("sd15")(_request(sd_scenes, tmp_path, folder, 16), None).description
    # Different weights, same path (e.g. a re-downloaded or re-trained checkpoint).
    model = load_model(folder)
    with torch.no_grad():
        model.unet.conv_in.weight.add_(1.0)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    second = MODELS.get("sd15")(_request(sd_scenes, tmp_path, folder, 16), None).description
    assert first != second


def test_tiny_model_is_a_function_of_its_seed() -> None:
    """Same corpus and seed -> same tokenizer ids and weights (the BPE trainer's ids vary by call)."""
    from benchmark.pipeline.data.scenes import ScenesDataset
    from benchmark.pipeline.models.tiny import TinyModelConfig, build_tiny_model

    ds = ScenesDataset(resolution=8, size=200)
    corpus = [ds.caption(i) for i in range(len(ds))]
    first = build_tiny_model(corpus=corpus, resolution=8, config=TinyModelConfig(), seed=3)
    second = build_tiny_model(corpus=corpus, resolution=8, config=TinyModelConfig(), seed=3)
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    for (name, a), (_, b) in zip(first.unet.state_dict().items(), second.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
