"""Real daemons and the task catalogue: an admin's ``p2pfed task add`` makes a new head appear
and run on every holder (slow; marked network)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.runtime.localfed import LocalFederation, free_ports

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: nodes 0 (the founder, the admin) and 1 hold the text adapter, node 2 only the backbone
HOLDS = (("backbone", "encoder.text.lora"), ("backbone", "encoder.text.lora"), ("backbone",))


def setup(fed: LocalFederation) -> None:
    fed.ports = free_ports(fed.size)
    for i in range(fed.size):
        holds = [arg for c in HOLDS[i] for arg in ("--hold", c)]
        fed.cli("init", "--home", str(fed.home(i)), "--listen",
                f"/ip4/127.0.0.1/tcp/{fed.ports[i]}", *holds,
                "--interval", str(fed.interval_s), "--timeout", str(fed.timeout_s))
    fed.form("school", ["backbone", "encoder.text.lora"])


def round_of(st: dict[str, Any] | None, component: str) -> int:
    if st is None or component not in st["components"]:
        return -1
    return int(st["components"][component]["round"])


def test_a_task_added_by_the_admin_grows_a_head_on_every_holder(tmp_path: Path) -> None:
    fed = LocalFederation(3, tmp_path, interval_s=0.5, timeout_s=2.0)
    try:
        setup(fed)
        fed.wait_for(lambda: all(st is not None and st["members"] == 3
                                 and round_of(st, "backbone") >= 3 for st in fed.statuses()),
                     180, "3 daemons in step")
        fed.cli("task", "add", "essay", "--modality", "text", "--classes", "5",
                "--home", str(fed.home(0)))

        def grown() -> bool:
            sts = fed.statuses()
            if not all(st is not None and st["catalogue"]["version"] == 1 for st in sts):
                return False
            heads = [sts[i]["components"].get("head.essay") for i in (0, 1)]  # type: ignore[index]
            return all(h is not None and h["round"] >= 3 and h["consensus_distance"]
                       and h["neighbours"] == [sts[1 - i]["peer_id"]]  # type: ignore[index]
                       for i, h in enumerate(heads))  # (mixed with the other holder)

        fed.wait_for(grown, 180, "head.essay on both holders, its rounds going on")
        third = fed.status(2)
        assert third is not None and "head.essay" not in third["components"]
        assert third["catalogue"]["tasks"]["essay"]["phase"] == "active"

        refused = subprocess.run(
            [sys.executable, "-m", "p2pfed", "task", "add", "quiz", "--modality", "text",
             "--classes", "4", "--home", str(fed.home(1))],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        assert refused.returncode == exitcodes.REMOTE
        assert "not an admin" in refused.stderr

        before = round_of(fed.status(1), "head.essay")
        assert fed.kill(1) == -signal.SIGKILL  # mid-round: its rounds run every half second
        fed.start(1)
        fed.wait_for(lambda: round_of(fed.status(1), "head.essay") >= before + 2, 180,
                     "node-1 back, with head.essay going on")
        st = fed.status(1)
        assert st is not None and st["catalogue"]["version"] == 1
        assert sorted(st["components"]) == ["backbone", "encoder.text.lora", "head.essay"]
        assert st["ledger_ok"]
    finally:
        codes = fed.stop_all()
    assert codes == {0: 0, 1: 0, 2: 0}
    for i in range(3):
        assert main(["ledger", "verify", "--home", str(fed.home(i))]) == 0
