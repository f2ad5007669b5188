"""Generation-time defenses and the noise-gap screen: sampling hooks, Wen et al., Ren et al."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.finetune import TrainConfig, train
from benchmark.pipeline.models.diffusion import generate, gray_box, load_model
from benchmark.pipeline.models.sampling import ComposedSamplingHooks, SamplingHooks
from defenses.ren import RenConfig, RenSampling
from defenses.resolve import resolve
from defenses.testing import DefenseContract
from defenses.wen import WenConfig, WenMitigation, WenScreening, noise_gap

# Fall of the black-box attack's AUC that the inference mitigation must achieve on the leaking recipe.
MARGIN = 0.1

CAPTIONS = ["a red circle on a blue square", "two green stars", "a small yellow triangle above the sea"]


@pytest.fixture(scope="module")
def members(scene_captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    from benchmark.pipeline.data.base import images_to_tensor
    from benchmark.pipeline.data.scenes import ScenesDataset

    dataset = ScenesDataset(resolution=8, size=60)
    return images_to_tensor([dataset.image(i) for i in range(6)]), scene_captions[:6]


def _images(model_dir: Path, hooks: SamplingHooks | None, *, guidance: float = 1.0, seed: int = 0) -> torch.Tensor:
    model = load_model(model_dir)
    if hooks is not None:
        model.sampling_hooks = hooks
    return generate(model, CAPTIONS, seed=seed, num_inference_steps=4, guidance_scale=guidance)


def _unchecked_ren(bos_scale: float, mask_padding: bool) -> RenConfig:
    """A config the defense refuses (it changes nothing), to check the attention path against diffusers'."""
    config = object.__new__(RenConfig)
    object.__setattr__(config, "bos_scale", bos_scale)
    object.__setattr__(config, "mask_padding", mask_padding)
    return config


# -- the hooks --------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_rewritten_attention_equals_diffusers_when_unchanged(tiny_model_dir: Path, guidance: float) -> None:
    """The cross-attention Ren's fix runs through is diffusers' own when its factor is 1 and nothing is masked."""
    plain = _images(tiny_model_dir, None, guidance=guidance)
    same = _images(tiny_model_dir, RenSampling(_unchecked_ren(1.0, False)), guidance=guidance)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "overrides"),
    # The untrained model's gaps are small: a low target makes Wen's mitigation act on every prompt.
    [("ren.both", {}), ("ren.bos", {}), ("ren.mask", {}), ("wen.infer", {"inference_target": "0.001"})],
)
def test_each_generation_defense_changes_images_and_restores_the_unet(
    tiny_model_dir: Path, spec: str, overrides: dict[str, str]
) -> None:
    model = load_model(tiny_model_dir)
    before = {k: type(v) for k, v in model.unet.attn_processors.items()}
    plain = generate(model, CAPTIONS, seed=0, num_inference_steps=4, guidance_scale=1.0)
    hooks = resolve(spec, overrides).sampling_hooks()
    model.sampling_hooks = hooks
    changed = generate(model, CAPTIONS, seed=0, num_inference_steps=4, guidance_scale=1.0)
    assert not torch.allclose(changed, plain, atol=1e-4), spec
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == before
    again = generate(model, CAPTIONS, seed=0, num_inference_steps=4, guidance_scale=1.0)
    torch.testing.assert_close(again, changed, rtol=0, atol=0)  # deterministic for a seed
    assert hooks.details()["prompts"] == 2 * len(CAPTIONS)


