"""``p2pfed bench --federation``: the time and CPU of one round between real daemons.

Four daemons on 127.0.0.1 (:class:`~p2pfed.runtime.localfed.LocalFederation`: the real CLI,
real processes, libp2p) average one float32 component of 100,000 and of 10,000,000 parameters
with ``interval_s = 0.1`` (the smallest federation round period: rounds back to back).  Figures
come from the daemons' own ledgers, not from the outside: a round's time is the gap between a
node's consecutive ``mix`` entries (the median over rounds and nodes, the first rounds left
out as warm-up); its CPU is the daemons' user + system CPU over the measured rounds
(``/proc``), per round, summed over the four processes.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pfed import kinds
from p2pfed.ledger import read_entries
from p2pfed.runtime.localfed import COMPONENT, LocalFederation

NODES = 4
WARMUP = 3  # rounds left out at the start (connections, first fetches)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mix_times(home: Path) -> list[tuple[int, int]]:
    """(round, timestamp ms) of every mix of the component in a daemon's ledger."""
    return [(e.body["round"], e.timestamp_ms) for e in read_entries(home / "ledger.sqlite3")
            if e.kind == kinds.MIX and e.body.get("component") == COMPONENT]


def _rounds_done(fed: LocalFederation) -> int:
    done = []
    for i in range(fed.size):
        st = fed.status(i)
        done.append(0 if st is None else int(st["components"][COMPONENT]["round"]))
    return min(done)


def measure(dim: int, rounds: int, base: Path, timeout_s: float) -> dict[str, float]:
    """One federation of ``dim`` parameters: round seconds (median) and CPU per round."""
    # (interval 0.1 s: the smallest federation round period; rounds run back to back)
    fed = LocalFederation(NODES, base, interval_s=0.1, timeout_s=timeout_s, dim=dim)
    try:
        fed.setup()
        fed.wait_for(lambda: _rounds_done(fed) >= WARMUP, 300, "the warm-up rounds")
        cpu0 = {i: _cpu_s(p.pid) for i, p in fed.procs.items()}
        start = _rounds_done(fed)
        fed.wait_for(lambda: _rounds_done(fed) >= start + rounds, 600, f"{rounds} rounds")
        end = _rounds_done(fed)
        cpu = sum(_cpu_s(p.pid) - cpu0[i] for i, p in fed.procs.items())
    finally:
        fed.stop_all()
    gaps = []
    for i in range(NODES):
        times = dict(_mix_times(fed.home(i)))
        gaps += [(times[r] - times[r - 1]) / 1000 for r in range(start + 1, end + 1)
                 if r in times and r - 1 in times]
    return {"round_s": statistics.median(gaps), "round_cpu_s": cpu / max(1, end - start),
            "rounds": float(end - start)}


def run_federation_bench(quick: bool = False, base: Path | None = None) -> dict[str, Any]:
    """``round_s_100k``, ``round_s_10m``, ``round_cpu_s_10m`` (``quick``: 10,000 parameters
    and a few rounds, a smoke run)."""
    root = base or Path(tempfile.mkdtemp(prefix="p2pfed-bench-fed-"))
    started = time.monotonic()
    out: dict[str, Any] = {}
    sizes = {"10k": 10_000} if quick else {"100k": 100_000, "10m": 10_000_000}
    try:
        for name, dim in sizes.items():
            got = measure(dim, 3 if quick else 8, root / name,
                          20.0 if dim <= 100_000 else 60.0)
            out[f"round_s_{name}"] = got["round_s"]
            out[f"round_cpu_s_{name}"] = got["round_cpu_s"]
            out[f"rounds_{name}"] = got["rounds"]
    finally:
        if base is None:  # (the 10M homes hold about 9 GB of history: never leave them)
            shutil.rmtree(root, ignore_errors=True)
    out["federation_wall_s"] = time.monotonic() - started
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_federation_bench(quick="--quick" in sys.argv), indent=1))
