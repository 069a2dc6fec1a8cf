"""Synthetic training in the consensus workload, and the study relating each member's provenance
share to how far removing it moves the others' states (``SimConfig.updates``)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.errors import ConfigError
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.journal import LocalUpdate, read
from p2pfed.ledger import Ledger
from p2pfed.sim.config import check_config
from p2pfed.sim.nodes import synthetic_update
from p2pfed.sim.provenance import share_study, spearman
from p2pfed.sim.simulator import SimConfig, Simulation, sim_identity, simulate
from p2pfed.sim.topology import parse_topology

RING_16 = Path(__file__).resolve().parent.parent / "topologies" / "ring-16.toml"


def ring(n: int = 6) -> Any:
    return parse_topology({"graph": {"kind": "ring", "n": n}})


def test_a_synthetic_update_is_a_seeded_vector_of_the_given_norm() -> None:
    a = synthetic_update(1, "node-2", "backbone", 3, 32, 10.0)
    assert a.dtype == torch.float64 and float(torch.linalg.vector_norm(a)) == pytest.approx(10.0)
    assert torch.equal(a, synthetic_update(1, "node-2", "backbone", 3, 32, 10.0))
    for other in (synthetic_update(2, "node-2", "backbone", 3, 32, 10.0),
                  synthetic_update(1, "node-1", "backbone", 3, 32, 10.0),
                  synthetic_update(1, "node-2", "head", 3, 32, 10.0),
                  synthetic_update(1, "node-2", "backbone", 4, 32, 10.0)):
        assert not torch.allclose(a, other)


def _credits(home: Path, name: str) -> list[float | None]:
    ledger = Ledger.open(home / name / "ledger.sqlite3", sim_identity(3, name))
    try:
        return [e.record.credit for e in read(ledger.entries(LocalUpdate.KIND), LocalUpdate)]
    finally:
        ledger.close()


def test_synthetic_updates_train_through_the_node_and_credit_their_mass(tmp_path: Path) -> None:
    """Every node trains every round; each credit is the update's norm (K at the scaled
    node), and the shares the nodes report are the product of the mixing matrices."""
    config = SimConfig(ring(), rounds=6, seed=3, home=tmp_path, updates=("node-2", 5.0))
    report = Simulation(config).run()
    prov = report["provenance"]
    assert prov["provenance_max_error"] <= 1e-9 and prov["max_sum_error"] <= 1e-9
    shares = prov["components"]["backbone"]["shares"]
    assert sorted(shares) == [f"node-{i}" for i in range(6)]
    assert all(s and math.isclose(sum(s.values()), 1.0) for s in shares.values())
    for i in range(6):
        name = f"node-{i}"
        assert _credits(tmp_path, name) == pytest.approx([5.0 if name == "node-2" else 1.0] * 6,
                                                         rel=1e-12)


def test_the_study_keeps_only_its_own_run_in_home(tmp_path: Path) -> None:
    """The runs without each member are compared in memory: HOME holds the study's run."""
    simulate(SimConfig(ring(), rounds=3, seed=3, home=tmp_path, updates=("node-2", 5.0)))
    assert all(len(_credits(tmp_path, f"node-{i}")) == 3 for i in range(6))


def test_without_updates_the_consensus_workload_only_mixes() -> None:
    report = Simulation(SimConfig(ring(), rounds=4, seed=3)).run()
    assert "provenance" not in report and "provenance_study" not in report


def test_exact_unlearning_with_synthetic_updates_equals_the_run_without() -> None:
    """What the study compares with (the run without a member) is what unlearning gives."""
    report = simulate(SimConfig(ring(), rounds=8, seed=2, updates=("node-2", 5.0),
                                unlearn=("node-4", 5)))
    assert report["unlearning"]["max_abs_diff_vs_retrain"] == 0.0


def test_the_study_on_a_ring_of_six() -> None:
    config = SimConfig(ring(), rounds=10, seed=2, updates=("node-2", 5.0))
    report = simulate(config)
    study = report["provenance_study"]
    assert study["scaled"] == "node-2" and study["scale"] == 5.0
    assert study["runs_without"] == 6 and study["provenance_max_error"] <= 1e-9
    comp = study["components"]["backbone"]
    figures = [study["mean"], study["min"], study["pooled"], comp["member_level"],
               *comp["per_node"].values()]
    assert all(f is not None and -1.0 <= f <= 1.0 for f in figures)
    assert study["min"] <= study["mean"] and comp["undefined"] == []
    for key in ("scaled_largest_share", "scaled_largest_displacement",
                "largest_share_is_largest_displacement", "largest_share_tied",
                "largest_displacement_has_largest_share"):
        assert 0.0 <= comp[key] <= 1.0 and 0.0 <= comp["contribution"][key] <= 1.0
    disp = comp["displacement"]
    assert all(i not in row and len(row) == 5 and min(row.values()) > 0.0
               for i, row in disp.items())
    shares = report["provenance"]["components"]["backbone"]["shares"]
    for neighbour in ("node-1", "node-3"):  # (the scaled member's own neighbours)
        others = {j: s for j, s in shares[neighbour].items() if j != neighbour}
        assert max(others, key=others.__getitem__) == "node-2"
    assert comp["scaled_largest_share"] >= 2 / 5
    # with node-2's updates zero instead (the ring unchanged), node-2 moves every node most,
    # the largest share names it everywhere, and the shares rank the pairs better
    contrib = comp["contribution"]
    assert study["runs_silent"] == 6
    assert contrib["scaled_largest_displacement"] == 1.0
    assert contrib["largest_share_is_largest_displacement"] == 1.0
    assert study["contribution"]["pooled"] >= max(0.8, study["pooled"])
    assert study["contribution"]["min"] <= study["contribution"]["mean"]
    assert all(i not in row and len(row) == 5 and min(row.values()) > 0.0
               for i, row in contrib["displacement"].items())
    again = simulate(SimConfig(ring(), rounds=10, seed=2, updates=("node-2", 5.0)))
    assert again["provenance_study"] == study
    other = simulate(SimConfig(ring(), rounds=10, seed=5, updates=("node-2", 5.0)))
    assert other["provenance_study"]["components"]["backbone"]["displacement"] != disp