def test_attention_is_restored_when_sampling_fails(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    before = dict(model.unet.attn_processors)
    model.sampling_hooks = RenSampling(RenConfig())
    original_step = model.unet.forward

    def failing(*args: object, **kwargs: object) -> object:
        raise RuntimeError("out of memory")

    model.unet.forward = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(model, CAPTIONS, seed=0, num_inference_steps=2, guidance_scale=1.0)
    model.unet.forward = original_step  # type: ignore[method-assign]
    assert dict(model.unet.attn_processors) == before


def test_hooks_compose_and_record_both(tiny_model_dir: Path) -> None:
    defense = resolve("ren.both+wen.infer")
    hooks = defense.sampling_hooks()
    assert isinstance(hooks, ComposedSamplingHooks) and len(hooks.hooks) == 2
    images = _images(tiny_model_dir, hooks)
    assert images.shape[0] == len(CAPTIONS)
    details = hooks.details()
    assert details["bos_scale"] == 1.25 and details["inference_target"] == 0.5


def test_plain_defenses_leave_sampling_alone() -> None:
    for spec in ("none", "lora.r4", "dpsgd.eps8+lora.r4", "wen.train"):
        assert not resolve(spec).sampling_hooks().changes_sampling, spec


def test_gray_box_answers_are_those_of_the_weights(tiny_model_dir: Path) -> None:
    """A generation-time defense never reaches a gray-box query: the denoiser answers as its weights do."""
    from benchmark.pipeline.data.scenes import ScenesDataset

    dataset = ScenesDataset(resolution=8, size=60)
    images = np.stack([dataset.image(i) for i in range(3)]).astype(np.float32)
    steps = np.array([100, 450, 900])
    answers = []
    for spec in ("none", "ren.both+wen.infer"):
        model = load_model(tiny_model_dir)
        model.sampling_hooks = resolve(spec).sampling_hooks()
        answers.append(gray_box(model, name=spec).predict_noise(images, CAPTIONS, timesteps=steps, seed=3).prediction)
    np.testing.assert_array_equal(answers[0], answers[1])


# -- Wen et al. ---------------------------------------------------------------------------------


def test_mitigation_brings_the_gap_below_target_or_spends_its_budget(tiny_model_dir: Path) -> None:
    hooks = WenMitigation(target=0.005, lr=0.05, steps=10)  # below the untrained model's gaps (about 0.03)
    _images(tiny_model_dir, hooks)
    d = hooks.details()
    assert d["prompts"] == d["prompts_mitigated"] == len(CAPTIONS)
    assert d["mean_gap_after"] < d["mean_gap_before"]
    assert 0 <= d["mean_iterations_per_mitigated_prompt"] <= 10
    # One unconditional call, one per iteration and prompt still above target, one check at the end.
    assert d["extra_unet_calls"] >= 3 * len(CAPTIONS)


def test_mitigation_leaves_low_gap_prompts_alone(tiny_model_dir: Path) -> None:
    hooks = WenMitigation(target=1e6, lr=0.05, steps=10)
    plain = _images(tiny_model_dir, None)
    same = _images(tiny_model_dir, hooks)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-6)
    assert hooks.details()["prompts_mitigated"] == 0


def _trained(model_dir: Path, data: tuple[torch.Tensor, list[str]], hooks: object) -> dict[str, torch.Tensor]:
    model = load_model(model_dir)
    train(model, *data, TrainConfig(epochs=2, batch_size=3, learning_rate=1e-3, seed=5), hooks=hooks)  # type: ignore[arg-type]
    return model.unet.state_dict()


def test_screen_with_a_high_threshold_is_plain_training(
    tiny_model_dir: Path, members: tuple[torch.Tensor, list[str]]
) -> None:
    plain = _trained(tiny_model_dir, members, None)
    hooks = WenScreening(threshold=1e6)
    screened = _trained(tiny_model_dir, members, hooks)
    for key, value in plain.items():
        torch.testing.assert_close(screened[key], value, rtol=0, atol=0, msg=key)
    details = hooks.details()
    assert details["examples_seen"] == 12 and details["examples_dropped"] == 0 and details["mean_gap"] > 0


def test_screen_below_every_gap_trains_on_nothing(
    tiny_model_dir: Path, members: tuple[torch.Tensor, list[str]]
) -> None:
    base = load_model(tiny_model_dir).unet.state_dict()
    hooks = WenScreening(threshold=1e-9)
    screened = _trained(tiny_model_dir, members, hooks)
    for key, value in base.items():
        torch.testing.assert_close(screened[key], value, rtol=0, atol=0, msg=key)
    assert hooks.details()["examples_dropped"] == 12


