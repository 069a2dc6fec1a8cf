"""The simulator's entry point: :func:`simulate` runs a federation in one process and reports.

A plain run is one :class:`~p2pfed.sim.simulation.Simulation`.  Two settings make it a study
that compares two runs of the same seed and topology:

- ``unlearn``: the run that forgets a member against the run without it from the start (exact
  unlearning ends at the same numbers; the report says at what cost);
- ``attack``: the run with Byzantine members against the run with them left out (what the
  honest members reach together, the best a defence can give them);
- ``updates``: the consensus run with synthetic updates against one run without each member
  from the start (what exact unlearning gives) and one with its updates zero (``silent``): does
  a member's provenance share rank how far removing it, or only its updates, moves each node's
  state?

With ``explain`` the main run (never a comparison run) explains held-out predictions at its
end (:mod:`~p2pfed.sim.explain`).

The simulator's parts live in their own modules: :mod:`~p2pfed.sim.config` (what to run),
:mod:`~p2pfed.sim.nodes` (building the nodes), :mod:`~p2pfed.sim.simulation` (running them on
trio's MockClock), :mod:`~p2pfed.sim.report` (the report and its plot); their public names are
importable from here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from gossip.errors import ConfigError
from p2pfed.model.continual import Schedule
from p2pfed.sim.config import WORKLOADS, SimConfig
from p2pfed.sim.hardware import paces, profile_study
from p2pfed.sim.nodes import sim_federation_id, sim_identity
from p2pfed.sim.provenance import reported_shares, share_study, spearman
from p2pfed.sim.report import EPSILON, PhaseProgress, plot_report
from p2pfed.sim.simulation import Simulation

__all__ = [
    "EPSILON",
    "WORKLOADS",
    "PhaseProgress",
    "SimConfig",
    "Simulation",
    "plot_report",
    "sim_federation_id",
    "sim_identity",
    "simulate",
]


def simulate(config: SimConfig, on_phase: PhaseProgress | None = None) -> dict[str, Any]:
    """Run a simulation and return its JSON-friendly report.

    With ``config.unlearn`` the report gains ``unlearning``: the run that forgets the node is
    compared with the same federation run without it from the start.  ``on_phase(phase, done,
    total)`` hears of the phases that are not the run's rounds (``config.progress`` hears of
    those): loading the education data, the baselines.
    """
    report = _study(config, on_phase)
    if "explain" in report and "provenance_study" in report:
        report["explain"]["provenance_spearman"] = report["provenance_study"]["mean"]
    return report


def _study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The run, or the study the config asks for (only its main run explains predictions)."""
    if config.unlearn is not None:
        return _unlearning_study(config, on_phase)
    if config.participation:
        return _participation_study(config, on_phase)
    if config.profiles:
        return profile_study(config, on_phase)
    if config.continual is not None:
        return _continual_study(config, on_phase)
    if config.updates is not None:
        return _provenance_study(config, on_phase)
    if config.fairness != "erm" or config.lean:
        return _fairness_study(config, on_phase)
    if config.attack is not None:
        return _attack_study(config, on_phase)
    return Simulation(config, on_phase=on_phase).run()


