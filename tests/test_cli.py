"""The command line, called in-process through main(argv) -> exit code."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from p2pfed import exitcodes
from p2pfed.cli import main

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def test_simulate_writes_report_plot_and_ledgers(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    plot = tmp_path / "r.png"
    code = main(["simulate", str(TOPOLOGIES / "complete-8.toml"), "--rounds", "3", "--seed", "2",
                 "--json", str(out), "--plot", str(plot), "--home", str(tmp_path / "h"), "-q"])
    assert code == exitcodes.OK
    report = json.loads(out.read_text())
    assert report["topology"] == "complete-8" and report["nodes"] == 8 and report["rounds"] == 3
    assert set(report["components"]) == {"backbone", "head.grade"}
    for key in ("holders", "slem", "consensus_distance", "rounds_to_1e-6",
                "bound_rounds_to_1e-6", "mean_drift"):
        assert key in report["components"]["backbone"]
    assert isinstance(report["wall_s"], float)
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "complete-8" in capsys.readouterr().out
    home = tmp_path / "h" / "node-0"
    assert main(["ledger", "verify", "--home", str(home)]) == exitcodes.OK
    conn = sqlite3.connect(home / "ledger.sqlite3")
    conn.execute("DELETE FROM entries WHERE idx=2")
    conn.commit()
    conn.close()
    capsys.readouterr()
    assert main(["ledger", "verify", "--home", str(home), "--json"]) == exitcodes.LEDGER_BROKEN
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["first_bad_index"] == 2


def test_home_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main(["simulate", str(TOPOLOGIES / "complete-8.toml"), "--rounds", "1",
          "--home", str(tmp_path), "-q"])
    monkeypatch.setenv("P2PFED_HOME", str(tmp_path / "node-1"))
    assert main(["ledger", "verify"]) == exitcodes.OK


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["simulate", "nope.toml"], exitcodes.CONFIG),
        (["simulate", str(TOPOLOGIES / "ring-16.toml"), "--rounds", "0"], exitcodes.USAGE),
        (["simulate", str(TOPOLOGIES / "ring-16.toml"), "--workload", "x"], exitcodes.USAGE),
        (["simulate", str(TOPOLOGIES / "hierarchical-edu.toml"), "--workload", "education",
          "--text-model", "/nonexistent/model"], exitcodes.USAGE),
        (["simulate", str(TOPOLOGIES / "ring-16.toml"), "--text-model", "minilm"],
         exitcodes.USAGE),
        (["simulate"], exitcodes.USAGE),
        (["frobnicate"], exitcodes.USAGE),
        (["--log-level", "loud", "bench"], exitcodes.USAGE),
    ],
)
def test_bad_arguments_give_clear_errors(argv: list[str], code: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    assert capsys.readouterr().err.strip()


def test_ledger_verify_without_ledger(tmp_path: Path) -> None:
    assert main(["ledger", "verify", "--home", str(tmp_path)]) == exitcodes.CONFIG


def test_unsafe_key_is_refused_by_verify(tmp_path: Path) -> None:
    main(["simulate", str(TOPOLOGIES / "complete-8.toml"), "--rounds", "1",
          "--home", str(tmp_path), "-q"])
    (tmp_path / "node-0" / "identity.key").chmod(0o644)
    assert main(["ledger", "verify", "--home", str(tmp_path / "node-0")]) == exitcodes.KEY_FILE


@pytest.mark.network
def test_bench_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == exitcodes.OK
    data = json.loads(out.read_text())
    for key in ("memcpy_gbps", "mix_gbps", "encode_gbps", "decode_gbps", "digest_gbps",
                "sign_per_s", "verify_per_s", "payload_stream_mbps", "raw_tcp_mbps",
                "cli_start_s"):
        assert data[key] > 0


def test_simulate_unlearn_reports_and_every_ledger_passes_the_audit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "u.json"
    code = main(["simulate", str(TOPOLOGIES / "ring-16.toml"), "--rounds", "12",
                 "--unlearn", "node-3@6", "--json", str(out), "--home", str(tmp_path / "h"),
                 "-q"])
    assert code == exitcodes.OK
    u = json.loads(out.read_text())["unlearning"]
    assert u["mode"] == "exact" and u["max_abs_diff_vs_retrain"] <= 1e-6
    assert "unlearning node-3 after round 6" in capsys.readouterr().out
    assert main(["ledger", "verify", "--home", str(tmp_path / "h" / "node-4")]) == exitcodes.OK
    assert "1 member(s) forgotten" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "code"), [
    (["--unlearn", "node-3"], exitcodes.USAGE),
    (["--unlearn", "node-3@0"], exitcodes.USAGE),
    (["--unlearn", "node-3@2", "--mode", "sideways"], exitcodes.USAGE),
    (["--unlearn", "ghost@2"], exitcodes.CONFIG),
    (["--unlearn", "node-3@99"], exitcodes.CONFIG),
])
def test_simulate_unlearn_refuses_bad_arguments(args: list[str], code: int) -> None:
    assert main(["simulate", str(TOPOLOGIES / "ring-16.toml"), "--rounds", "5", "-q",
                 *args]) == code


def test_unlearn_without_a_daemon_says_so(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unlearn", "12D3KooWx", "--home", str(tmp_path)]) != exitcodes.OK
    assert "no daemon is running" in capsys.readouterr().err
    assert main(["unlearn", "12D3KooWx", "--mode", "slow", "--home",
                 str(tmp_path)]) == exitcodes.USAGE


def test_storage_errors_have_their_exit_codes() -> None:
    from gossip.errors import LedgerIntegrityError, StorageError
    from p2pfed.home import DiskFullError, MissingStateError

    assert exitcodes.for_error(DiskFullError("full")) == exitcodes.STORAGE
    assert exitcodes.for_error(StorageError("unreadable")) == exitcodes.STORAGE
    assert exitcodes.for_error(MissingStateError("gone")) == exitcodes.STATE_MISSING
    assert exitcodes.for_error(LedgerIntegrityError(3, "edited")) == exitcodes.LEDGER_BROKEN
    codes = [exitcodes.OK, exitcodes.FAILURE, exitcodes.USAGE, exitcodes.CONFIG,
             exitcodes.KEY_FILE, exitcodes.LEDGER_BROKEN, exitcodes.STORAGE, exitcodes.REMOTE,
             exitcodes.STATE_MISSING, exitcodes.IN_USE, exitcodes.INTERRUPTED]
    assert len(set(codes)) == len(codes)


def test_other_os_errors_are_one_line_not_a_full_disk(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfed.runtime.daemon import Daemon

    home = tmp_path / "home"
    assert main(["init", "--home", str(home)]) == 0

    async def fails(_self: Daemon, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(home / "ledger.sqlite3"))

    monkeypatch.setattr(Daemon, "run", fails)
    capsys.readouterr()
    assert main(["run", "--home", str(home)]) == exitcodes.STORAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ledger.sqlite3: Permission denied" in lines[0]
    assert "full" not in lines[0]


def test_the_founders_round_interval_is_the_federations_period(tmp_path: Path) -> None:
    from p2pfed.fedstore import FederationStore

    for name, interval, extra, period in (("a", "1.5", [], 1500),
                                          ("b", "1.5", ["--round-period", "30"], 30_000),
                                          ("c", "0", [], 100)):  # (at least 0.1 s)
        home = tmp_path / name
        assert main(["init", "--home", str(home), "--interval", interval]) == 0
        assert main(["federation", "create", "net", "--home", str(home), *extra]) == 0
        assert FederationStore(home).genesis().round_period_ms == period


def test_simulate_with_a_storage_budget_reports_what_each_node_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["simulate", str(TOPOLOGIES / "ring-16.toml"), "--rounds", "30", "--dim", "1000",
                 "--storage", "5:1", "--json", str(out), "-q"]) == exitcodes.OK
    storage = json.loads(out.read_text())["storage"]
    assert 0 < storage["peak_bytes"] <= 1_000_000  # 1 MB a node, never exceeded
    for node in storage["final"].values():
        assert node["horizon_rounds"] == 5 and node["oldest_round"] == 25 and not node["full"]
    assert main(["simulate", str(TOPOLOGIES / "ring-16.toml"), "--storage", "5"]) == \
        exitcodes.USAGE
