"""Provenance shares on nodes: credited, announced, mixed, recorded, restored and unlearned,
checked against the product of the mixing matrices (:mod:`p2pfed.sim.provenance`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gossip.envelope import unpackb
from p2pfed.journal import Checkpoint, LocalUpdate, Mix
from p2pfed.lineage import Lineage, tag
from p2pfed.node import Announcement, Node
from p2pfed.node._provenance import SEND_MAX_MEMBERS, recorded
from p2pfed.node._restore import checkpoint_of, load_checkpoint
from p2pfed.provenance import PARTIAL, Provenance
from p2pfed.sim.provenance import matrix_shares, max_error, reported_shares
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from tests.test_education import TINY, school_topology
from tests.test_participation import _node, _path, _rounds


def _records(node: Node, kind: type, component: str = "backbone") -> list:
    return [s.record for s in node._journal.read(kind) if s.record.component == component]


def test_the_announcement_carries_the_vector_and_older_forms_still_read() -> None:
    members = Lineage.of(["a", "b", "c"])
    prov = Provenance.empty().credit(tag("a"), 2.0).credit(tag("c"), 0.5)
    ann = Announcement("backbone", 3, b"d" * 32, 10, 2, members, 0.0, 0, 0, prov)
    body = ann.to_body()
    assert len(unpackb(body)) == 10
    back = Announcement.from_body(body)
    assert back.prov == prov and back == ann
    plain = dataclasses.replace(ann, prov=None)
    assert len(unpackb(plain.to_body())) == 8 and Announcement.from_body(plain.to_body()) == plain


def test_a_training_round_credits_the_norm_of_what_it_added() -> None:
    """The fake trainer writes 0.9·x + step: the change is -0.1·x + step on 4 coordinates."""
    nodes = [_node(i) for i in range(3)]
    _path(nodes)
    _rounds(nodes, 1)
    for i, n in enumerate(nodes):
        (up,) = _records(n, LocalUpdate)
        assert up.credit == pytest.approx(2.0 * abs(-0.1 * i + 0.25 * (i + 1)), rel=1e-12)


def test_three_nodes_report_the_matrix_product_exactly() -> None:
    """A path of three (MH: the ends keep 2/3, the middle 1/3): every node's vector equals
    Σ_t Φ(T, t) D(t) within 1e-12, and its shares sum to 1."""
    nodes = [_node(i) for i in range(3)]
    _path(nodes)
    _rounds(nodes, 6)
    w = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    mass = np.zeros((3, 3))
    for r in range(6):
        for i, n in enumerate(nodes):
            mass[i, i] += next(u.credit for u in _records(n, LocalUpdate) if u.round == r)
        mass = w @ mass
    for i, n in enumerate(nodes):
        prov = n.provenance_of("backbone")
        got = {t: m for t, m in zip(prov.tags, prov.mass, strict=True)}
        want = {tag(m.peer_id): mass[i, j] for j, m in enumerate(nodes)}
        assert got.keys() == want.keys()
        assert all(got[t] == pytest.approx(want[t], rel=1e-12) for t in want)
        assert sum(prov.shares().values()) == pytest.approx(1.0, abs=1e-12)
        assert prov.flags == 0
        last = _records(n, Mix)[-1]  # (the ledger keeps the vector after each mix)
        assert recorded(last.mass, last.prov_flags, last.lineage, last.round) == prov
    ids = {f"n{i}": n.peer_id for i, n in enumerate(nodes)}
    ledgers = {f"n{i}": n._journal.ledger for i, n in enumerate(nodes)}
    computed = matrix_shares(ledgers, "backbone", ids, 6)
    reported = {f"n{i}": reported_shares(n.provenance_of("backbone"), ids)
                for i, n in enumerate(nodes)}
    assert max_error(reported, computed) < 1e-12


def test_a_neighbour_without_a_vector_leaves_its_mass_unattributed() -> None:
    nodes = [_node(0), _node(1, provenance=False), _node(2)]
    _path(nodes)
    _rounds(nodes, 2)
    assert nodes[0].provenance_of("backbone").flags & PARTIAL
    assert tag(nodes[1].peer_id) not in set(nodes[0].provenance_of("backbone").tags)


def test_a_checkpoint_keeps_the_vector_for_a_restart() -> None:
    nodes = [_node(i) for i in range(3)]
    _path(nodes)
    _rounds(nodes, 3)
    n = nodes[1]
    st = n._states["backbone"]
    ck = checkpoint_of(n._journal, "backbone", st)
    before = st.prov
    st.prov = Provenance.empty()
    load_checkpoint(st, n._journal, ck, n.peer_id)
    assert st.prov == before and st.prov.total() > 0
    old = Checkpoint(ck.component, ck.round, ck.digest, ck.lineage, ck.memory)  # (older ledger)
    load_checkpoint(st, n._journal, old, n.peer_id)
    assert st.prov.flags & PARTIAL and st.prov.total() == 0


def test_the_vector_is_not_sent_past_the_frame_bound() -> None:
    from p2pfed.node._provenance import outgoing

    st = _node(0)._states["backbone"]
    st.prov = Provenance.empty().credit(tag("a"), 1.0)
    st.lineage = Lineage.of(["a"])
    assert outgoing(st) is st.prov
    st.lineage = Lineage.of([f"m{i}" for i in range(SEND_MAX_MEMBERS + 1)])
    assert outgoing(st) is None


def _tiny(**extra: object) -> SimConfig:
    return SimConfig(school_topology(), workload="education", rounds=4, seed=3,
                     education=dataclasses.replace(TINY, rounds=4), **extra)  # type: ignore[arg-type]


def test_the_simulator_checks_every_nodes_shares_against_the_matrices() -> None:
    report = simulate(_tiny())
    prov = report["provenance"]
    assert prov["provenance_max_error"] <= 1e-9 and prov["max_sum_error"] <= 1e-9
    assert set(prov["components"]) >= {"backbone", "head.topic", "encoder.text.lora"}
    shares = prov["components"]["head.topic"]["shares"]
    assert set(shares) == set(school_topology().nodes)
    assert all(set(s) == set(school_topology().nodes) for s in shares.values())


def test_exact_unlearning_gives_the_forgotten_member_no_share() -> None:
    """After exact unlearning every node's shares equal those of the run without the member
    (within 1e-9), and the member has none."""
    sim = Simulation(_tiny(unlearn=("small-c", 3)))
    report = sim.run()
    retrain = Simulation(_tiny(absent=frozenset({"small-c"})), edu=sim.edu).run()
    assert report["provenance"]["provenance_max_error"] <= 1e-9
    for comp, row in report["provenance"]["components"].items():
        theirs = retrain["provenance"]["components"][comp]["shares"]
        for node, shares in row["shares"].items():
            assert "small-c" not in shares, (comp, node)
            assert max_error({node: shares}, {node: theirs[node]}) <= 1e-9, (comp, node)


def test_a_trainer_that_diverges_leaves_its_mass_unattributed() -> None:
    from p2pfed.node._provenance import credit

    st = _node(0)._states["backbone"]
    origin = st.comp.flat.clone()
    st.comp.flat.fill_(float("nan"))
    assert credit(st, tag("a"), origin) == 0.0 and st.prov.flags & PARTIAL
    st.comp.flat.copy_(torch.zeros_like(origin))


def test_a_huge_announced_mass_is_refused_and_large_ones_never_overflow() -> None:
    from gossip.errors import MalformedMessageError
    from p2pfed.provenance import MAX_MASS

    members = Lineage.of(["a", "b"])
    with pytest.raises(MalformedMessageError, match="provenance mass"):
        Provenance.decode(members, np.array([1.0, 1e300], "<f8").tobytes(), 0)
    top = Provenance.decode(members, np.array([MAX_MASS, MAX_MASS], "<f8").tobytes(), 0)
    mixed = Provenance.mix(0.465, top, [(0.071, top), (0.464, top)])
    assert np.isfinite(mixed.mass).all()
    near_max = Provenance(members, np.array([1.7e308, 1.7e308]))  # (a sum past float64)
    assert near_max.shares() == {t: pytest.approx(0.5) for t in members}


def test_a_vector_that_will_not_mix_never_stops_the_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Should mixing the vectors fail, the round completes with the state mixed as always and
    the vector marked partial (nothing a peer sends may stop a node)."""
    from p2pfed.node import _mix

    def refuse(*args: object, **kwargs: object) -> Provenance:
        raise ValueError("refused for the test")

    nodes = [_node(i) for i in range(3)]
    _path(nodes)
    monkeypatch.setattr(_mix.Provenance, "mix", staticmethod(refuse))
    _rounds(nodes, 2)
    for n in nodes:
        assert len(_records(n, Mix)) == 2  # (both rounds mixed)
        assert n.provenance_of("backbone").flags & PARTIAL
