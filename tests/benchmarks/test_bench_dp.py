"""DP-SGD step time against the non-private step (pytest-benchmark; timed with --benchmark-enable).

The figure worth quoting comes from the embedded default (the default preset):
    python -m benchmark.app.bench_dp --steps 30
This test runs the same measurement at 8 px so that the suite stays fast.
"""

from __future__ import annotations

import math

from benchmark.app.bench_dp import StepTimes, main, measure


def test_dp_step_time_relative_to_plain(benchmark) -> None:  # type: ignore[no-untyped-def]
    times = benchmark.pedantic(
        measure, kwargs={"resolution": 8, "batch_size": 6, "steps": 2, "warmup": 1}, rounds=1, iterations=1
    )
    assert isinstance(times, StepTimes)
    # The measurement describes what it ran; the timings themselves are compared against a
    # baseline taken on the same machine (docs/performance.md), never asserted here.
    assert (times.resolution, times.batch_size, times.steps, times.lora_rank) == (8, 6, 2, None)
    assert times.trainable_parameters > 0 and times.grad_sample_mode
    assert math.isfinite(times.ratio) and times.plain_s > 0 and times.dp_s > 0
    benchmark.extra_info.update(times.to_dict())


def test_cli_prints_the_ratio(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--resolution", "8", "--batch-size", "4", "--steps", "1", "--lora-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 2" in out and "ratio" in out and "x (median of 1)" in out
