"""Mixing rules as strategy objects: the registry, each rule by hand, a rule added by a test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import networkx as nx
import pytest
import torch

from gossip.catalog import ComponentSpec
from gossip.errors import ConfigError
from gossip.identity import Identity
from p2pfed import mixing
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.consensus import RULES
from p2pfed.ledger import Ledger
from p2pfed.mixing import Memory, MixingRule, MixInput, MixResult, Neighbour
from p2pfed.node import Node, NodeConfig
from tests.test_node import deliver, start_all

FED = b"F" * 32


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def node_with(value: float, rule: str, **config: Any) -> Node:
    ident = Identity.generate()
    comp = FlatComponent.from_params(ComponentSpec.from_name("backbone"),
                                     {"w": torch.full((4,), value, dtype=torch.float64)})
    return Node(ident, FED, {"backbone": comp}, Ledger.open(None, ident), BlobStore(None),
                NodeConfig(round_timeout_ms=1000, robust={"*": rule}, **config))


def triangle(nodes: list[Node]) -> None:
    g = nx.Graph()
    g.add_edges_from([(nodes[0].peer_id, nodes[1].peer_id), (nodes[1].peer_id, nodes[2].peer_id),
                      (nodes[0].peer_id, nodes[2].peer_id)])
    for n in nodes:
        n.set_topology(g, {"backbone": [m.peer_id for m in nodes]})


def test_the_registry_holds_one_class_per_built_in_rule() -> None:
    assert mixing.names()[:len(RULES)] == RULES
    assert {type(mixing.rule(n)).__name__ for n in RULES} == {
        "MetropolisHastings", "Clipped", "TrimmedMean", "NoiseAware"}
    with pytest.raises(ConfigError, match="unknown mixing rule 'krum'"):
        mixing.rule("krum")
    with pytest.raises(ConfigError, match="already registered"):
        mixing.register(mixing.MetropolisHastings())


def test_each_rule_against_hand_computed_values() -> None:
    own = t(0.0, 0.0)
    near = (Neighbour("a", 0.25, t(1.0, 0.0)), Neighbour("b", 0.25, t(0.0, 2.0)))
    inp = MixInput(own, 0.5, near)
    mh = mixing.rule("mh").mix(inp)
    assert mh.state.tolist() == [0.25, 0.5] and mh.weights == (0.25, 0.25)
    assert mh.self_weight == 0.5 and mh.memory == Memory() and mh.audit == {}
    # equal (no) noise: noise-aware is plain Metropolis–Hastings
    assert mixing.rule("noise-aware").mix(inp).state.tolist() == [0.25, 0.5]
    # three states per coordinate, a quarter trimmed is at least one: the median
    assert mixing.rule("trimmed-mean").mix(inp).state.tolist() == [0.0, 0.0]
    # distances 1 and 2: the radius is twice the lower median, 2; both are within it
    clipped = mixing.rule("clipped").mix(inp)
    assert clipped.state.tolist() == [0.25, 0.5]
    assert clipped.memory == Memory(radius=2.0) and clipped.audit == {"radius": 2.0,
                                                                      "left_out": []}
    # the rule is handed its memory: last round's 10 keeps the radius at 9.5
    again = mixing.rule("clipped").mix(MixInput(own, 0.5, near, Memory(radius=10.0)))
    assert again.memory.radius == pytest.approx(9.5)
    # one neighbour alone cannot be judged: the memory is handed back unchanged
    alone = mixing.rule("clipped").mix(MixInput(own, 0.75, near[:1], Memory(radius=3.0)))
    assert alone.memory == Memory(radius=3.0) and alone.audit["radius"] == pytest.approx(2.85)
    # no neighbour in time: every rule keeps the node where it is
    for name in RULES:
        assert mixing.rule(name).mix(MixInput(own, 1.0, ())).state.tolist() == [0.0, 0.0]


def test_memory_is_what_checkpoints_carry() -> None:
    assert Memory(radius=0.5).to_record() == {"radius": 0.5}
    assert Memory.from_record({"component": "x", "radius": 0.5}) == Memory(radius=0.5)
    assert Memory.from_record({}) == Memory()  # (checkpoints from before the radius)


# ---- adding a rule: one class and one registration ---------------------------------------


class KeepOwn(MixingRule):
    """A toy rule: every node keeps its own state (self weight 1)."""

    name = "keep-own"

    def mix(self, inp: MixInput) -> MixResult:
        return MixResult(inp.own, 1.0, tuple(0.0 for _ in inp.neighbours), inp.memory)


@pytest.fixture
def keep_own() -> Iterator[None]:
    mixing.register(KeepOwn())
    yield
    mixing.unregister(KeepOwn.name)


@pytest.mark.usefixtures("keep_own")
def test_a_rule_registered_by_a_test_runs_a_federation() -> None:
    nodes = [node_with(v, "keep-own") for v in (0.0, 3.0, 6.0)]
    triangle(nodes)
    deliver(nodes, start_all(nodes, limit=2))
    for n, v in zip(nodes, (0.0, 3.0, 6.0), strict=True):
        assert n.round_of("backbone") == 2  # the rounds ran, the neighbours' updates came in
        assert n.components["backbone"].flat.tolist() == [v] * 4
        mixes = [e.body for e in n.ledger.entries("mix")]
        assert [m["rule"] for m in mixes] == ["keep-own", "keep-own"]
        assert all(m["self_weight"] == 1.0 and len(m["inputs"]) == 2 for m in mixes)
        assert all(w == 0.0 for m in mixes for _, w, _ in m["inputs"])


def test_a_node_refuses_a_rule_nobody_registered() -> None:
    with pytest.raises(ConfigError, match="keep-own"):
        node_with(0.0, "keep-own")
