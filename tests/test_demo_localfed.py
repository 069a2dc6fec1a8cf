"""`local-federation`'s homes: removed after a clean run unless kept; a given --base never.

The daemons are stood in for (no processes): what is tested is what happens to the folder and
what the summary says, not the daemons (tests/test_integration.py runs real ones).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from gossip.errors import LocalError
from p2pfed.runtime import localfed
from p2pfed.runtime.localfed import COMPONENT, LocalFederation, run_local_federation


def _status(i: int, mixed: int) -> dict[str, Any]:
    return {"peer_id": f"12D3KooW{i}", "rounds_completed": mixed + 10 * i, "peers": 3,
            "ledger_ok": True, "components": {COMPONENT: {"consensus_distance": [1.0] * mixed}}}


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """LocalFederation with set-up writing each home's daemon.log and nodes that have mixed
    1, then 3 rounds; temporary folders under tmp_path/tmp."""
    state: dict[str, Any] = {"asked": 0, "exit": 0, "fail": False}
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def setup(self: LocalFederation) -> None:
        for i in range(self.size):
            self.home(i).mkdir(parents=True)
            (self.home(i) / "daemon.log").write_text("started\n")
        if state["fail"]:
            raise LocalError("node-1 exited with 1")

    def statuses(self: LocalFederation, which: list[int] | None = None) -> list[Any]:
        state["asked"] += 1
        mixed = 1 if state["asked"] == 1 else 3
        return [_status(i, mixed) for i in range(self.size)]

    def stop_all(self: LocalFederation) -> dict[int, int]:
        return {i: state["exit"] for i in range(self.size)}

    monkeypatch.setattr(LocalFederation, "setup", setup)
    monkeypatch.setattr(LocalFederation, "statuses", statuses)
    monkeypatch.setattr(LocalFederation, "stop_all", stop_all)
    monkeypatch.setattr(localfed.time, "sleep", lambda _s: None)
    return state


def test_a_clean_run_removes_its_temporary_homes(tmp_path: Path,
                                                 stand_ins: dict[str, Any]) -> None:
    steps: list[str] = []
    summary = run_local_federation(3, 3, on_step=steps.append)
    assert summary["base_removed"] and not Path(summary["base"]).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [n["rounds_since_membership_change"] for n in summary["nodes"]] == [3, 3, 3]
    assert [n["rounds_completed"] for n in summary["nodes"]] == [3, 13, 23]  # as they said
    assert any("1 of 3 rounds" in s for s in steps) and any("3 of 3 rounds" in s for s in steps)


def test_keep_keeps_the_temporary_homes(stand_ins: dict[str, Any]) -> None:
    summary = run_local_federation(3, 3, keep=True)
    base = Path(summary["base"])
    assert not summary["base_removed"] and (base / "node-2" / "daemon.log").exists()


def test_a_given_base_is_never_removed(tmp_path: Path, stand_ins: dict[str, Any]) -> None:
    summary = run_local_federation(2, 3, tmp_path / "mine")
    assert not summary["base_removed"] and (tmp_path / "mine" / "node-1").is_dir()


@pytest.mark.parametrize("failure", ["set-up", "unclean stop"])
def test_after_a_failure_the_homes_stay_for_their_logs(
        failure: str, tmp_path: Path, stand_ins: dict[str, Any]) -> None:
    if failure == "set-up":
        stand_ins["fail"] = True
        with pytest.raises(LocalError):
            run_local_federation(2, 3)
        (base,) = (tmp_path / "tmp").iterdir()
    else:
        stand_ins["exit"] = 1
        summary = run_local_federation(2, 3)
        assert not summary["base_removed"]
        base = Path(summary["base"])
    assert (base / "node-0" / "daemon.log").exists()


def test_the_command_says_where_the_homes_went(
        tmp_path: Path, stand_ins: dict[str, Any], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfed.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["local-federation", "--nodes", "2", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "homes removed" in out and "rounds mixed" in out and "since last join" in out
    assert list((tmp_path / "tmp").iterdir()) == []
    assert main(["local-federation", "--nodes", "2", "--keep"]) == 0
    assert "homes kept in" in capsys.readouterr().out
    assert len(list((tmp_path / "tmp").iterdir())) == 1
