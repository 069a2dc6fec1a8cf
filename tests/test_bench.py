"""The data-path benchmark runs end to end at tiny sizes (no timing thresholds)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gossip.identity import load_identity
from p2pfed.bench import (
    bench_layout,
    build_bench_home,
    child_cpu_seconds,
    cli_start_seconds,
    run_bench,
    run_ledger_bench,
)
from p2pfed.blobs import BlobStore, read_state
from p2pfed.ledger import Ledger, verify_ledger

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


def test_bench_home_holds_a_verifiable_ledger_of_a_nodes_kinds(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = build_bench_home(home, 500)
    ident = load_identity(home / "identity.key")
    assert verify_ledger(home / "ledger.sqlite3", ident.public_key).ok
    with Ledger.open(home / "ledger.sqlite3", ident) as ledger:
        assert len(ledger) >= 500
        kinds = {e.kind for e in ledger.entries()}
        last = ledger.last("checkpoint")
        assert last is not None
        blob = read_state(BlobStore(home / "blobs"), last.body["digest"])  # (as a node reads it)
    assert {"local-update", "contribution", "mix", "checkpoint", "membership"} <= kinds
    assert blob.numel() == config.components.dim


@pytest.mark.network
def test_ledger_bench_reports_startup_and_status() -> None:
    result = run_ledger_bench(300, statuses=1)
    assert set(result) == {"ledger_entries", "ledger_verify_s_300", "startup_s_new",
                           "startup_s_300", "status_s_300", "status_client_s_300"}
    assert all(math.isfinite(v) and v >= 0 for v in result.values())
    assert result["ledger_entries"] >= 300
    with pytest.raises(ValueError):
        run_ledger_bench(5)


def test_cli_start_is_the_cpu_of_a_child_process() -> None:
    seconds = cli_start_seconds(runs=1)
    assert math.isfinite(seconds) and seconds > 0
    # a failing command is measured too (no daemon to ask: a client's cost)
    assert child_cpu_seconds(["status", "--home", "/nonexistent/p2pfed-home"]) > 0
    with pytest.raises(ValueError):
        cli_start_seconds(runs=0)


def test_the_federation_bench_removes_the_homes_it_made(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    import tempfile

    from p2pfed import bench_fed

    made: list[Path] = []

    def measure(dim: int, rounds: int, base: Path, timeout_s: float) -> dict[str, float]:
        base.mkdir(parents=True)
        (base / "ledger.sqlite3").write_bytes(b"x" * 1000)  # as a daemon's home would
        made.append(base)
        return {"round_s": 0.1, "round_cpu_s": 0.2, "rounds": float(rounds)}

    monkeypatch.setattr(bench_fed, "measure", measure)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = bench_fed.run_federation_bench(quick=True)
    assert out["round_s_10k"] == 0.1 and made and not made[0].parent.exists()
    kept = tmp_path / "mine"
    bench_fed.run_federation_bench(quick=True, base=kept)
    assert (kept / "10k" / "ledger.sqlite3").exists()  # a folder the user named stays

    def fails(dim: int, rounds: int, base: Path, timeout_s: float) -> dict[str, float]:
        measure(dim, rounds, base, timeout_s)
        raise RuntimeError("a daemon did not start")

    monkeypatch.setattr(bench_fed, "measure", fails)
    with pytest.raises(RuntimeError):
        bench_fed.run_federation_bench(quick=True)
    assert not made[-1].parent.exists()
