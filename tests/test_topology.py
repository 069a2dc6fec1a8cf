"""Topology files: every bundled file loads; bad files give clear errors."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest

from gossip.errors import ConfigError
from p2pfed.sim.topology import load_topology, parse_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
REQUIRED = ["ring-16", "torus-4x4", "small-world-32", "random-regular-64", "star-16",
            "complete-8", "hierarchical-edu"]


@pytest.mark.parametrize("name", REQUIRED)
def test_bundled_topologies_load(name: str) -> None:
    topo = load_topology(TOPOLOGIES / f"{name}.toml")
    assert topo.name == name
    assert nx.is_connected(topo.graph)
    assert set(topo.nodes) == set(topo.graph.nodes)
    for holders in topo.holders.values():
        assert nx.is_connected(topo.graph.subgraph(holders))


def test_shapes_of_graphs() -> None:
    ring = load_topology(TOPOLOGIES / "ring-16.toml")
    assert ring.nodes[:3] == ("node-0", "node-1", "node-2")
    assert all(d == 2 for _, d in ring.graph.degree)
    torus = load_topology(TOPOLOGIES / "torus-4x4.toml")
    assert all(d == 4 for _, d in torus.graph.degree)
    rr = load_topology(TOPOLOGIES / "random-regular-64.toml")
    assert len(rr.nodes) == 64 and all(d == 4 for _, d in rr.graph.degree)
    star = load_topology(TOPOLOGIES / "star-16.toml")
    assert max(d for _, d in star.graph.degree) == 15


def test_hierarchical_groups_hold_different_components() -> None:
    topo = load_topology(TOPOLOGIES / "hierarchical-edu.toml")
    students = [n for n in topo.nodes if topo.groups[n] == "student"]
    assert len(students) == 18
    assert topo.components_of(students[0]) == ["encoder.text.lora", "head.topic"]
    institutions = [n for n in topo.nodes if topo.groups[n] == "institution"]
    assert "backbone" in topo.components_of(institutions[0])
    assert set(topo.holders["encoder.image"]) == set(institutions)


def test_churn_is_parsed_and_sorted() -> None:
    topo = load_topology(TOPOLOGIES / "ring-churn-16.toml")
    assert [e.round for e in topo.churn] == sorted(e.round for e in topo.churn)
    assert {e.action for e in topo.churn} == {"leave", "join", "fail-link", "restore-link"}
    assert not topo.initially_absent()  # node-5 leaves first, then rejoins


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "needs a \\[graph\\]"),
        ({"graph": {"kind": "moebius"}}, "unknown graph kind"),
        ({"graph": {"kind": "ring", "n": -1}}, "integer >= 3"),
        ({"graph": {"kind": "ring", "n": 4}, "components": {"weird": "all"}}, "must start with"),
        ({"graph": {"kind": "ring", "n": 4}, "components": {"head.x": ["node-9"]}},
         "neither a node"),
        ({"graph": {"kind": "ring", "n": 6}, "components": {"head.x": ["node-0", "node-3"]}},
         "not connected"),
        ({"graph": {"kind": "ring", "n": 4}, "churn": [{"round": 1, "action": "explode"}]},
         "action must be"),
        ({"graph": {"kind": "ring", "n": 4},
          "churn": [{"round": 1, "action": "fail-link", "link": ["node-0", "node-2"]}]},
         "edge of the graph"),
    ],
)
def test_bad_topologies_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_topology(data)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_topology(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[graph\nkind=", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_topology(bad)
