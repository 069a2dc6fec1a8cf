"""The simulator runs the real node and driver over the memory transport on a mock clock."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from p2pfed.ledger import verify_ledger
from p2pfed.sim.simulator import SimConfig, sim_identity, simulate
from p2pfed.sim.topology import load_topology, parse_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def run(name: str, rounds: int, seed: int = 0, **kw: object) -> dict[str, object]:
    topo = load_topology(TOPOLOGIES / f"{name}.toml")
    return simulate(SimConfig(topo, rounds=rounds, seed=seed, **kw))  # type: ignore[arg-type]


def test_ring_16_converges_within_the_spectral_bound() -> None:
    report = run("ring-16", rounds=400)
    comp = report["components"]["backbone"]  # type: ignore[index]
    bound = comp["bound_rounds_to_1e-6"]
    reached = comp["rounds_to_1e-6"]
    assert comp["holders"] == 16
    assert comp["slem"] == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / 16))
    assert reached is not None and bound / 2 <= reached <= bound
    assert comp["mean_drift"] <= 1e-5
    assert len(comp["consensus_distance"]) == 400
    assert comp["consensus_distance"][0] < 1.0


def test_same_seed_same_numbers_and_different_seed_differs() -> None:
    a = run("torus-4x4", rounds=30, seed=3)
    b = run("torus-4x4", rounds=30, seed=3)
    c = run("torus-4x4", rounds=30, seed=4)
    for comp in a["components"]:  # type: ignore[attr-defined]
        assert a["components"][comp] == b["components"][comp]  # type: ignore[index]
        assert a["components"][comp] != c["components"][comp]  # type: ignore[index]


@pytest.mark.parametrize(
    "name", ["small-world-32", "random-regular-64", "star-16", "complete-8", "hierarchical-edu"]
)
def test_every_topology_simulates(name: str) -> None:
    report = run(name, rounds=20)
    assert report["nodes"] == len(load_topology(TOPOLOGIES / f"{name}.toml").nodes)
    for comp in report["components"].values():  # type: ignore[attr-defined]
        d = comp["consensus_distance"]
        assert len(d) == 20 and d[-1] < d[0] < 1.0
        assert comp["mean_drift"] < 1e-9
    json.dumps(report)


def test_complete_graph_agrees_in_one_round() -> None:
    report = run("complete-8", rounds=2)
    assert report["components"]["backbone"]["rounds_to_1e-6"] == 1  # type: ignore[index]


def test_hierarchical_components_mix_only_among_holders(tmp_path: Path) -> None:
    topo = load_topology(TOPOLOGIES / "hierarchical-edu.toml")
    simulate(SimConfig(topo, rounds=3, seed=1, home=tmp_path))
    from gossip.identity import load_identity
    from p2pfed.ledger import Ledger

    peer_to_name = {load_identity(tmp_path / n / "identity.key").peer_id: n for n in topo.nodes}
    mixed: dict[str, set[str]] = {}
    for name in topo.nodes:
        ident = load_identity(tmp_path / name / "identity.key")
        with Ledger.open(tmp_path / name / "ledger.sqlite3", ident) as ledger:
            for entry in ledger.entries():
                comp = entry.body.get("component")
                if entry.kind in ("local-update", "mix"):
                    assert name in topo.holders[comp], (name, comp)
                if entry.kind == "contribution":
                    sender = peer_to_name[entry.body["sender"]]
                    assert sender in topo.holders[comp] and name in topo.holders[comp]
                    mixed.setdefault(comp, set()).update({sender, name})
        assert verify_ledger(tmp_path / name / "ledger.sqlite3", ident.public_key).ok
    assert mixed["encoder.image"] == {n for n in topo.nodes if topo.groups[n] == "institution"}
    assert mixed == {c: set(h) for c, h in topo.holders.items()}


def _mix_inputs(home: Path, name: str) -> dict[int, set[str]]:
    from gossip.identity import load_identity
    from p2pfed.ledger import Ledger

    ident = load_identity(home / name / "identity.key")
    with Ledger.open(home / name / "ledger.sqlite3", ident) as ledger:
        return {e.body["round"]: {p for p, _w, _d in e.body["inputs"]}
                for e in ledger.entries("mix")}


def test_churn_leave_join_and_link_failure(tmp_path: Path) -> None:
    report = run("ring-churn-16", rounds=100, home=tmp_path)
    d = report["components"]["backbone"]["consensus_distance"]  # type: ignore[index]
    assert len(d) == 100 and d[-1] < d[19] / 4
    peer = {n: sim_identity(0, n).peer_id for n in ("node-4", "node-5", "node-10", "node-11")}
    # node-5 is away for rounds 20..59 and mixes again from round 60
    away = _mix_inputs(tmp_path, "node-5")
    assert set(away) == set(range(20)) | set(range(60, 100))
    n4 = _mix_inputs(tmp_path, "node-4")
    assert all(peer["node-5"] in n4[r] for r in (*range(20), *range(60, 100)))
    assert not any(peer["node-5"] in n4[r] for r in range(20, 60))
    # the link node-10 -- node-11 is down for rounds 70..89
    n10 = _mix_inputs(tmp_path, "node-10")
    assert [r for r in range(100) if peer["node-11"] not in n10[r]] == list(range(70, 90))


def test_late_joiner() -> None:
    topo = parse_topology({
        "graph": {"kind": "ring", "n": 6},
        "churn": [{"round": 5, "action": "join", "node": "node-5"}],
    })
    assert topo.initially_absent() == {"node-5"}
    report = simulate(SimConfig(topo, rounds=40, seed=2))
    comp = report["components"]["backbone"]
    assert comp["holders"] == 5
    assert comp["consensus_distance"][-1] < 1e-2