def _continual_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The continual schedule with its method, and in the same run naive sequential training
    (no rehearsal, no penalty) and joint training (every task from round 0, none retired)."""
    assert config.continual is not None
    schedule, settings = config.continual
    config = dataclasses.replace(config, baselines=False)
    naive = dataclasses.replace(settings, method="naive", catch_up=1)
    label = settings.method if settings.catch_up == 1 else f"{settings.method}+catch-up"
    variants = {label: config}
    variants.setdefault("naive", dataclasses.replace(config, continual=(schedule, naive)))
    variants["joint"] = dataclasses.replace(config, continual=(schedule.joint(), naive))
    sims: dict[str, Simulation] = {}
    report: dict[str, Any] = {}
    for name, variant in variants.items():
        first = not sims
        sim = Simulation(variant if first else dataclasses.replace(variant, progress=None,
                                                                   home=None, explain=0),
                         edu=None if first else sims[label].edu,
                         on_phase=on_phase if first else None, curve=first)
        sim.phase_ends = {end for _, end in schedule.phases(config.rounds)}
        run = sim.run()
        if first:
            report = run
        sims[name] = sim
    runs = {name: continual_run(sim, schedule) for name, sim in sims.items()}
    joint = runs["joint"]["final"]
    for name in dict.fromkeys((label, "naive")):
        runs[name]["new_task_gap"] = {t: acc - joint[t] for t, acc in runs[name]["final"].items()}
    report["continual"] = {
        "schedule": schedule.text(), "method": label,
        "settings": dataclasses.asdict(settings),
        "phases": [list(p) for p in schedule.phases(config.rounds)],
        "runs": runs,
    }
    return report


def continual_run(sim: Simulation, schedule: Schedule) -> dict[str, Any]:
    """One variant's figures: accuracy per task at each phase's end, the final accuracy, and
    per task that trained before the last phase its forgetting (its best accuracy at a phase
    end minus its final accuracy)."""
    phases = [{"end_round": end, "accuracy": acc} for end, acc in sim.phase_accuracy]
    final = sim.phase_accuracy[-1][1]
    last_start = schedule.phases(sim.config.rounds)[-1][0]
    forgetting = {}
    for task, start in sorted(schedule.starts.items()):
        if start < last_start:  # (trained in an earlier phase: it may have been forgotten)
            seen = [acc[task] for end, acc in sim.phase_accuracy if end > start]
            forgetting[task] = max(seen) - final[task]
    return {"phase_accuracy": phases, "final": final, "forgetting": forgetting,
            "max_forgetting": max(forgetting.values(), default=0.0)}


def _participation_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The run where some nodes train only a fraction of the rounds, against the run where
    everyone trains every round; training takes ``train_s`` simulated seconds (1 s if unset)
    and rounds run freely (no lockstep), paced as a daemon paces them (a round starts
    ``round_interval_s`` after the last one started, twice the training time if unset) and by
    the updates each node waits for, so each node's rounds per simulated minute say whether
    anyone waits for the part-time ones."""
    train_s = config.train_s or 1.0
    config = dataclasses.replace(config, baselines=False, train_s=train_s, lockstep=False,
                                 round_interval_s=config.round_interval_s or 2.0 * train_s)
    sim = Simulation(config, on_phase=on_phase)
    report = sim.run()
    full = Simulation(dataclasses.replace(config, participation={}, progress=None, home=None,
                                          explain=0),
                      edu=sim.edu, curve=False)
    base = full.run()
    slow = sorted(config.participation)
    fast = [n for n in sim.topo.nodes if n not in config.participation]

    def per_minute(run: Simulation, names: list[str]) -> float:
        """The mean over ``names`` of each one's pace: rounds completed after its first, per
        simulated minute since the first (the steady pace; the first round's start-up and a
        last round that ends before its interval would be over are not counted)."""
        pace = paces(run)  # (the hardware study's measure of a node's furthest component)
        rates = [r for n in names if (r := pace[n]["furthest"]) is not None]
        return float(sum(rates) / len(rates)) if rates else float("nan")

    trained: dict[str, int] = {}
    for name, _, _ in sim.work["run"]:
        trained[name] = trained.get(name, 0) + 1
    study: dict[str, Any] = {
        "nodes": {n: config.participation[n] for n in slow},
        "train_s": config.train_s,
        "round_interval_s": config.round_interval_s,
        # per node: rounds it completed (mixed) and rounds it trained in, in the part-time run
        "rounds_completed": {n: sim.completed.get(n, (0, 0.0))[0] for n in sim.topo.nodes},
        "rounds_trained": {n: trained.get(n, 0) for n in sim.topo.nodes},
        "rounds_per_min": {"fast": per_minute(sim, fast), "slow": per_minute(sim, slow)},
        "rounds_per_min_everyone_trains": {"fast": per_minute(full, fast),
                                           "slow": per_minute(full, slow)},
    }
    if sim.edu is not None:
        ours = {t: v["federated"] for t, v in report["tasks"].items()}
        theirs = {t: v["federated"] for t, v in base["tasks"].items()}
        study.update(accuracy=ours, accuracy_everyone_trains=theirs,
                     gap={t: ours[t] - theirs[t] for t in ours})
        if config.continual is not None:
            study["continual"] = continual_run(sim, config.continual[0])
    report["participation"] = study
    return report


