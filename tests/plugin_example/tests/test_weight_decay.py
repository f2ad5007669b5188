"""The plugin's own tests: the host's contract, inherited (runs once the plugin is installed)."""

from __future__ import annotations

import pytest

pytest.importorskip("mia_bench_weight_decay", reason="install the plugin first: pip install -e tests/plugin_example")

from defenses.testing import DefenseContract  # noqa: E402


class TestWeightDecay(DefenseContract):
    spec = "weight_decay.wd01"
