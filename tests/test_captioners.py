"""Captioners for scenarios II/IV: the embedded tiny one and a local BLIP folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.attack import Query, caption_queries
from attacks.captioners import (
    CAPTIONERS,
    CaptionerRequest,
    CaptionerTraining,
    WordVocabulary,
    build_captioner,
)
from attacks.training_data import TrainingData
from benchmark.kernel.errors import ConfigError, ModelError

FAST = CaptionerTraining(pretrain_epochs=3, finetune_epochs=3, hf_finetune_epochs=1)


@pytest.fixture(scope="module")
def data() -> tuple[TrainingData, TrainingData]:
    from benchmark.pipeline.data.scenes import ScenesDataset

    ds = ScenesDataset(resolution=8, size=160)

    def part(indices: range, name: str) -> TrainingData:
        return TrainingData.from_arrays(
            np.stack([ds.image(i) for i in indices]), [ds.caption(i) for i in indices], name=name
        )

    return part(range(128), "public"), part(range(128, 160), "auxiliary")


def test_word_vocabulary_round_trip() -> None:
    vocab = WordVocabulary.learn(["a red circle, on blue", "a blue square"], max_size=100)
    ids = vocab.encode(["a red square, on blue"], max_words=10)[0].tolist()
    assert vocab.decode(ids[1:]) == "a red square, on blue"
    unknown = vocab.encode(["a green circle"], max_words=10)[0].tolist()
    assert vocab.decode(unknown[1:]) == "a circle", "unknown words are dropped"


def test_tiny_captioner_trains_caches_and_fine_tunes(data: tuple[TrainingData, TrainingData], tmp_path: Path) -> None:
    public, auxiliary = data
    request = CaptionerRequest(public=public, auxiliary=auxiliary, cache_dir=tmp_path, training=FAST)
    tuned = build_captioner("tiny", request)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captioner-tiny", "captioner-tiny-ft"]
    captions = tuned.caption(auxiliary.images[:5])
    assert len(captions) == 5 and all(isinstance(c, str) for c in captions)
    described = tuned.describe()
    assert described["fine_tuned"] is True and described["fine_tuned_on"] == "auxiliary data"
    json.dumps(described, allow_nan=False)
    # The ablation: the same pretrained captioner, reused from the cache, not fine-tuned.
    untuned = build_captioner(
        "tiny", CaptionerRequest(public=public, auxiliary=auxiliary, fine_tune=False, cache_dir=tmp_path, training=FAST)
    )
    assert untuned.describe()["fine_tuned"] is False
    assert untuned.describe()["captioner-tiny_from_cache"] is True
    again = build_captioner("tiny", request)
    assert again.describe()["captioner-tiny-ft_from_cache"] is True
    assert again.caption(auxiliary.images[:5]) == captions


def test_tiny_captioner_learns_the_captions(data: tuple[TrainingData, TrainingData]) -> None:
    public, _ = data
    torch.manual_seed(0)
    captioner = build_captioner("tiny", CaptionerRequest(public=public, training=CaptionerTraining(pretrain_epochs=60)))
    words = [c.split() for c in captioner.caption(public.images[:32])]
    truth = [c.split() for c in public.captions[:32]]
    # The background colour is the easiest attribute at 8 px: the last-but-one word.
    assert np.mean([w[-2:] == t[-2:] for w, t in zip(words, truth, strict=True)]) > 0.5


def test_caption_queries_replaces_missing_captions(data: tuple[TrainingData, TrainingData]) -> None:
    public, auxiliary = data
    captioner = build_captioner("tiny", CaptionerRequest(public=public, training=FAST))
    queries = [Query(f"q{i}", auxiliary.images[i], None) for i in range(3)]
    filled = caption_queries(queries, captioner)
    assert [q.query_id for q in filled] == ["q0", "q1", "q2"]
    assert all(isinstance(q.caption, str) for q in filled)


def test_tiny_captioner_needs_public_data() -> None:
    with pytest.raises(ConfigError, match="public split"):
        CAPTIONERS.check("tiny", CaptionerRequest())


def _tiny_blip(folder: Path) -> None:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    words = "a small large red green blue circle square at the on background top left".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's own tokenizer declares it
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config={**tiny, "image_size": 8, "patch_size": 4},
        text_config={
            **tiny,
            "vocab_size": len(vocab),
            "encoder_hidden_size": 16,
            "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": 0,
            "sep_token_id": vocab.index("[SEP]"),
            "eos_token_id": vocab.index("[SEP]"),
            "max_position_embeddings": 32,
        },
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_blip_captioner_from_a_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "blip"
    _tiny_blip(folder)
    images = np.random.default_rng(0).uniform(size=(6, 8, 8, 3)).astype(np.float32)
    auxiliary = TrainingData.from_arrays(images, ["a small red circle"] * 3 + ["a large blue square"] * 3, name="aux")
    training = CaptionerTraining(hf_finetune_epochs=20, hf_learning_rate=1e-2)
    captioner = build_captioner(
        "blip",
        CaptionerRequest(path=folder, auxiliary=auxiliary, cache_dir=tmp_path / "cache", training=training),
    )
    # Fine-tuning on the auxiliary captions is what makes it reproduce them.
    assert captioner.caption(images) == auxiliary.captions
    described = captioner.describe()
    assert described["fine_tuned"] is True and described["model_type"] == "blip"
    untuned = build_captioner("blip", CaptionerRequest(path=folder, auxiliary=auxiliary, fine_tune=False))
    assert untuned.describe()["fine_tuned"] is False
    assert len(untuned.caption(images[:2])) == 2


def test_blip_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--captioner-path"):
        CAPTIONERS.check("blip", CaptionerRequest())
    with pytest.raises(ModelError, match="does not exist"):
        CAPTIONERS.check("blip", CaptionerRequest(path=tmp_path / "nope"))
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="needs a BLIP or BLIP-2"):
        CAPTIONERS.check("blip", CaptionerRequest(path=tmp_path / "vit"))


def test_expected_captioners_registered() -> None:
    assert set(CAPTIONERS.names()) >= {"tiny", "blip"}