def test_noise_gap_is_rms() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(noise_gap(b, a), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("spec", ["dpsgd.eps8+wen.train", "lora.r4+wen.both"])
def test_screen_composes_with_dpsgd_and_lora(
    spec: str, tiny_model_dir: Path, members: tuple[torch.Tensor, list[str]]
) -> None:
    result = resolve(spec).fine_tune(
        model=load_model(tiny_model_dir), images=members[0], captions=members[1], train_config=TrainConfig(2, 6, 1e-3)
    )
    assert result.details["wen"]["examples_seen"] >= 1


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: WenConfig(screen_threshold=None, inference_target=None), "screen_threshold .*or inference_target"),
        (lambda: WenConfig(screen_threshold=-1.0), "screen_threshold must be a finite number > 0"),
        (lambda: WenConfig(inference_target=float("nan")), "inference_target must be a finite number > 0"),
        (lambda: WenConfig(inference_target=0.1, inference_steps=0), "inference_steps must be a positive integer"),
        (lambda: RenConfig(bos_scale=0.0), "bos_scale must be a finite number > 0"),
        (lambda: RenConfig(bos_scale=1.0, mask_padding=False), "changes nothing"),
    ],
)
def test_bad_settings_are_refused(build: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()  # type: ignore[operator]


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="wen.infer"):
        resolve("wen.inference")


def test_bad_threshold_from_the_command_line_fails_before_training(tmp_path: Path) -> None:
    from benchmark.app.cli import main

    code = main(
        ["run", "--profile", "micro", "--defense", "wen.infer", "--defense-arg", "inference_target=-2",
         "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    )  # fmt: skip
    assert code == 2
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("finetuned"))


class TestWenContract(DefenseContract):
    spec = "wen.both"
    overrides = {"inference_steps": "3"}


class TestRenContract(DefenseContract):
    spec = "ren.both"
    overrides = {"bos_scale": "1.5"}


# -- the benchmark run -------------------------------------------------------------------------


def test_generation_defense_shares_the_plain_fine_tune_and_records_its_work(micro_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Its weights are the plain recipe's (a cache hit after `none`); its black box samples differently."""
    import benchmark.app.runner as runner

    none = micro_run.outcome.record
    outcome = runner.run(
        micro_run.config.replace(defense="ren.both", results_dir=tmp_path / "results"), show_progress=False
    )
    record = outcome.record
    assert record.training.target["from_cache"] is True
    assert record.components["defense"].details["sampling"]["prompts"] > 0
    assert record.utility is not None and none.utility is not None
    assert record.utility.target != none.utility.target  # generated through the mitigation
    assert record.utility.base_model == none.utility.base_model  # the control is not defended


def test_inference_mitigation_lowers_the_black_box_attack_only(tmp_path: Path, overfit_cache_dir: Path) -> None:
    """Wen et al.'s prompt-embedding fix on a micro target that clearly leaks (scenario III).

    The black-box attack (Pang & Wang) must fall by MARGIN; the gray-box loss attack, which
    never generates an image, must not move at all: the weights are the plain recipe's (the
    fine-tune is shared) and no hook runs in a noise prediction. The micro model's gaps are
    smaller than the default's, so the target is 0.1 here (its overfit target's mean
    first-step gap is about 0.28). Measured (CPU): none 0.906 / 0.992, wen.infer 0.750 / 0.992.
    """
    from benchmark.app.runner import run
    from tests.factories import overfit_micro

    config = overfit_micro(tmp_path, control=False, utility_metrics=False, cache_dir=overfit_cache_dir)
    aucs = {}
    for defense, args in (("none", ()), ("wen.infer", (("inference_target", "0.1"),))):
        for attack in ("pang-wang", "loss"):
            cell = config.replace(defense=defense, defense_args=args, attack=attack, results_dir=tmp_path / defense)
            aucs[defense, attack] = run(cell, show_progress=False).record.privacy.auc
    assert aucs["none", "pang-wang"] >= 0.85, aucs
    assert aucs["wen.infer", "pang-wang"] <= aucs["none", "pang-wang"] - MARGIN, aucs
    assert aucs["wen.infer", "loss"] == aucs["none", "loss"], aucs
