"""The data-path benchmark runs end to end at tiny sizes (no timing thresholds)."""

from __future__ import annotations

import math

import pytest

from p2pfed.bench import bench_layout, run_bench

KEYS = {
    "memcpy_gbps",
    "mix_gbps",
    "encode_gbps",
    "decode_gbps",
    "decode_copy_gbps",
    "digest_gbps",
    "sign_per_s",
    "verify_per_s",
    "params",
    "neighbours",
    "torch_threads",
    "cpu_count",
}


def test_tiny_bench_reports_every_measurement() -> None:
    result = run_bench(memcpy_mb=1, mix_params=10_000, neighbours=2, repeats=1, crypto_seconds=0.01)
    assert set(result) == KEYS
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    assert result["params"] == 10_000
    assert result["neighbours"] == 2


def test_bench_layout_covers_params() -> None:
    assert bench_layout(10_000).numel == 10_000
    assert bench_layout(7).numel == 7


def test_bench_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        run_bench(mix_params=0)
