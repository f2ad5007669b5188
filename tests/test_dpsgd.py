"""DP-SGD: epsilon against an independent accountant, per-example gradients, traps (empty batches,
memory manager, frozen parameters, PEFT ordering), unwrapping."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import dp_accounting
import pytest
import torch
from diffusers import UNet2DConditionModel
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.finetune import TrainConfig
from benchmark.pipeline.models.diffusion import load_model
from defenses import resolve
from defenses.base import FineTuneResult
from defenses.dpsgd import DeltaWarning

# Opacus's RDP orders, so that the second RDP implementation answers the same question.
OPACUS_RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
# PRV (Opacus) returns an upper bound with eps_error 0.01; PLD (dp_accounting) with its
# default discretisation is within ~0.01 of the truth too (8.50 against 8.49 here). RDP
# implementations differ only in which fractional orders converge.
PLD_TOLERANCE = 0.05
RDP_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, list[str]]:
    from benchmark.pipeline.data.base import images_to_tensor
    from benchmark.pipeline.data.scenes import ScenesDataset

    dataset = ScenesDataset(resolution=8, size=60)
    return images_to_tensor([dataset.image(i) for i in range(12)]), [dataset.caption(i) for i in range(12)]


def _fine_tune(model_dir: Path, data, spec: str, overrides: dict[str, str], config: TrainConfig):  # type: ignore[no-untyped-def]
    model = load_model(model_dir)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    result = resolve(spec, overrides).fine_tune(model=model, images=data[0], captions=data[1], train_config=config)
    return model, before, result


@pytest.fixture(scope="module")
def prv_run(tiny_model_dir: Path, data):  # type: ignore[no-untyped-def]
    # 12 members, batch 4: sample rate 1/3, 2 epochs of 3 logical batches.
    filters = len(warnings.filters)
    run = _fine_tune(
        tiny_model_dir, data, "dpsgd.sigma1", {}, TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3, seed=3)
    )
    assert len(warnings.filters) == filters, "the temporary warning filter must be removed"
    return run


def _pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return float(accountant.get_epsilon(delta))


def _rdp_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(orders=OPACUS_RDP_ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    return float(accountant.get_epsilon(delta))


def test_recorded_epsilon_matches_an_independent_pld_accountant(prv_run) -> None:  # type: ignore[no-untyped-def]
    _, _, result = prv_run
    dp = result.details["dpsgd"]
    assert dp["accountant"] == "prv"
    assert dp["noise_multiplier"] == 1.0 and dp["clipping_norm"] == 1.0
    assert dp["sample_rate"] == pytest.approx(1 / 3)
    assert dp["steps"] == 6 == result.report.steps  # empty Poisson batches are steps too
    assert dp["delta"] == pytest.approx(1 / 120)  # default 1/(10 N)
    independent = _pld_epsilon(dp["noise_multiplier"], dp["sample_rate"], dp["steps"], dp["delta"])
    assert abs(dp["epsilon"] - independent) <= PLD_TOLERANCE, (dp["epsilon"], independent)
    assert dp["warnings"] == []


def test_rdp_accountant_matches_dp_accounting_rdp(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    # Also: a delta that is not small next to 1/N is allowed but warned about and recorded.
    with pytest.warns(DeltaWarning, match="delta=0.2 is >= 1/N"):
        _, _, result = _fine_tune(
            tiny_model_dir,
            data,
            "dpsgd",
            {"accountant": "rdp", "target_epsilon": "none", "noise_multiplier": "0.8", "delta": "0.2"},
            TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3),
        )
    dp = result.details["dpsgd"]
    assert dp["accountant"] == "rdp"
    assert "delta=0.2" in dp["warnings"][0] and "1/N" in dp["warnings"][0]
    logging.getLogger("absl").setLevel(logging.ERROR)
    independent = _rdp_epsilon(dp["noise_multiplier"], dp["sample_rate"], dp["steps"], dp["delta"])
    assert abs(dp["epsilon"] - independent) <= RDP_TOLERANCE, (dp["epsilon"], independent)


def test_target_epsilon_is_met(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    # Batch = members: sample rate 1, the quickest calibration.
    _, _, result = _fine_tune(
        tiny_model_dir, data, "dpsgd.eps4", {}, TrainConfig(epochs=2, batch_size=12, learning_rate=1e-3)
    )
    dp = result.details["dpsgd"]
    assert dp["target_epsilon"] == 4.0 and dp["sample_rate"] == 1.0 and dp["steps"] == 2
    # The calibration's binary search stops within 0.01 below the target.
    assert 3.9 <= dp["epsilon"] <= 4.0 + 0.01
    # The (cached) calibration is the one make_private_with_epsilon performs.
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    layer = torch.nn.Linear(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, optimizer, _ = PrivacyEngine(accountant="prv").make_private_with_epsilon(
            module=layer,
            optimizer=torch.optim.SGD(layer.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(12, 2)), batch_size=12),
            target_epsilon=4.0,
            target_delta=dp["delta"],
            epochs=2,
            max_grad_norm=1.0,
        )
    assert optimizer.noise_multiplier == dp["noise_multiplier"]
    assert _pld_epsilon(dp["noise_multiplier"], 1.0, 2, dp["delta"]) == pytest.approx(dp["epsilon"], abs=PLD_TOLERANCE)


def test_dp_recipe_caps_epochs_and_learning_rate_and_calibrates_for_them(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    # The fine-tuning recipe says 5 epochs at 1e-3; DP-SGD caps them at 3 and 2e-4, and its
    # noise is calibrated so that those 3 epochs, not 5, spend the target epsilon.
    recipe = TrainConfig(epochs=5, batch_size=12, learning_rate=1e-3)
    defense = resolve("dpsgd.eps4", {"max_epochs": "3", "max_learning_rate": "2e-4"})
    assert defense.recipe(recipe).epochs == 3 and defense.recipe(recipe).learning_rate == 2e-4
    # Caps, not settings: a gentler recipe is kept; none lifts a cap.
    gentle = TrainConfig(epochs=2, batch_size=12, learning_rate=1e-5)
    assert defense.recipe(gentle) == gentle
    uncapped = resolve("dpsgd", {"max_epochs": "none", "max_learning_rate": "none"})
    assert uncapped.recipe(recipe) == recipe
    model = load_model(tiny_model_dir)
    result = defense.fine_tune(model=model, images=data[0], captions=data[1], train_config=recipe)
    dp = result.details["dpsgd"]
    assert result.report.epochs_completed == 3 == dp["epochs"] and dp["steps"] == 3
    assert dp["learning_rate"] == 2e-4
    assert 3.9 <= dp["epsilon"] <= 4.0 + 0.01
    assert _pld_epsilon(dp["noise_multiplier"], 1.0, 3, dp["delta"]) == pytest.approx(dp["epsilon"], abs=PLD_TOLERANCE)
    with pytest.raises(ConfigError, match="max_learning_rate must be a finite number > 0"):
        resolve("dpsgd", {"max_learning_rate": "0"})
    with pytest.raises(ConfigError, match="max_epochs must be >= 1"):
        resolve("dpsgd", {"max_epochs": "0"})


def test_model_is_unwrapped_changed_and_saveable(prv_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, before, result = prv_run
    assert isinstance(result, FineTuneResult)
    assert type(model.unet) is UNet2DConditionModel
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.unet.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.unet.modules()), "Opacus hooks left behind"
    changed = [k for k, v in model.unet.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) == len(before) == result.details["dpsgd"]["trainable_tensors_changed"]
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.save(tmp_path / "dp")
    reloaded = load_model(tmp_path / "dp")
    torch.testing.assert_close(reloaded.unet.state_dict(), model.unet.state_dict())


def test_memory_manager_splits_logical_batches(prv_run, tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    # Same seed, so the same Poisson draws; physical batches of <= 2 instead of whole logical
    # batches: the logical steps and the accounting are unchanged. (The weights differ: the
    # diffusion noise is drawn per physical batch.)
    _, _, result = prv_run
    model, before, split = _fine_tune(
        tiny_model_dir,
        data,
        "dpsgd.sigma1",
        {"max_physical_batch_size": "2"},
        TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3, seed=3),
    )
    whole, parts = result.details["dpsgd"], split.details["dpsgd"]
    assert parts["largest_physical_batch"] == 2 < whole["largest_physical_batch"]
    assert parts["examples_sampled"] == whole["examples_sampled"]
    assert parts["physical_batches"] > whole["physical_batches"] == whole["steps"]
    for key in ("steps", "empty_batches", "epsilon", "sample_rate", "noise_multiplier"):
        assert parts[key] == whole[key], key
    assert split.report.steps == result.report.steps == len(split.report.loss_history) + parts["empty_batches"]
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_empty_poisson_batches_still_step_and_count(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    # Batch 1 of 12: each logical batch is empty with probability (11/12)^12 ~ 0.35.
    model, before, result = _fine_tune(
        tiny_model_dir, data, "dpsgd.sigma1", {}, TrainConfig(epochs=1, batch_size=1, learning_rate=1e-3)
    )
    dp = result.details["dpsgd"]
    assert dp["empty_batches"] >= 1
    assert dp["steps"] == 12 == result.report.steps
    assert dp["sample_rate"] == pytest.approx(1 / 12)
    assert len(result.report.loss_history) == 12 - dp["empty_batches"]
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_per_example_gradients_match_microbatches(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    """The UNet has no layer that mixes examples: Opacus's per-sample gradients equal one backward per example."""
    from opacus import GradSampleModule

    model = load_model(tiny_model_dir)
    unet = model.unet.train()
    images, captions = data[0][:3], data[1][:3]
    context = model.encode_text(captions)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.tensor([10, 500, 990])
    noisy = model.noise_scheduler.add_noise(images, noise, timesteps)

    def losses(module, idx):  # type: ignore[no-untyped-def]
        prediction = module(noisy[idx], timesteps[idx], encoder_hidden_states=context[idx]).sample
        return ((prediction - noise[idx]) ** 2).mean(dim=(1, 2, 3))

    expected = []
    for i in range(3):
        unet.zero_grad()
        losses(unet, [i]).sum().backward()
        expected.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    unet.zero_grad()
    wrapped = GradSampleModule(unet, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        losses(wrapped, [0, 1, 2]).sum().backward()
    names = ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.norm1.weight"]
    names += [n for n, _ in unet.named_parameters() if "attn2.to_k" in n][:1]
    for name, p in unet.named_parameters():
        if name in names:
            for i in range(3):
                torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    wrapped.to_standard_module()


def test_dp_lora_trains_adapters_only_then_merges(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    model, before, result = _fine_tune(
        tiny_model_dir, data, "dpsgd.sigma1+lora.r4", {}, TrainConfig(epochs=1, batch_size=6, learning_rate=1e-2)
    )
    dp, lora = result.details["dpsgd"], result.details["lora"]
    assert dp["trainable_parameters"] == lora["trainable_parameters"] < lora["base_parameters"] / 10
    assert dp["trainable_tensors_changed"] == 2 * lora["adapted_layers"]  # every A and B matrix
    assert lora["merged"] is True and type(model.unet) is UNet2DConditionModel
    changed = {k for k, v in model.unet.state_dict().items() if not torch.equal(before[k], v)}
    projections = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    assert changed and all(k.endswith(projections) for k in changed), sorted(changed)[:5]


def test_dpsgd_rejects_recipes_outside_its_analysis(tiny_model_dir: Path, data) -> None:  # type: ignore[no-untyped-def]
    for config, message in [
        (TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3, train_text_encoder=True), "train_text_encoder"),
        (TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3, max_grad_norm=1.0), "max_grad_norm"),
    ]:
        model = load_model(tiny_model_dir)
        with pytest.raises(ConfigError, match=message):
            resolve("dpsgd.sigma1").fine_tune(model=model, images=data[0], captions=data[1], train_config=config)
        assert type(model.unet) is UNet2DConditionModel


