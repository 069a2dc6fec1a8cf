"""Robust aggregation rules and Byzantine members in the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.consensus import clipped_gossip, trimmed_mean
from p2pfed.sim.education import EducationSettings
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from p2pfed.sim.topology import load_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def test_clipped_gossip_bounds_what_one_neighbour_can_do() -> None:
    own = torch.zeros(4, dtype=torch.float64)
    near = [torch.full((4,), 0.1, dtype=torch.float64), torch.full((4,), -0.1,
                                                                  dtype=torch.float64)]
    liar = torch.full((4,), 1e6, dtype=torch.float64)
    out = clipped_gossip(own, [(0.25, near[0]), (0.25, near[1]), (0.25, liar)])
    # the radius is the median distance (0.2): the liar moves the node by at most 0.25 * 0.2
    assert float(torch.linalg.vector_norm(out - own)) <= 0.25 * 0.2 + 1e-12
    # with honest neighbours only, within the radius it is the plain weighted average
    plain = clipped_gossip(own, [(0.25, near[0]), (0.25, near[1])], radius=1.0)
    assert torch.allclose(plain, 0.25 * near[0] + 0.25 * near[1])


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    states = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 6.0]), torch.tensor([3.0, 7.0]),
              torch.tensor([1e9, -1e9])]
    assert torch.allclose(trimmed_mean(states, 1), torch.tensor([2.5, 5.5], dtype=torch.float64))
    assert torch.allclose(trimmed_mean(states[:2], 1),
                          torch.tensor([1.5, 5.5], dtype=torch.float64))  # too few to trim


def _honest_drift(rule: str) -> float:
    topo = load_topology(TOPOLOGIES / "ring-chords-16.toml")
    sim = Simulation(SimConfig(topo, rounds=60, seed=4, attack=("gaussian", 3), robust=rule))
    honest = [n for n in topo.nodes if n not in sim.byzantine]
    start = torch.stack([torch.from_numpy(sim.trace.initial["backbone"][n]) for n in honest])
    sim.run()
    end = torch.stack([sim.final_states()[(n, "backbone")].to(torch.float64) for n in honest])
    return float((end.mean(0) - start.mean(0)).abs().max())  # how far the honest mean moved


def test_byzantine_neighbours_drag_plain_averaging_and_clipping_resists() -> None:
    sim = Simulation(SimConfig(load_topology(TOPOLOGIES / "ring-chords-16.toml"), rounds=1,
                               attack=("sign-flip", 3)))
    assert sim.byzantine == ["node-0", "node-10", "node-5"]
    plain, clipped, trimmed = (_honest_drift(r) for r in ("mh", "clipped", "trimmed-mean"))
    assert clipped < plain / 3 and trimmed < plain / 3


def test_attack_report_compares_the_honest_nodes_with_a_run_without_attackers() -> None:
    settings = EducationSettings(rounds=3, steps=2, batch_size=8, questions=600, traces=300,
                                 text_model="tiny", lora_layers=(1,))
    report = simulate(SimConfig(load_topology(TOPOLOGIES / "ring-chords-16.toml"),
                                workload="education", rounds=3, seed=1, education=settings,
                                attack=("label-flip", 3), robust="trimmed-mean"))
    assert report["attack"] == {"kind": "label-flip", "count": 3, "robust": "trimmed-mean",
                                "nodes": ["node-0", "node-10", "node-5"]}
    assert set(report["honest_accuracy"]) == set(report["honest_accuracy_fault_free"]) == {
        "digits", "topic", "engagement"}


@pytest.mark.parametrize(("args", "code"), [
    (["--attack", "sign-flip"], exitcodes.USAGE),
    (["--attack", "teleport:2"], exitcodes.CONFIG),
    (["--attack", "sign-flip:16"], exitcodes.CONFIG),
    (["--robust", "krum"], exitcodes.CONFIG),
])
def test_bad_attack_arguments_are_refused(args: list[str], code: int) -> None:
    assert main(["simulate", str(TOPOLOGIES / "ring-chords-16.toml"), "--rounds", "2", "-q",
                 *args]) == code
