"""The simulation's report: what each round's states say about consensus, and the plot of it.

A :class:`~p2pfed.sim.trace.Trace` keeps each round's figures (the states only until the round
is settled); :func:`build_report` turns them into the JSON-friendly report: per component the
consensus distance per round (relative to the spread of the starting states), the rounds to
reach :data:`EPSILON` and the spectral bound on them, and how far the mean drifted, plus the
network counters, rejected messages and privacy spending per node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
from p2pfed.sim import groups
from p2pfed.sim.config import SimConfig
from p2pfed.sim.education import EducationWorkload
from p2pfed.sim.topology import Topology
from p2pfed.sim.trace import Trace

EPSILON = 1e-6

#: ``on_phase(phase, done, total)``: a phase of a run (its name, steps done of ``total``)
PhaseProgress = Callable[[str, int, int], None]


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
                baselines: bool, federated_curve: list[dict[str, float]] | None = None,
                on_phase: PhaseProgress | None = None) -> dict[str, Any]:
    """Education: test accuracy per task of ``trainers``, and the baselines if asked for.

    ``federated_curve``: the holders' mean accuracy per task after each of the settings'
    curve rounds (what the simulation measured); with it each task gains ``curve_rounds`` and
    ``federated_curve``, and with the baselines ``local_only_curve`` and
    ``centralized_curve``: what :func:`plot_report` draws.  ``on_phase(phase, done, total)``
    hears of each baseline round.
    """
    per_node = edu.per_node_accuracy(trainers)
    tasks = {
        t: {"federated": float(np.mean(list(accs.values()))),
            "holders": len(topo.holders[f"head.{t}"]),
            "federated_per_node": accs}
        for t, accs in per_node.items()
    }
    if federated_curve is not None:
        for t, row in tasks.items():
            row["curve_rounds"] = edu.settings.curve_rounds()
            row["federated_curve"] = [acc[t] for acc in federated_curve]
    if baselines:
        local = edu.local_only(_phase(on_phase, "local-only baseline: rounds"))
        central = edu.centralized(_phase(on_phase, "centralized baseline: rounds"))
        for t, row in tasks.items():
            row.update(local_only=local[-1][t], centralized=central[-1][t],
                       local_only_curve=[acc[t] for acc in local],
                       centralized_curve=[acc[t] for acc in central])
    return tasks


def fairness_report(edu: EducationWorkload, trainers: dict[str, LocalTrainer],
                    config: SimConfig) -> dict[str, Any]:
    """The group study: per task the measures (:func:`p2pfed.model.fairness.summary`) of the
    federated members and, when they were trained, of the local-only and centralized
    baselines; the region where the minority is common and each group's training share."""
    runs = {"federated": edu.fairness(trainers)}
    for name, baseline in sorted(edu.baseline_trainers.items()):
        runs[name] = edu.fairness(baseline)
    return {
        "objective": config.fairness, "tilt": config.tilt,
        "region": sorted(groups.region(edu.topo, edu.seed)),
        "population": {t: {groups.GROUPS[g]: share for g, share in p.items()}
                       for t, p in edu.population.items()},
        "tasks": {t: {name: run[t] for name, run in runs.items()} for t in runs["federated"]},
    }


def _phase(on_phase: PhaseProgress | None, name: str) -> Callable[[int, int], None] | None:
    if on_phase is None:
        return None
    return lambda done, total: on_phase(name, done, total)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """The report as a PNG: for the education workload the test accuracy per round of each
    task (federated, local only, centralized); otherwise the consensus distance per component
    per round, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report.get("tasks", {})
    if any("federated_curve" in t for t in tasks.values()):
        fig = _plot_accuracy(plt, report)
    else:
        fig = _plot_consensus(plt, report)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: the line styles of components whose holders mix alike (same holders, same SLEM): their
#: curves lie on each other, so each gets its own dash pattern and marker
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def consensus_groups(components: Mapping[str, Any]) -> list[list[str]]:
    """The components grouped by how their holders mix (the number of holders and the SLEM,
    which the same holder graph gives alike), in report order."""
    groups: dict[tuple[int, float], list[str]] = {}
    for name, data in components.items():
        groups.setdefault((data["holders"], round(data["slem"], 12)), []).append(name)
    return list(groups.values())


def _plot_consensus(plt: Any, report: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    components = report["components"]
    for g, names in enumerate(consensus_groups(components)):
        color = f"C{g % 10}"
        for k, comp in enumerate(names):
            data = components[comp]
            ys = [max(d, 1e-17) for d in data["consensus_distance"]]
            line, marker = _STYLES[k % len(_STYLES)]
            ax.semilogy(range(1, len(ys) + 1), ys, color=color, linestyle=line, marker=marker,
                        markersize=3, markevery=(k * 3, max(len(ys) // 8, 1)),
                        label=f"{comp} ({data['holders']} holders)")
        first = components[names[0]]
        bound = first.get("bound_rounds_to_1e-6")
        if bound is not None and math.isfinite(bound) and bound <= len(first["consensus_distance"]):
            ax.axvline(bound, linestyle=(0, (1, 3)), linewidth=0.9, color=color,
                       label=f"bound: {bound} rounds to {EPSILON:g} "
                             f"(SLEM {first['slem']:.3f}, {first['holders']} holders)")
    ax.axhline(EPSILON, color="grey", linewidth=0.6, label=f"target {EPSILON:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (relative)")
    ax.set_title(f"{report['topology']} — {report['nodes']} nodes, seed {report['seed']}")
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # (beside the plot)
    return fig


#: the education plot's curves: report key, legend label, line style
_CURVES = (("federated_curve", "federated", "-"),
           ("local_only_curve", "local only", "--"),
           ("centralized_curve", "centralized (pooled data)", ":"))


def _plot_accuracy(plt: Any, report: dict[str, Any]) -> Any:
    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.0 * len(tasks), 3.6), dpi=120,
                             squeeze=False, sharey=True)
    for ax, (task, row) in zip(axes[0], tasks.items(), strict=True):
        for key, label, style in _CURVES:
            ys = row.get(key)
            if ys:
                ax.plot(row["curve_rounds"], ys, linestyle=style, marker=".", label=label)
        ax.set_title(f"{task} ({row['holders']} holders)")
        ax.set_xlabel("round")
        ax.set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel("test accuracy (mean over holders)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['topology']} — {report['nodes']} nodes, seed {report['seed']}")
    return fig
