"""Real daemons as separate processes on 127.0.0.1 (slow; marked network)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from gossip.errors import LocalError
from p2pfed.cli import main
from p2pfed.runtime.localfed import COMPONENT, LocalFederation, run_local_federation

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_local_federation_of_four(tmp_path: Path) -> None:
    summary = run_local_federation(4, 3, tmp_path / "fed", timeout_s=240)
    assert summary["exit_codes"] == [0, 0, 0, 0]
    assert len({n["peer_id"] for n in summary["nodes"]}) == 4
    for node in summary["nodes"]:
        assert node["rounds_completed"] >= 3 and node["peers"] >= 1 and node["ledger_ok"]
        dist = node["consensus_distance"]
        assert len(dist) >= 3 and dist[-1] < dist[0]


def test_sigkill_mid_round_then_restart_rejoins_and_catches_up(tmp_path: Path) -> None:
    fed = LocalFederation(4, tmp_path, interval_s=0.5, timeout_s=2.0)

    def rounds(i: int) -> int:
        st = fed.status(i)
        return -1 if st is None else int(st["components"][COMPONENT]["round"])

    try:
        fed.setup()
        fed.wait_for(lambda: all(rounds(i) >= 3 for i in range(4)), 120, "4 daemons in step")
        assert fed.kill(3) == -signal.SIGKILL
        at_kill = {i: rounds(i) for i in range(3)}
        fed.wait_for(lambda: all(rounds(i) >= at_kill[i] + 4 for i in range(3)), 90,
                     "the other three to go on without node-3")
        fed.start(3)
        fed.wait_for(lambda: (st := fed.status(3)) is not None and st["peers"] >= 1
                     and st["member"] and st["rounds_completed"] >= 2, 120,
                     "node-3 to rejoin and mix again")
        assert rounds(3) >= max(at_kill.values()) + 4  # it caught up with the others
        status = fed.status(3)
        assert status is not None and status["ledger_ok"]
    finally:
        codes = fed.stop_all()
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}
    for i in range(4):
        assert main(["ledger", "verify", "--home", str(fed.home(i))]) == 0


def test_unlearn_between_real_daemons_and_every_ledger_verifies(tmp_path: Path) -> None:
    fed = LocalFederation(4, tmp_path, interval_s=0.5, timeout_s=2.0)
    try:
        fed.setup()

        def rounds(i: int) -> int:
            st = fed.status(i)
            return -1 if st is None else int(st["components"][COMPONENT]["round"])

        fed.wait_for(lambda: all(rounds(i) >= 4 for i in range(4)), 120, "4 daemons in step")
        st3 = fed.status(3)
        assert st3 is not None
        target = st3["peer_id"]
        # a member that is not an admin may not ask to forget another one
        with pytest.raises(LocalError, match="only the member itself or an admin"):
            fed.cli("unlearn", target, "--home", str(fed.home(1)))
        # the admin (node-0 created the federation) asks; everyone rolls back and re-runs
        fed.cli("unlearn", target, "--mode", "exact", "--reason", "test",
                "--home", str(fed.home(0)))

        def done(i: int) -> bool:
            st = fed.status(i)
            return st is not None and [u["done"] for u in st["unlearning"]] == [True]

        fed.wait_for(lambda: all(done(i) for i in range(3)), 180, "the unlearning to finish")
        for i in range(3):
            st = fed.status(i)
            assert st is not None
            assert target not in st["components"][COMPONENT]["neighbours"]
            (u,) = st["unlearning"]
            assert u["target"] == target and u["rolled_back"] == [COMPONENT]
        fed.wait_for(lambda: all(rounds(i) >= 1 for i in range(3)), 30, "rounds to go on")
    finally:
        codes = fed.stop_all()
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}
    for i in range(4):
        assert main(["ledger", "verify", "--home", str(fed.home(i))]) == 0