def _fairness_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The group study with the members' default objective and mixing (and the baselines),
    then the same federation with the fairness objective or loss mixing: per task its measures
    beside the default's, how much of the worst-group gap it closed and what it cost the mean."""
    sim = Simulation(dataclasses.replace(config, fairness="erm", lean=0.0), on_phase=on_phase)
    report = sim.run()
    rule = Simulation(dataclasses.replace(config, baselines=False, progress=None, home=None,
                                          explain=0), edu=sim.edu, curve=False)
    rule.run()
    assert rule.edu is not None
    ours = rule.edu.fairness(rule.final_trainers())
    base = {t: runs["federated"] for t, runs in report["fairness"]["tasks"].items()}
    report["fairness"]["rule"] = {
        "objective": config.fairness, "tilt": config.tilt,
        "mixing": "loss" if config.lean else "plain", "lean": config.lean, "tasks": ours,
        **_narrowed(ours, base),
    }
    central = {t: runs["centralized"] for t, runs in report["fairness"]["tasks"].items()
               if "centralized" in runs}
    if central and sim.edu is not None and config.fairness != "erm":  # (mixing: no server)
        # the same objective on one model over everyone's pooled data: what a central server
        # would get from it, beside what the central server gets with the plain loss
        sim.edu.centralized(objective=(config.fairness, config.tilt))
        pooled = sim.edu.fairness(
            sim.edu.baseline_trainers[f"centralized, {config.fairness}"])
        report["fairness"]["rule"]["centralized"] = {"tasks": pooled,
                                                     **_narrowed(pooled, central)}
    return report


def _narrowed(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, dict[str, float]]:
    """How much of ``base``'s worst-group gap ``ours`` closed per task, and its change of the
    mean accuracy."""
    return {"gap_narrowed": {t: 1.0 - ours[t]["worst_group_gap"] / base[t]["worst_group_gap"]
                             if base[t]["worst_group_gap"] > 0 else 0.0 for t in ours},
            "mean_change": {t: ours[t]["mean"] - base[t]["mean"] for t in ours}}


def _attack_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The attacked run, and the same seed and topology with the attackers left out (plain
    MH): what the honest nodes reach together, the best a defence can give them."""
    sim = Simulation(dataclasses.replace(config, baselines=False), on_phase=on_phase)
    report = sim.run()
    kind, count = config.attack or ("", 0)
    report["attack"] = {"kind": kind, "count": count, "nodes": sim.byzantine,
                        "robust": config.robust}
    if sim.edu is None:
        return report
    clean = Simulation(dataclasses.replace(config, attack=None, robust="mh", baselines=False,
                                           home=None, explain=0,
                                           progress=None, absent=frozenset(sim.byzantine)),
                       edu=sim.edu, curve=False)  # (the attackers' data, flipped or not, is unused)
    clean.run()
    honest = [n for n in sim.trainers if n not in sim.byzantine]
    report["honest_accuracy"] = sim.edu.accuracy({n: sim.trainers[n] for n in honest})
    assert clean.edu is not None
    report["honest_accuracy_fault_free"] = clean.edu.accuracy(
        {n: clean.trainers[n] for n in honest})
    return report


def _unlearning_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The run that forgets ``config.unlearn``'s node, and the run without it from the start."""
    name, round_ = config.unlearn or ("", 0)
    if not 0 < round_ <= config.rounds:
        raise ConfigError(f"the unlearning round must be in 1..{config.rounds}, not {round_}")
    config = dataclasses.replace(config, baselines=False)
    sim = Simulation(config, on_phase=on_phase)
    report = sim.run()
    retrain = Simulation(dataclasses.replace(config, unlearn=None, absent=frozenset({name}),
                                             home=None, explain=0,
                                             progress=None), edu=sim.edu, curve=False)
    base = retrain.run()
    ours, theirs = sim.final_states(), retrain.final_states()
    diff = max(float((ours[k].to(torch.float64) - theirs[k].to(torch.float64)).abs().max())
               for k in theirs)
    per_node = sim.rolled_back
    rolled = sorted({c for cs in per_node.values() for c in cs})
    work = {phase: len(v) for phase, v in sim.work.items()}
    study: dict[str, Any] = {
        "node": name,
        "mode": config.unlearn_mode,
        **sim.unlearning,
        "max_abs_diff_vs_retrain": diff,
        "cost_fraction": work["unlearn"] / max(work["run"], 1),
        "node_rounds": {"run": work["run"], "unlearning": work["unlearn"],
                        "retrain": len(retrain.work["run"])},
        "components_rolled_back": rolled,
        "components_untouched": sorted(set(sim.topo.holders) - set(rolled)),
        "rolled_back_per_node": per_node,
        "retrain_wall_s": base["wall_s"],
    }
    if sim.edu is not None and sim.edu.triggered is not None:
        study.update(_backdoor_study(sim, retrain, report, base))
    report["unlearning"] = study
    return report


