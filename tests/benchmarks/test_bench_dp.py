"""DP-SGD step time against the non-private step (pytest-benchmark; timed with --benchmark-enable).

The figure worth quoting comes from the embedded default (the default preset):
    python -m benchmark.app.bench_dp --steps 30
This test runs the same measurement at 8 px so that the suite stays fast.
"""

from __future__ import annotations

from benchmark.app.bench_dp import StepTimes, main, measure


def test_dp_step_time_relative_to_plain(benchmark) -> None:  # type: ignore[no-untyped-def]
    times = benchmark.pedantic(
        measure, kwargs={"resolution": 8, "batch_size": 6, "steps": 2, "warmup": 1}, rounds=1, iterations=1
    )
    assert isinstance(times, StepTimes)
    assert times.plain_s > 0 and times.dp_s > 0
    # Per-example gradients, clipping and noise are extra work on top of the same step.
    assert times.ratio == times.dp_s / times.plain_s > 1
    benchmark.extra_info.update(times.to_dict())


def test_cli_prints_the_ratio(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--resolution", "8", "--batch-size", "4", "--steps", "1", "--lora-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 2" in out and "ratio" in out and "x (median of 1)" in out
