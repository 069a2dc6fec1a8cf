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
from p2pfed.consensus import RULES, trimmed_mean, trimmed_mean_weights
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


def linear_mix(inp: MixInput, result: MixResult) -> torch.Tensor:
    """``self_w · own + Σ w_j · x_j`` with the weights the result says its state equals."""
    self_w, weights = result.linear_weights()
    out = self_w * inp.own.to(torch.float64)
    for w, n in zip(weights, inp.neighbours, strict=True):
        out = out + w * n.state.to(torch.float64)
    return out


def test_mh_and_noise_aware_record_the_linear_weights_they_mix_by() -> None:
    near = (Neighbour("a", 0.25, t(1.0, -3.0), noise=0.1),
            Neighbour("b", 0.3, t(0.5, 2.0), noise=2.0))
    inp = MixInput(t(0.2, 0.7), 0.45, near, own_noise=0.5)
    for name in ("mh", "noise-aware"):
        mixed = mixing.rule(name).mix(inp)
        assert mixed.share_weights is None and mixed.exact
        assert mixed.linear_weights() == (mixed.self_weight, mixed.weights)
        assert torch.allclose(mixed.state, linear_mix(inp, mixed), rtol=0.0, atol=1e-15)
    # (the declared noise moved the weights: the check is not just Metropolis–Hastings again)
    assert mixing.rule("noise-aware").mix(inp).weights != (0.25, 0.3)


def test_clipped_gossip_reports_a_left_out_neighbour_at_weight_zero() -> None:
    near = (Neighbour("a", 0.25, t(0.1, 0.0)), Neighbour("b", 0.25, t(0.0, 0.2)),
            Neighbour("liar", 0.25, t(50.0, 50.0)))
    inp = MixInput(t(0.0, 0.0), 0.25, near)
    clipped = mixing.rule("clipped").mix(inp)
    assert clipped.audit["left_out"] == ["liar"]
    # the ledger keeps the weights the rule was handed...
    assert clipped.self_weight == 0.25 and clipped.weights == (0.25, 0.25, 0.25)
    # ...the state is the mix with the liar at 0 and its weight with self
    assert clipped.share_weights == (0.5, (0.25, 0.25, 0.0)) and clipped.exact
    assert sum(clipped.share_weights[1]) + clipped.share_weights[0] == 1.0
    assert torch.allclose(clipped.state, linear_mix(inp, clipped), rtol=0.0, atol=1e-15)
    assert clipped.state.tolist() == pytest.approx([0.025, 0.05])
    # nobody left out: the recorded weights are the linear ones
    honest = MixInput(t(0.0, 0.0), 0.5, near[:2])
    kept = mixing.rule("clipped").mix(honest)
    assert kept.share_weights is None and kept.audit["left_out"] == []
    assert torch.allclose(kept.state, linear_mix(honest, kept), rtol=0.0, atol=1e-15)


def test_trimmed_mean_shares_count_the_values_each_input_keeps() -> None:
    # by hand: coordinate 0 holds 1, 0, 2 (the median is self's 1); coordinate 1 holds 9, 5,
    # 4 (the median is a's 5); b is kept nowhere.  ω = (1/2, 1/2, 0), which is no linear
    # weighting: ½·own + ½·a = (0.5, 7), not the state (1, 5)
    near = (Neighbour("a", 0.25, t(0.0, 5.0)), Neighbour("b", 0.25, t(2.0, 4.0)))
    inp = MixInput(t(1.0, 9.0), 0.5, near)
    trimmed = mixing.rule("trimmed-mean").mix(inp)
    assert trimmed.state.tolist() == [1.0, 5.0]
    assert trimmed.share_weights == (0.5, (0.5, 0.0)) and not trimmed.exact
    assert trimmed.self_weight == 0.5 and trimmed.weights == (0.25, 0.25)  # (as handed)
    # ties go by input order (a stable sort): in (0, 1, 0) the median is b's 0, in (0, 0, 2)
    # a's 0
    tied = (Neighbour("a", 0.25, t(1.0, 0.0)), Neighbour("b", 0.25, t(0.0, 2.0)))
    assert mixing.rule("trimmed-mean").mix(MixInput(t(0.0, 0.0), 0.5, tied)).share_weights == (
        0.0, (0.5, 0.5))
    # two states: nothing is trimmed, the plain mean, exactly ½ and ½
    pair = MixInput(t(1.0, 9.0), 0.75, near[:1])
    mean = mixing.rule("trimmed-mean").mix(pair)
    assert mean.share_weights == (0.5, (0.5,)) and mean.exact and mean.weights == (0.25,)
    assert torch.equal(mean.state, linear_mix(pair, mean))


def test_trimmed_mean_shares_are_exact_when_every_coordinate_keeps_the_same_inputs() -> None:
    states = [t(0.0, 0.0, 0.0), t(1.0, 1.5, 2.0), t(2.0, 2.5, 3.0), t(9.0, 9.0, 9.0)]
    trimmed = trimmed_mean_weights(states, 1)
    assert trimmed.weights == [0.0, 0.5, 0.5, 0.0] and trimmed.exact
    assert torch.equal(trimmed.state, trimmed_mean(states, 1))
    mixed = [t(0.0, 9.0, 1.0), t(1.0, 0.0, 9.0), t(9.0, 1.0, 0.0), t(5.0, 5.0, 5.0)]
    shares = trimmed_mean_weights(mixed, 1)
    assert not shares.exact and sum(shares.weights) == pytest.approx(1.0, abs=1e-15)
    assert shares.weights == pytest.approx([1 / 6, 1 / 6, 1 / 6, 3 / 6])


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
