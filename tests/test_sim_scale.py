"""The simulator at scale: ``bench --sim --quick`` runs end to end (no timing thresholds), its
numbers repeat with the seed, and the trace keeps about one round of states."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2pfed.bench import SIM_QUICK_SIZES, run_sim_bench, sim_scale_run
from p2pfed.cli import app

SIZE_KEYS = {"nodes", "rounds", "params", "dtype", "seed", "sim_node_round_ms",
             "sim_peak_rss_mb", "sim_start_rss_mb", "sim_setup_s", "sim_trace_peak_states",
             "consensus_distance", "messages", "fetch_bytes"}


def test_quick_sim_bench_reports_each_size_and_repeats_with_the_seed(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(app, ["bench", "--sim", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {"sim_node_round_ms", "sim_peak_rss_mb", "sim_sizes"}
    sizes = report["sim_sizes"]
    assert [(s["nodes"], s["rounds"]) for s in sizes] == list(SIM_QUICK_SIZES)
    for size in sizes:
        assert set(size) == SIZE_KEYS
        assert math.isfinite(size["sim_node_round_ms"]) and size["sim_node_round_ms"] > 0
        assert size["sim_peak_rss_mb"] >= size["sim_start_rss_mb"] > 0
        distances = size["consensus_distance"]
        assert len(distances) == size["rounds"] and distances[-1] < distances[0] < 1.0
        # the trace holds about one round of states, never the whole run
        assert size["sim_trace_peak_states"] <= 2 * size["nodes"]
    assert report["sim_node_round_ms"] == sizes[-1]["sim_node_round_ms"]
    assert report["sim_peak_rss_mb"] == sizes[-1]["sim_peak_rss_mb"]
    # the same seed gives the same numbers, in another process as in this one
    nodes, rounds = SIM_QUICK_SIZES[0]
    again = run_sim_bench(sizes=[(nodes, rounds)], params=sizes[0]["params"])["sim_sizes"][0]
    assert again["consensus_distance"] == sizes[0]["consensus_distance"]
    assert (again["messages"], again["fetch_bytes"]) == (sizes[0]["messages"],
                                                         sizes[0]["fetch_bytes"])
    here = sim_scale_run(nodes, rounds, sizes[0]["params"])
    # (this process's BLAS and torch run more threads than the bench's children, which only
    # reorders float sums: the same numbers to the last bits, not bit for bit)
    assert here["consensus_distance"] == pytest.approx(sizes[0]["consensus_distance"],
                                                       rel=1e-12, abs=0)
