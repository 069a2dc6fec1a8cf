"""The hardware study (``simulate --profile GROUP:PROFILE``): members on slow hardware that
train only part of what they hold, beside the same federation where everyone is a server.

A profiled node trains what its profile allows (:mod:`p2pfed.profiles`: a phone, heads and
prompts only) and its training takes :data:`~p2pfed.sim.config.SLOWDOWN` times ``train_s``
simulated seconds (a phone: five times a server's).  Rounds run freely and are paced as a
daemon paces them (a round starts at most every ``round_interval_s``, twice the training time
by default), and a node waits for a neighbour's state at most ``round_timeout_ms`` after
publishing its own: the round timeout is what keeps a slow member from stalling the others.

The report's ``hardware`` section gives, per group of nodes (the topology's groups), the pace
in rounds per simulated minute of each node's furthest component and of its slowest one (a
component shared with a slow member waits for it; the furthest may not), each task's accuracy
per group, and how often the profiled members' states made it into their neighbours' mixes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from p2pfed.sim.config import SLOWDOWN, SimConfig
from p2pfed.sim.report import PhaseProgress
from p2pfed.sim.simulation import Simulation


def _rate(done: int, first: float, last: float) -> float | None:
    """Rounds completed after the first, per simulated minute since the first."""
    return (done - 1) / ((last - first) / 60.0) if last > first else None


def paces(sim: Simulation) -> dict[str, dict[str, float | None]]:
    """Per node: the pace of its furthest component and of its slowest one."""
    out: dict[str, dict[str, float | None]] = {}
    for name in sim.topo.nodes:
        furthest = None
        if name in sim.completed:
            done, last = sim.completed[name]
            furthest = _rate(done, sim.first_completed[name], last)
        rates = [r for (n, _), (done, first, last) in sim.component_pace.items() if n == name
                 for r in [_rate(done, first, last)] if r is not None]
        out[name] = {"furthest": furthest, "slowest": min(rates) if rates else None}
    return out


def _by_group(sim: Simulation, values: dict[str, float | None]) -> dict[str, float | None]:
    groups: dict[str, list[float]] = {}
    for name, value in values.items():
        if value is not None:
            groups.setdefault(sim.topo.groups.get(name) or "nodes", []).append(value)
    return {g: float(np.mean(v)) for g, v in sorted(groups.items())}


def _summary(sim: Simulation, profiled: set[str]) -> dict[str, Any]:
    pace = paces(sim)
    heard = [sim.heard.get((n, p), [0, 0]) for p in profiled for n in sim.topo.graph[p]
             if n not in profiled]
    mixed, missed = sum(h[0] for h in heard), sum(h[1] for h in heard)
    out: dict[str, Any] = {
        "rounds_per_min": _by_group(sim, {n: p["furthest"] for n, p in pace.items()}),
        "rounds_per_min_slowest_component": _by_group(
            sim, {n: p["slowest"] for n, p in pace.items()}),
        "profiled_states_mixed": mixed / (mixed + missed) if mixed + missed else None,
    }
    if sim.edu is not None:
        per_node = sim.edu.per_node_accuracy(sim.final_trainers())
        out["accuracy"] = {t: _by_group(sim, dict(accs)) for t, accs in per_node.items()}
    return out


def profile_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The run with the profiles, and the run where every node is a server (trains all it
    holds at a server's speed)."""
    train_s = config.train_s or 1.0
    config = dataclasses.replace(config, baselines=False, train_s=train_s, lockstep=False,
                                 round_interval_s=config.round_interval_s or 2.0 * train_s)
    sim = Simulation(config, on_phase=on_phase, curve=False)  # (a curve would pause everyone)
    report = sim.run()
    servers = Simulation(dataclasses.replace(config, profiles={}, progress=None, home=None,
                                             explain=0), edu=sim.edu, curve=False)
    servers.run()
    profiled = set(config.profiles)
    trained: dict[str, set[str]] = {}
    for name in profiled:
        trainer = sim.trainers.get(name)
        trained[name] = set(trainer.trainable()) if trainer is not None else set()
    report["hardware"] = {
        "profiles": dict(sorted(config.profiles.items())),
        "slowdown": {p: SLOWDOWN[p] for p in sorted(set(config.profiles.values()))},
        "train_s": config.train_s, "round_interval_s": config.round_interval_s,
        "round_timeout_s": config.round_timeout_ms / 1000,
        "trained": {n: sorted(c) for n, c in sorted(trained.items())},
        "with_profiles": _summary(sim, profiled),
        "everyone_server": _summary(servers, profiled),
    }
    return report
