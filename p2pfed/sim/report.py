"""The simulation's report: what each round's states say about consensus, and the plot of it.

A :class:`~p2pfed.sim.trace.Trace` keeps each round's figures (the states only until the round
is settled); :func:`build_report` turns them into the JSON-friendly report: per component the
consensus distance per round (relative to the spread of the starting states), the rounds to
reach :data:`EPSILON` and the spectral bound on them, and how far the mean drifted, plus the
network counters, rejected messages and privacy spending per node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from gossip.transport.memory import MemoryNetwork
from p2pfed.consensus import (
    metropolis_hastings_weights,
    rounds_to_epsilon_bound,
    slem,
    weight_matrix,
)
from p2pfed.model.train import LocalTrainer
from p2pfed.node import Node, status_of
from p2pfed.sim.config import SimConfig
from p2pfed.sim.education import EducationWorkload
from p2pfed.sim.topology import Topology
from p2pfed.sim.trace import Trace

EPSILON = 1e-6


def build_report(config: SimConfig, trace: Trace, *, absent: set[str], network: MemoryNetwork,
                 nodes: Mapping[str, Node], noisy: list[str], wall_s: float,
                 storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of a finished run; ``absent``: the nodes left out at the start;
    ``storage``: what the nodes kept, with a retention policy."""
    topo = config.topology
    comps: dict[str, Any] = {}
    for comp, holders in sorted(topo.holders.items()):
        initial_holders = [h for h in holders if h not in absent]
        comps[comp] = component_report(topo.graph, trace, comp, initial_holders, config.rounds)
    stats = network.stats
    status = {name: status_of(node) for name, node in nodes.items()}
    return {
        "topology": topo.name,
        "workload": config.workload,
        "nodes": len(topo.nodes),
        "rounds": config.rounds,
        "seed": config.seed,
        "wall_s": wall_s,
        "components": comps,
        "network": {
            "messages": stats.messages,
            "message_bytes": stats.message_bytes,
            "fetches": stats.fetches,
            "fetch_bytes": stats.fetch_bytes,
            "dropped": stats.dropped,
        },
        "rejected": {name: st["rejected"] for name, st in status.items() if st["rejected"]},
        **({"noisy": noisy} if noisy else {}),
        **({"storage": storage} if storage is not None else {}),
        "privacy": {
            name: {c: p for c, cs in status[name]["components"].items()
                   if (p := cs["privacy"]) is not None}
            for name, node in nodes.items() if node.config.privacy
        },
    }


def component_report(graph: nx.Graph, trace: Trace, comp: str, holders: list[str],
                     rounds: int) -> dict[str, Any]:
    """Consensus of ``comp`` among ``holders`` over the first ``rounds`` rounds of ``trace``."""
    sub = graph.subgraph(holders)
    weights = metropolis_hastings_weights(sub, holders)
    lam = slem(weight_matrix(weights, holders))
    distances: list[float] = []
    drift = 0.0
    figures = trace.figures(comp)
    for r in range(rounds):
        fig = figures.get(r)
        if fig is None:
            break
        distances.append(fig.distance)
        if r == rounds - 1 or r + 1 not in figures:
            drift = fig.drift
    reached = next((i + 1 for i, d in enumerate(distances) if d <= EPSILON), None)
    bound = rounds_to_epsilon_bound(lam, EPSILON)
    return {
        "holders": len(holders),
        "slem": lam,
        "consensus_distance": distances,
        "rounds_to_1e-6": reached,
        "bound_rounds_to_1e-6": bound,
        "mean_drift": drift,
    }


def task_report(edu: EducationWorkload, topo: Topology, trainers: dict[str, LocalTrainer],
                baselines: bool) -> dict[str, Any]:
    """Education: test accuracy per task of ``trainers``, and the baselines if asked for."""
    per_node = edu.per_node_accuracy(trainers)
    tasks = {
        t: {"federated": float(np.mean(list(accs.values()))),
            "holders": len(topo.holders[f"head.{t}"]),
            "federated_per_node": accs}
        for t, accs in per_node.items()
    }
    if baselines:
        local = edu.local_only()
        central = edu.centralized()
        for t, row in tasks.items():
            row.update(local_only=local[t], centralized=central[t])
    return tasks


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Consensus distance per component per round, on a log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for comp, data in report["components"].items():
        ys = [max(d, 1e-17) for d in data["consensus_distance"]]
        ax.semilogy(range(1, len(ys) + 1), ys, label=f"{comp} ({data['holders']} holders)")
        bound = data.get("bound_rounds_to_1e-6")
        if bound is not None and bound <= len(ys) and math.isfinite(bound):
            ax.axvline(bound, linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
    ax.axhline(EPSILON, color="grey", linewidth=0.6)
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (relative)")
    ax.set_title(f"{report['topology']} — {report['nodes']} nodes, seed {report['seed']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