def _backdoor_study(sim: Simulation, retrain: Simulation, report: dict[str, Any],
                    base: dict[str, Any]) -> dict[str, Any]:
    """Education with a backdoored member: the backdoor and clean accuracy after the unlearning
    (``sim``, ``report``) and after the retraining (``retrain``, ``base``)."""
    assert sim.edu is not None
    task = sim.edu.backdoor_task
    return {
        "backdoor_success_after": sim.edu.backdoor_success(sim.final_trainers()),
        "backdoor_success_retrain": sim.edu.backdoor_success(retrain.final_trainers()),
        "backdoor_task": task,
        "clean_accuracy_after": report["tasks"][task]["federated"],
        "clean_accuracy_retrain": base["tasks"][task]["federated"],
        "tasks_retrain": {t: v["federated"] for t, v in base["tasks"].items()},
    }


def _provenance_study(config: SimConfig, on_phase: PhaseProgress | None) -> dict[str, Any]:
    """The consensus run with synthetic updates, and per member j two more runs: without j from
    the start (exact unlearning ends there bit for bit) and with j silent (it mixes and relays,
    its updates are zero).  Per component, node i's share of j against ‖x_i − x_i without j‖,
    its unlearning displacement, and against ‖x_i − x_i with j silent‖, its contribution
    displacement (j's updates as they reach i, the topology unchanged): :func:`share_study`
    of each, the second under ``contribution``."""
    assert config.updates is not None
    sim = Simulation(config, on_phase=on_phase)
    report = sim.run()
    peer_ids = {n: sn.node.peer_id for n, sn in sim.nodes.items()}
    base = sim.final_states()
    worst = report.get("provenance", {}).get("provenance_max_error", 0.0)
    shares: dict[str, dict[tuple[str, str], float]] = {}
    for i, comp in base:
        prov = reported_shares(sim.nodes[i].node.provenance_of(comp), peer_ids)
        shares.setdefault(comp, {}).update({(i, j): s for j, s in prov.items()})
    members = sorted({n for n, _ in base})
    displacement: dict[str, dict[tuple[str, str], float]] = {}
    contribution: dict[str, dict[tuple[str, str], float]] = {}
    for done, j in enumerate(members):
        if on_phase is not None:
            on_phase(f"provenance study: without {j}, {j} silent", done, len(members))
        quiet = dataclasses.replace(config, progress=None, home=None)  # (in memory)
        for out, variant in ((displacement, dataclasses.replace(quiet, absent=quiet.absent | {j})),
                             (contribution, dataclasses.replace(quiet, silent=quiet.silent | {j}))):
            run = Simulation(variant)
            worst = max(worst, run.run().get("provenance", {}).get("provenance_max_error", 0.0))
            for (i, comp), state in run.final_states().items():
                if i != j and (j, comp) in base:  # (a member not holding comp has no share)
                    gap = base[i, comp].to(torch.float64) - state.to(torch.float64)
                    out.setdefault(comp, {})[i, j] = float(torch.linalg.vector_norm(gap))
    scaled, scale = config.updates
    unlearning = {c: share_study(shares.get(c, {}), d, scaled)
                  for c, d in sorted(displacement.items())}
    contributing = {c: share_study(shares.get(c, {}), d, scaled)
                    for c, d in sorted(contribution.items())}
    report["provenance_study"] = {
        "scaled": scaled, "scale": scale, "runs_without": len(members),
        "runs_silent": len(members), "provenance_max_error": worst,
        **_summary(shares, displacement, unlearning),
        "contribution": _summary(shares, contribution, contributing),
        "components": {c: {**st, "displacement": _nested(displacement[c]),
                           "contribution": {**contributing[c],
                                            "displacement": _nested(contribution[c])}}
                       for c, st in unlearning.items()},
    }
    return report


def _summary(shares: dict[str, dict[tuple[str, str], float]],
             disp: dict[str, dict[tuple[str, str], float]],
             studies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Over every component: the mean and min of the per-node ρ, and the pooled ρ."""
    per_node = [r for st in studies.values() for r in st["per_node"].values() if r is not None]
    pairs = [(c, p) for c, d in sorted(disp.items()) for p in sorted(d)]
    return {"mean": float(np.mean(per_node)) if per_node else None,
            "min": min(per_node, default=None),
            "pooled": spearman([shares.get(c, {}).get(p, 0.0) for c, p in pairs],
                               [disp[c][p] for c, p in pairs])}


def _nested(pairs: dict[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (i, j), value in sorted(pairs.items()):
        out.setdefault(i, {})[j] = value
    return out
