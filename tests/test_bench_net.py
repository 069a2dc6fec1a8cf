"""The network benchmark runs end to end (two processes on 127.0.0.1); no timing thresholds."""

from __future__ import annotations

import pytest

from p2pfed.bench_net import run_net_bench

pytestmark = pytest.mark.network


def test_net_bench_measures_both_paths() -> None:
    result = run_net_bench(size_mb=4, repeats=1)
    assert result["payload_stream_mbps"] > 0
    assert result["raw_tcp_mbps"] > 0
    assert result["stream_vs_tcp"] > 0
