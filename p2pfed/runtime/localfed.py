"""``p2pfed local-federation``: N real daemons on 127.0.0.1, set up with the real CLI.

Every step is what an operator would type — ``init``, ``federation create``, ``invite``,
``join``, ``run``, ``status --json`` — each daemon a separate process with its own home.  Used
by ``make demo`` and by the integration tests (which also kill and restart daemons).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from p2pfed.config import Config

log = logging.getLogger(__name__)

COMPONENT = "backbone"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalFederation:
    """A handful of daemons on loopback, each in ``base/node-<i>``."""

    size: int
    base: Path
    interval_s: float = 1.0
    timeout_s: float = 4.0
    #: parameters of the component (None: the config's default)
    dim: int | None = None
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)

    def home(self, i: int) -> Path:
        return self.base / f"node-{i}"

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        cmd = [sys.executable, "-m", "p2pfed", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise LocalError(f"{' '.join(args[:2])} failed ({done.returncode}): "
                             f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def setup(self) -> None:
        self.ports = free_ports(self.size)
        for i in range(self.size):
            self.cli("init", "--home", str(self.home(i)),
                     "--listen", f"/ip4/127.0.0.1/tcp/{self.ports[i]}", "--hold", COMPONENT,
                     "--interval", str(self.interval_s), "--timeout", str(self.timeout_s))
            if self.dim is not None:
                path = self.home(i) / "p2pfed.toml"
                config = Config.from_toml(path).with_overrides(components__dim=self.dim)
                path.write_text(config.to_toml())
        self.form("local")

    def form(self, name: str, components: Sequence[str] = ()) -> None:
        """Node 0 (initialised) founds federation ``name`` (with ``components``; default: the
        ones it holds) and starts; each other node joins with an invite of its own and
        starts."""
        extra = [arg for c in components for arg in ("--component", c)]
        self.cli("federation", "create", name, "--home", str(self.home(0)), *extra,
                 "--round-period", str(self.interval_s))
        self.start(0)
        self.wait_for(lambda: self.status(0) is not None, 60, "node-0 to answer")
        for i in range(1, self.size):
            token = self.cli("invite", "--home", str(self.home(0))).strip()
            self.cli("join", token, "--home", str(self.home(i)))
            self.start(i)

    def start(self, i: int) -> None:
        log_path = self.home(i) / "daemon.log"
        with open(log_path, "ab") as logf:
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-m", "p2pfed", "--log-level", "info", "run",
                 "--home", str(self.home(i))],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def status(self, i: int) -> dict[str, Any] | None:
        return self.statuses([i])[0]

    def statuses(self, which: list[int] | None = None) -> list[dict[str, Any] | None]:
        """The status of each node in ``which`` (default: all), asked of all of them at once
        (None: exited, or not answering)."""
        asked: list[subprocess.Popen[str] | None] = []
        for i in range(self.size) if which is None else which:
            if i in self.procs and self.procs[i].poll() is not None:
                asked.append(None)
                continue
            asked.append(subprocess.Popen(
                [sys.executable, "-m", "p2pfed", "status", "--json", "--home", str(self.home(i))],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                text=True))
        results: list[dict[str, Any] | None] = []
        for proc in asked:
            if proc is None:
                results.append(None)
                continue
            try:
                stdout, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                results.append(None)
                continue
            results.append(json.loads(stdout) if proc.returncode == 0 else None)
        return results

    def wait_for(self, cond: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return
            for i, p in self.procs.items():
                if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL):
                    raise LocalError(f"node-{i} exited with {p.returncode}; see "
                                     f"{self.home(i) / 'daemon.log'}")
            time.sleep(0.5)
        raise LocalError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def kill(self, i: int, sig: int = signal.SIGKILL) -> int:
        proc = self.procs[i]
        proc.send_signal(sig)
        return proc.wait(timeout=60)

    def stop_all(self) -> dict[int, int]:
        codes = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for i, proc in self.procs.items():
            try:
                codes[i] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[i] = proc.wait()
        return codes


def node_summary(st: dict[str, Any]) -> dict[str, Any]:
    comp = st["components"].get(COMPONENT, {})
    return {
        "peer_id": st["peer_id"],
        "rounds_completed": st["rounds_completed"],
        "rounds_since_membership_change": len(comp.get("consensus_distance", [])),
        "peers": st["peers"],
        "ledger_ok": st["ledger_ok"],
        "consensus_distance": comp.get("consensus_distance", []),
    }


def run_local_federation(nodes: int, rounds: int, base: Path | None = None,
                         timeout_s: float = 240.0, *, keep: bool = False,
                         on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start ``nodes`` daemons, wait until every one has mixed ``rounds`` rounds since it last
    saw the membership change (the last join, as it learnt of it), stop them.

    The daemons mix on their own clock: while the others start and join, and while they are
    asked, they go on mixing, so each reports the rounds it really mixed
    (``rounds_completed``, since it started; ``rounds_since_membership_change``, the rounds of
    its consensus-distance history), at least ``rounds``.  The homes go in ``base``, never
    deleted; without it in a temporary folder that is removed once the daemons stopped
    cleanly, unless ``keep`` (after a failure it stays, for the daemons' logs).
    ``on_step(text)`` hears of each step.
    """
    if nodes < 2:
        raise LocalError("a federation needs at least 2 nodes")
    step = on_step or (lambda _text: None)
    start = time.monotonic()
    root = base or Path(tempfile.mkdtemp(prefix="p2pfed-local-"))
    fed = LocalFederation(nodes, root)
    statuses: dict[int, dict[str, Any]] = {}
    clean = False
    try:
        try:
            step(f"setting up {nodes} homes in {root} (init, federation create, invite, join)")
            fed.setup()
            setup_s = time.monotonic() - start
            step(f"{nodes} daemons started after {setup_s:.1f} s; waiting until each has mixed "
                 f"{rounds} rounds since it saw the last member join")

            shown = [-1]  # (the last count told)

            def enough() -> bool:
                for i, st in enumerate(fed.statuses()):
                    if st is None:
                        return False
                    statuses[i] = st
                least = min(min(len(s["components"][COMPONENT]["consensus_distance"]), rounds)
                            for s in statuses.values())
                if least != shown[0]:
                    shown[0] = least
                    step(f"every node has mixed {least} of {rounds} rounds since the last join "
                         f"({time.monotonic() - start:.0f} s)")
                return all(
                    s["rounds_completed"] >= rounds and s["peers"] >= 1
                    and len(s["components"][COMPONENT]["consensus_distance"]) >= rounds
                    for s in statuses.values()
                )

            fed.wait_for(enough, max(10.0, timeout_s - (time.monotonic() - start)),
                         f"{rounds} rounds on every node")
            wait_s = time.monotonic() - start - setup_s
        finally:
            step("stopping the daemons (SIGTERM)")
            codes = fed.stop_all()
        clean = all(code == 0 for code in codes.values())
    finally:
        removed = base is None and not keep and clean
        if removed:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "nodes": [node_summary(statuses[i]) for i in range(nodes)],
        "rounds": rounds,
        "exit_codes": [codes.get(i) for i in range(nodes)],
        "base": str(root),
        "base_removed": removed,
        "setup_s": setup_s,
        "wait_s": wait_s,
        "wall_s": time.monotonic() - start,
    }