def test_a_silent_member_mixes_but_adds_nothing() -> None:
    """Silent j: no credit and no share of j, yet j still mixes (it stays a member with a
    state); the states are linear in the updates, so the members' contributions
    x_i − x_i(j silent) add up to x_i at every node."""
    config = SimConfig(ring(4), rounds=4, seed=2, updates=("node-2", 5.0))
    sim = Simulation(config)
    sim.run()
    base = sim.final_states()
    total = {k: torch.zeros_like(v) for k, v in base.items()}
    for j in (f"node-{i}" for i in range(4)):
        silent = Simulation(dataclasses.replace(config, silent=frozenset({j})))
        report = silent.run()
        states = silent.final_states()
        assert set(states) == set(base)
        shares = report["provenance"]["components"]["backbone"]["shares"]
        assert all(j not in row for row in shares.values())
        assert report["provenance"]["provenance_max_error"] <= 1e-9
        for k, v in states.items():
            total[k] += base[k] - v
    for k, v in base.items():
        assert torch.allclose(total[k], v, rtol=0.0, atol=1e-12)


def test_share_study_on_numbers_made_by_hand() -> None:
    disp = {(i, j): 1.0 + a + 2 * b + (a * b) % 3 for a, i in enumerate("abcd")
            for b, j in enumerate("abcd") if i != j}
    same = share_study(disp, disp, "a")
    assert same["mean"] == same["min"] == same["pooled"] == pytest.approx(1.0)
    assert same["largest_share_is_largest_displacement"] == 1.0
    # at b, c and d tie for the largest displacement (8.0): with the shares equal to it, the
    # largest share is tied, and the largest displacement (the first name, c) holds it
    assert same["largest_share_tied"] == pytest.approx(1 / 3)
    assert same["largest_displacement_has_largest_share"] == 1.0
    # b's two largest shares tie up to rounding and d moves b most: d's share is not "the"
    # largest (c's is, by 1e-12), but it is tied with it
    tied = {**disp, ("b", "c"): 9.0 * (1 + 1e-12), ("b", "d"): 9.0}
    moved = {**disp, ("b", "a"): 0.5, ("b", "c"): 1.0, ("b", "d"): 2.0}
    study = share_study(tied, moved, "a")
    assert study["largest_share_is_largest_displacement"] == pytest.approx(2 / 3)
    assert study["largest_share_tied"] == pytest.approx(1 / 3)
    assert study["largest_displacement_has_largest_share"] == 1.0
    flipped = share_study({k: 1.0 / v for k, v in disp.items()}, disp, "a")
    assert flipped["mean"] == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0], [1.0, 2.0]) is None
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 5.0, 5.0, 9.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("updates", [("node-9", 2.0), ("node-1", 0.0), ("node-1", -1.0),
                                     ("node-1", math.inf), ("node-1", math.nan)])
def test_bad_updates_are_refused(updates: tuple[str, float]) -> None:
    with pytest.raises(ConfigError):
        check_config(SimConfig(ring(), updates=updates))


def test_silent_members_need_updates_and_known_nodes() -> None:
    with pytest.raises(ConfigError, match="synthetic updates"):
        check_config(SimConfig(ring(), silent=frozenset({"node-1"})))
    with pytest.raises(ConfigError, match="node-9"):
        check_config(SimConfig(ring(), updates=("node-1", 2.0), silent=frozenset({"node-9"})))
    check_config(SimConfig(ring(), updates=("node-1", 2.0), silent=frozenset({"node-1"})))


def test_updates_need_the_consensus_workload_and_no_attack() -> None:
    with pytest.raises(ConfigError, match="consensus"):
        check_config(SimConfig(ring(), workload="education", updates=("node-1", 2.0)))
    with pytest.raises(ConfigError, match="attack"):
        check_config(SimConfig(ring(), attack=("gaussian", 1), updates=("node-1", 2.0)))


@pytest.mark.parametrize("args", [
    ["--update-scale", "node-3"], ["--update-scale", "node-99:2"],
    ["--update-scale", "node-3:0"], ["--update-scale", "node-3:-2"],
    ["--update-scale", "node-3:inf"], ["--update-scale", "node-3:nan"],
    ["--update-scale", "node-3:x"], ["--update-scale", ":2"],
    ["--update-scale", "node-3:2", "--workload", "education"],
    ["--update-scale", "node-3:2", "--attack", "gaussian:1"],
])
def test_the_cli_refuses_bad_update_scales(args: list[str]) -> None:
    assert main(["simulate", str(RING_16), "--rounds", "2", "-q", *args]) == exitcodes.USAGE
