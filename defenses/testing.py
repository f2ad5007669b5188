"""A contract test base class for defenses, built-in or third-party.

Plugin authors subclass it in their own test suite (pytest collects the
inherited tests)::

    from defenses.testing import DefenseContract

    class TestMyDefense(DefenseContract):
        spec = "my_defense"                 # name, preset or composition
        overrides = {"strength": "0.1"}     # optional, as --defense-arg would pass them

Each subclass fine-tunes the embedded tiny model (8 px, a handful of steps, a few
seconds on a CPU) once and checks what the benchmark relies on: the defense
resolves by name, its config is a frozen dataclass, `fine_tune` returns a
`FineTuneResult` with finite numbers and JSON-serialisable details, the model
afterwards is a plain diffusers UNet that saves and loads, and training changed
it. Needs pytest (a test dependency).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.data.scenes import ScenesDataset
from benchmark.pipeline.finetune import TrainConfig
from benchmark.pipeline.models.diffusion import DiffusionModel, load_model
from benchmark.pipeline.models.tiny import TinyModelConfig, build_tiny_model
from defenses.base import ComposedDefense, Defense, FineTuneResult
from defenses.resolve import resolve


@dataclass
class ContractRun:
    model: DiffusionModel
    result: FineTuneResult
    before: dict[str, torch.Tensor]
    members: int


class DefenseContract:
    """Inherit, set `spec`, and pytest runs every `test_*` method below against your defense."""

    spec: ClassVar[str] = ""
    overrides: ClassVar[Mapping[str, object]] = {}
    resolution: ClassVar[int] = 8
    members: ClassVar[int] = 6
    train_config: ClassVar[TrainConfig] = TrainConfig(epochs=2, batch_size=3, learning_rate=1e-3)

    def make_defense(self) -> Defense:
        """The defense under test; override to build it without the registry."""
        if not self.spec:
            raise AssertionError(f"{type(self).__name__} must set `spec` (e.g. 'dpsgd.eps8') or override make_defense")
        return resolve(self.spec, self.overrides)

    @pytest.fixture(scope="class")
    def contract_data(self) -> tuple[torch.Tensor, list[str], list[str]]:
        dataset = ScenesDataset(resolution=self.resolution, size=max(40, self.members))
        captions = [dataset.caption(i) for i in range(len(dataset))]
        images = images_to_tensor([dataset.image(i) for i in range(self.members)])
        return images, captions[: self.members], captions

    @pytest.fixture(scope="class")
    def contract_model_dir(
        self, tmp_path_factory: pytest.TempPathFactory, contract_data: tuple[torch.Tensor, list[str], list[str]]
    ) -> Path:
        model = build_tiny_model(corpus=contract_data[2], resolution=self.resolution, config=TinyModelConfig(), seed=0)
        folder = tmp_path_factory.mktemp("contract") / "base"
        model.save(folder)
        return folder

    @pytest.fixture(scope="class")
    def contract_run(
        self, contract_model_dir: Path, contract_data: tuple[torch.Tensor, list[str], list[str]]
    ) -> ContractRun:
        images, captions, _ = contract_data
        model = load_model(contract_model_dir)
        before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
        result = self.make_defense().fine_tune(
            model=model, images=images, captions=captions, train_config=self.train_config
        )
        return ContractRun(model=model, result=result, before=before, members=len(images))

    # -- the contract ---------------------------------------------------------------

    def test_resolves_and_describes(self) -> None:
        defense = self.make_defense()
        described = defense.describe()
        assert {"name", "version", "config"} <= set(described), described
        assert isinstance(described["name"], str) and isinstance(described["version"], str)
        json.dumps(described, allow_nan=False)
        if self.spec:
            assert resolve(self.spec, self.overrides).describe() == described, "resolve must be deterministic"

    def test_config_is_a_frozen_dataclass(self) -> None:
        defense = self.make_defense()
        parts = defense.parts if isinstance(defense, ComposedDefense) else [defense]
        for part in parts:
            assert dataclasses.is_dataclass(part.config), f"{part.name}.Config must be a dataclass"
            fields = dataclasses.fields(part.config)
            if fields:
                with pytest.raises(dataclasses.FrozenInstanceError):
                    setattr(part.config, fields[0].name, getattr(part.config, fields[0].name))

    def test_fine_tune_reports(self, contract_run: ContractRun) -> None:
        result = contract_run.result
        assert isinstance(result, FineTuneResult)
        report = result.report
        assert report.steps >= 1
        assert 1 <= report.epochs_completed <= self.train_config.epochs
        assert math.isfinite(report.final_loss)
        assert all(math.isfinite(v) for v in report.loss_history)

    def test_details_are_json(self, contract_run: ContractRun) -> None:
        details = contract_run.result.details
        assert isinstance(details, dict)
        # NaN or infinity would make the result record unwritable.
        json.dumps(details, allow_nan=False)
        for name, value in details.items():
            assert isinstance(value, dict), f"details are keyed by defense name, got {name!r}: {value!r}"

    def test_model_is_plain_and_saveable(self, contract_run: ContractRun, tmp_path: Path) -> None:
        from diffusers import UNet2DConditionModel

        model = contract_run.model
        assert type(model.unet) is UNet2DConditionModel, f"unet left wrapped: {type(model.unet).__name__}"
        assert set(model.unet.state_dict()) == set(contract_run.before), "parameter names changed (unmerged adapter?)"
        assert not model.unet.training, "the model must be left in eval mode"
        model.save(tmp_path / "tuned")
        reloaded = load_model(tmp_path / "tuned")
        for key, value in model.unet.state_dict().items():
            torch.testing.assert_close(reloaded.unet.state_dict()[key], value)

    def test_training_changed_the_weights(self, contract_run: ContractRun) -> None:
        after = contract_run.model.unet.state_dict()
        changed = [k for k, v in contract_run.before.items() if not torch.equal(v, after[k])]
        assert changed, "fine-tuning left every UNet weight unchanged"
