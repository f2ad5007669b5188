"""Image encoders: the contract every registered encoder satisfies, the trained CNN, local HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.encoders import (
    ENCODERS,
    EncoderRequest,
    EncoderTraining,
    build_encoder,
    inspect_vision_folder,
)
from attacks.testing import EncoderContract
from attacks.training_data import TrainingData
from benchmark.kernel.errors import BenchmarkError, ConfigError, ModelError

TINY_VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)


def _images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def public() -> TrainingData:
    from benchmark.pipeline.data.scenes import ScenesDataset

    ds = ScenesDataset(resolution=8, size=64)
    return TrainingData.from_arrays(
        np.stack([ds.image(i) for i in range(64)]), [ds.caption(i) for i in range(64)], name="scenes-64"
    )


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit") / "model"
    ViTModel(ViTConfig(intermediate_size=32, **TINY_VISION)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.2] * 3}))
    return folder


class TestContract_pixels(EncoderContract):
    name = "pixels"


class TestContract_cnn(EncoderContract):
    name = "cnn"

    def request(self, tmp_path: Path) -> EncoderRequest:
        from benchmark.pipeline.data.scenes import ScenesDataset

        ds = ScenesDataset(resolution=8, size=32)
        public = TrainingData.from_arrays(
            np.stack([ds.image(i) for i in range(32)]), [ds.caption(i) for i in range(32)], name="scenes-32"
        )
        return EncoderRequest(public=public, cache_dir=tmp_path, training=EncoderTraining(epochs=1))


class TestContract_hf(EncoderContract):
    name = "hf"

    def request(self, tmp_path: Path) -> EncoderRequest:
        from transformers import ViTConfig, ViTModel

        torch.manual_seed(0)
        ViTModel(ViTConfig(intermediate_size=32, **TINY_VISION)).save_pretrained(tmp_path / "vit")
        return EncoderRequest(path=tmp_path / "vit")


def test_every_registered_encoder_has_a_contract_test() -> None:
    tested = {cls.name for cls in EncoderContract.__subclasses__() if cls.__module__ == __name__}
    assert tested == set(ENCODERS.names())


def test_cnn_encoder_is_trained_cached_and_keyed_by_inputs(public: TrainingData, tmp_path: Path) -> None:
    request = EncoderRequest(public=public, cache_dir=tmp_path, training=EncoderTraining(epochs=1))
    first = build_encoder("cnn", request)
    [entry] = list((tmp_path / "encoder-cnn").iterdir())
    assert (entry / "model.safetensors").is_file()
    assert first.describe()["from_cache"] is False
    again = build_encoder("cnn", request)
    assert again.describe()["from_cache"] is True
    images = _images(3)
    torch.testing.assert_close(again.embed(images), first.embed(images))
    # Different training data -> a different cache entry.
    other = TrainingData.from_arrays(public.images[:32], public.captions[:32], name="half")
    build_encoder("cnn", EncoderRequest(public=other, cache_dir=tmp_path, training=EncoderTraining(epochs=1)))
    assert len(list((tmp_path / "encoder-cnn").iterdir())) == 2
    # Patch grid at half resolution.
    assert first.embed(images).shape[1] == 4 * 4


def test_cnn_encoder_needs_public_data() -> None:
    with pytest.raises(ConfigError, match="public split"):
        build_encoder("cnn", EncoderRequest())


@pytest.mark.parametrize(("kind", "prefix"), [("vit", 1), ("deit", 2), ("beit", 1), ("clip_vision", 1), ("clip", 1)])
def test_hf_encoder_drops_cls_tokens(kind: str, prefix: int, tmp_path: Path) -> None:
    import transformers as tf

    folder = tmp_path / kind
    if kind == "clip":
        text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
        config = tf.CLIPConfig(vision_config={**TINY_VISION, "intermediate_size": 32}, text_config=text)
        tf.CLIPModel(config).save_pretrained(folder)
    else:
        classes = {
            "vit": (tf.ViTConfig, tf.ViTModel),
            "deit": (tf.DeiTConfig, tf.DeiTModel),
            "beit": (tf.BeitConfig, tf.BeitModel),
            "clip_vision": (tf.CLIPVisionConfig, tf.CLIPVisionModel),
        }
        config_cls, model_cls = classes[kind]
        model_cls(config_cls(intermediate_size=32, **TINY_VISION)).save_pretrained(folder)
    encoder = build_encoder("hf", EncoderRequest(path=folder))
    images = _images(2, size=12)  # resized to the model's 8 px
    emb = encoder.embed(images)
    assert emb.shape == (2, 4, 16), "4 patches of 4x4 px, CLS/distillation tokens dropped"
    with torch.no_grad():
        x = torch.nn.functional.interpolate(
            torch.from_numpy(images).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear", antialias=True
        )
        hidden = encoder.model(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    assert hidden.shape[1] == 4 + prefix
    torch.testing.assert_close(emb, hidden[:, prefix:])


def test_hf_encoder_uses_the_folder_normalisation(vit_dir: Path) -> None:
    folder = inspect_vision_folder(vit_dir)
    assert folder.image_mean == (0.4, 0.4, 0.4) and folder.image_std == (0.2, 0.2, 0.2)
    assert folder.image_size == (8, 8) and folder.patch_size == 4
    described = build_encoder("hf", EncoderRequest(path=vit_dir)).describe()
    assert described["model_type"] == "vit" and described["path"] == str(vit_dir.resolve())


def test_hf_folder_that_is_not_a_vision_model(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="'bert' model, which is not a vision model"):
        ENCODERS.check("hf", EncoderRequest(path=tmp_path / "bert"))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no config.json"),
    ],
)
def test_hf_folder_errors(tmp_path: Path, make, expected: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BenchmarkError, match=expected):
        ENCODERS.check("hf", EncoderRequest(path=make(tmp_path)))


def test_hf_without_path() -> None:
    with pytest.raises(ConfigError, match="--encoder-path"):
        ENCODERS.check("hf", EncoderRequest())


def test_config_validate_rejects_non_vision_encoder_folder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from benchmark.app.config import profile

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    ).save_pretrained(tmp_path / "bert")
    config = profile("micro").replace(encoder="hf", encoder_path=tmp_path / "bert", cache_dir=tmp_path / "c")
    with pytest.raises(ModelError, match="not a vision model"):
        config.validate()
    assert not (tmp_path / "c").exists(), "rejected before anything was built"