@pytest.mark.parametrize("spec", ["dpsgd.sigma1", "dpsgd.sigma1+lora.r4"])
def test_ghost_clipping_gives_the_per_example_clipped_update(tiny_model_dir: Path, data, spec: str) -> None:  # type: ignore[no-untyped-def]
    # Fast gradient clipping computes per-example norms another way (ghost norms for Linear
    # layers, two backward passes) but must clip and noise exactly the same sum: with the same
    # seed (Poisson draws, diffusion noise, DP noise) the trained weights agree to float error,
    # also across physical batches of a memory manager.
    config = TrainConfig(epochs=2, batch_size=6, learning_rate=1e-3, seed=5)
    key = "dpsgd." if "+" in spec else ""
    trained = {}
    for mode in ("hooks", "ghost"):
        overrides = {f"{key}grad_sample_mode": mode, f"{key}max_physical_batch_size": "4"}
        model, before, result = _fine_tune(tiny_model_dir, data, spec, overrides, config)
        assert result.details["dpsgd"]["grad_sample_mode"] == mode
        trained[mode] = (model.unet.state_dict(), before, result.details["dpsgd"])
    (hooks, before, hooks_details), (ghost, _, ghost_details) = trained["hooks"], trained["ghost"]
    assert ghost_details["steps"] == hooks_details["steps"] > 0
    assert ghost_details["epsilon"] == hooks_details["epsilon"]
    moved = max(float((hooks[k] - before[k]).abs().max()) for k in hooks)
    assert moved > 1e-5, "the steps must change the weights for the comparison to mean anything"
    for name, value in hooks.items():
        torch.testing.assert_close(ghost[name], value, rtol=0, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
