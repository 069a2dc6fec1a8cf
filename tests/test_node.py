"""The sans-IO node, driven by hand: events in, actions out, no I/O and no clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch

from gossip.catalog import ComponentSpec
from gossip.envelope import packb, seal, unpackb
from gossip.errors import (
    BadPayloadError,
    ForgedSignatureError,
    MalformedMessageError,
    NotAMemberError,
    ReplayedMessageError,
    StorageError,
)
from gossip.identity import Identity
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.ledger import Ledger, LedgerEntry
from p2pfed.lineage import Lineage
from p2pfed.node import (
    ANNOUNCE,
    Announce,
    Announcement,
    Fetch,
    Node,
    NodeConfig,
    PeerRejected,
    Phase,
    RoundCompleted,
    Train,
)

FED = b"F" * 32
TIMEOUT = 1000


def make_node(value: float, comps: tuple[str, ...] = ("backbone",), trains: frozenset[str] =
              frozenset()) -> Node:
    ident = Identity.generate()
    components = {
        c: FlatComponent.from_params(ComponentSpec.from_name(c),
                                     {"w": torch.full((4,), value, dtype=torch.float64)})
        for c in comps
    }
    return Node(ident, FED, components, Ledger.open(None, ident), BlobStore(None),
                NodeConfig(round_timeout_ms=TIMEOUT, trains=trains))


def wire(nodes: list[Node], edges: list[tuple[int, int]],
         holders: dict[str, list[int]] | None = None) -> None:
    g = nx.Graph()
    g.add_nodes_from(n.peer_id for n in nodes)
    g.add_edges_from((nodes[a].peer_id, nodes[b].peer_id) for a, b in edges)
    comps = set().union(*(n.components for n in nodes))
    hold = {c: [nodes[i].peer_id for i in (holders or {}).get(c, range(len(nodes)))]
            for c in comps}
    for n in nodes:
        n.set_topology(g, hold)


def deliver(nodes: list[Node], actions: list[object], now: int = 0, rounds: int = 1) -> None:
    """Carry out actions between nodes until quiet (a tiny synchronous driver)."""
    by_id = {n.peer_id: n for n in nodes}
    queue = [(src, a) for src, a in actions]  # type: ignore[misc]
    while queue:
        src, action = queue.pop(0)
        if isinstance(action, Announce):
            for peer in action.recipients:
                queue += [(peer, a) for a in by_id[peer].receive(src, action.data, now)]
        elif isinstance(action, Fetch):
            data = by_id[action.peer].serve_payload(action.digest)
            assert data is not None
            queue += [(src, a) for a in by_id[src].payload_received(
                action.peer, action.component, action.round, action.digest, data, now)]


def start_all(nodes: list[Node], limit: int) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for n in nodes:
        n.set_round_limit(limit, 0)
        out += [(n.peer_id, a) for a in n.start(0)]
    return out


def value(node: Node, comp: str = "backbone") -> torch.Tensor:
    return node.components[comp].flat


def test_three_nodes_average_exactly_in_one_round() -> None:
    nodes = [make_node(v) for v in (0.0, 3.0, 6.0)]
    wire(nodes, [(0, 1), (1, 2), (0, 2)])
    deliver(nodes, start_all(nodes, limit=1))
    for n in nodes:
        assert n.round_of("backbone") == 1
        assert n.phase_of("backbone") is Phase.PAUSED
        assert torch.allclose(value(n), torch.full((4,), 3.0, dtype=torch.float64))
        assert n.lineage_of("backbone") == Lineage.of(m.peer_id for m in nodes)


def test_path_uses_metropolis_hastings_weights() -> None:
    nodes = [make_node(v) for v in (0.0, 3.0, 9.0)]
    wire(nodes, [(0, 1), (1, 2)])  # degrees 1, 2, 1: weights 1/3 on each edge
    deliver(nodes, start_all(nodes, limit=1))
    assert value(nodes[0])[0].item() == pytest.approx(2 / 3 * 0 + 1 / 3 * 3)
    assert value(nodes[1])[0].item() == pytest.approx((0 + 3 + 9) / 3)
    assert value(nodes[2])[0].item() == pytest.approx(2 / 3 * 9 + 1 / 3 * 3)
    total = sum(value(n)[0].item() for n in nodes)
    assert total == pytest.approx(12.0)  # doubly stochastic: the sum (mean) is preserved


def test_missing_neighbour_still_finishes_the_round() -> None:
    a, b, c = (make_node(v) for v in (0.0, 3.0, 9.0))
    wire([a, b, c], [(0, 1), (1, 2), (0, 2)])
    a.set_round_limit(1, 0)
    b.set_round_limit(1, 0)
    acts = [(a.peer_id, x) for x in a.start(0)] + [(b.peer_id, x) for x in b.start(0)]
    deliver([a, b, c], [(s, x) for s, x in acts if isinstance(x, Announce)])
    # c never started: a and b have each other's update but not c's
    assert a.round_of("backbone") == 0 and a.next_deadline() == TIMEOUT
    assert a.tick(TIMEOUT - 1) == []
    done = [x for x in a.tick(TIMEOUT) if isinstance(x, RoundCompleted)]
    assert done and done[0].missing == (c.peer_id,) and done[0].mixed_with == (b.peer_id,)
    # weights 1/3 each; c's third goes back to self: 2/3 * 0 + 1/3 * 3
    assert value(a)[0].item() == pytest.approx(1.0)
    assert a.round_of("backbone") == 1


def test_component_is_only_mixed_among_holders() -> None:
    a, b = make_node(1.0, ("backbone", "head.topic")), make_node(5.0, ("backbone",))
    c = make_node(9.0, ("backbone", "head.topic"))
    wire([a, b, c], [(0, 1), (1, 2), (0, 2)], holders={"head.topic": [0, 2], "backbone": [0, 1, 2]})
    assert b.peer_id not in a.neighbours_of("head.topic")
    deliver([a, b, c], start_all([a, b, c], limit=1))
    assert value(a, "head.topic")[0].item() == pytest.approx(5.0)  # (1 + 9) / 2
    for entry in a.ledger.entries("contribution"):
        if entry.body["component"] == "head.topic":
            assert entry.body["sender"] == c.peer_id


def test_training_precedes_the_announcement() -> None:
    n = make_node(1.0, trains=frozenset({"backbone"}))
    wire([n, make_node(0.0)], [(0, 1)])
    n.set_round_limit(2, 0)
    assert n.start(0) == [Train("backbone", 0, 1, ("erm", 1.0))]  # (the objective recorded)
    assert n.phase_of("backbone") is Phase.TRAINING
    value(n).add_(1.0)  # what a trainer would do
    actions = n.local_update_done("backbone", 0, 5)
    assert isinstance(actions[0], Announce)
    entry = list(n.ledger.entries("local-update"))[-1]
    assert entry.body["trained"] is True
    stored = n.serve_payload(entry.body["digest"])
    assert stored is not None


def _announce_from(sender: Node, comp: str = "backbone", rnd: int = 0, seq: int = 1,
                   digest: bytes = b"d" * 32) -> bytes:
    ann = Announcement(comp, rnd, digest, 100, 1, Lineage.of([sender.peer_id]))
    return seal(sender.identity, kind=ANNOUNCE, federation_id=FED, seq=seq, timestamp_ms=0,
                body=ann.to_body()).to_bytes()


def _rejected(actions: list[object]) -> type:
    assert len(actions) == 1 and isinstance(actions[0], PeerRejected)
    return type(actions[0].error)


def test_bad_messages_are_rejected_per_peer_and_the_node_goes_on() -> None:
    a, b = make_node(0.0), make_node(4.0)
    stranger = make_node(7.0)
    wire([a, b], [(0, 1)])
    a.set_round_limit(1, 0)
    a.start(0)
    assert _rejected(a.receive(b.peer_id, b"\xc1garbage", 0)) is MalformedMessageError
    assert _rejected(a.receive(stranger.peer_id, _announce_from(stranger), 0)) is NotAMemberError
    # b's announcement relayed by someone else
    assert _rejected(a.receive(stranger.peer_id, _announce_from(b), 0)) is NotAMemberError
    forged = unpackb(_announce_from(stranger))
    fields = unpackb(forged[1])
    fields[2] = b.identity.public_key
    forged[1] = packb(fields)
    assert _rejected(a.receive(b.peer_id, packb(forged), 0)) is ForgedSignatureError
    assert _rejected(a.receive(b.peer_id, _announce_from(b, comp="head.nope"), 0)) \
        is NotAMemberError
    good = _announce_from(b, seq=7)
    fetches = a.receive(b.peer_id, good, 0)
    assert isinstance(fetches[0], Fetch)
    assert _rejected(a.receive(b.peer_id, good, 0)) is ReplayedMessageError
    # the payload does not match the announced digest
    assert _rejected(a.payload_received(b.peer_id, "backbone", 0, b"d" * 32, b"junk", 0)) \
        is BadPayloadError
    assert a.rejected == {"malformed": 1, "not-a-member": 3, "forged": 1, "replayed": 1,
                          "bad-payload": 1}
    # ... and a still completes its round at the deadline
    assert any(isinstance(x, RoundCompleted) for x in a.tick(TIMEOUT))
    assert value(a)[0].item() == pytest.approx(0.0)


def test_ledger_records_each_step() -> None:
    nodes = [make_node(v) for v in (1.0, 2.0)]
    wire(nodes, [(0, 1)])
    deliver(nodes, start_all(nodes, limit=2))
    kinds = [e.kind for e in nodes[0].ledger.entries()]
    assert kinds.count("local-update") == 2
    assert kinds.count("contribution") == 2
    assert kinds.count("mix") == 2
    assert kinds.index("local-update") < kinds.index("mix")


def test_a_node_far_behind_catches_up() -> None:
    a, b = make_node(0.0), make_node(4.0)
    wire([a, b], [(0, 1)])
    a.start(0)
    ann = Announcement("backbone", 7, b"d" * 32, 100, 1, Lineage.of([b.peer_id]))
    data = seal(b.identity, kind=ANNOUNCE, federation_id=FED, seq=1, timestamp_ms=0,
                body=ann.to_body()).to_bytes()
    actions = a.receive(b.peer_id, data, 10)
    assert a.round_of("backbone") == 7 and a.phase_of("backbone") is Phase.COLLECTING
    assert any(isinstance(x, Fetch) and x.round == 7 for x in actions)
    assert any(isinstance(x, Announce) for x in actions)  # a publishes its round-7 update
    assert [e.body["to"] for e in a.ledger.entries("catch-up")] == [7]


def test_disagreement_history_shrinks() -> None:
    nodes = [make_node(v) for v in (0.0, 4.0, 8.0)]
    wire(nodes, [(0, 1), (1, 2)])
    deliver(nodes, start_all(nodes, limit=5))
    hist = nodes[0].disagreement_of("backbone")
    assert len(hist) == 5 and hist[-1] < hist[0]


def test_checkpoints_restore_state_and_round() -> None:
    nodes = [make_node(v) for v in (0.0, 6.0)]
    for n in nodes:
        n.config = NodeConfig(round_timeout_ms=TIMEOUT, checkpoint_every=2)
    wire(nodes, [(0, 1)])
    deliver(nodes, start_all(nodes, limit=3))
    a = nodes[0]
    rounds = [e.body["round"] for e in a.ledger.entries("checkpoint")]
    assert rounds == [0, 2]  # the starting state (to roll back to), then every 2 rounds
    a.checkpoint(5)
    fresh = Node(a.identity, FED, {"backbone": FlatComponent.from_params(
        ComponentSpec.from_name("backbone"), {"w": torch.zeros(4, dtype=torch.float64)})},
        a.ledger, a.blobs)
    assert fresh.restore() == {"backbone": 3}
    assert torch.equal(value(fresh), value(a)) and fresh.round_of("backbone") == 3
    assert fresh.lineage_of("backbone") == a.lineage_of("backbone")


def test_a_late_payload_is_dropped_quietly_but_an_unsolicited_one_is_refused() -> None:
    a, b = make_node(0.0), make_node(4.0)
    wire([a, b], [(0, 1)])
    for n in (a, b):
        n.set_round_limit(2, 0)
    a.start(0)
    announce = next(x for x in b.start(0) if isinstance(x, Announce))
    fetch = next(x for x in a.receive(b.peer_id, announce.data, 0) if isinstance(x, Fetch))
    assert any(isinstance(x, RoundCompleted) for x in a.tick(TIMEOUT))  # mixed without b
    assert a.round_of("backbone") == 1
    data = b.serve_payload(fetch.digest)
    assert data is not None
    # b answered, just too late: not its fault
    assert a.payload_received(b.peer_id, "backbone", 0, fetch.digest, data, TIMEOUT) == []
    assert a.rejected == {}
    # a payload for the current round that was never asked for is still refused
    assert _rejected(a.payload_received(b.peer_id, "backbone", 1, fetch.digest, data,
                                        TIMEOUT)) is BadPayloadError
    assert a.rejected == {"bad-payload": 1}


def _checkpointing_node(tmp_path: Path, ident: Identity | None = None,
                        ledger: Ledger | None = None) -> Node:
    ident = ident or Identity.generate()
    comp = FlatComponent.from_params(ComponentSpec.from_name("backbone"),
                                     {"w": torch.zeros(4, dtype=torch.float64)})
    return Node(ident, FED, {"backbone": comp}, ledger or Ledger.open(None, ident),
                BlobStore(tmp_path / "blobs"), NodeConfig(round_timeout_ms=TIMEOUT))


def _checkpoint_at(node: Node, round_: int, fill: float) -> bytes:
    value(node).fill_(fill)
    node.fast_forward(round_)
    return node.checkpoint(round_)["backbone"].digest


def test_a_damaged_checkpoint_falls_back_to_the_newest_clean_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = _checkpointing_node(tmp_path)
    for rnd in (5, 10, 15):
        newest = _checkpoint_at(node, rnd, float(rnd))
    node.blobs.path(newest).write_bytes(b"bit rot" * 10)
    fresh = _checkpointing_node(tmp_path, node.identity, node.ledger)
    with caplog.at_level("WARNING", logger="p2pfed.node"):
        assert fresh.restore() == {"backbone": 10}
    assert torch.equal(value(fresh), torch.full((4,), 10.0, dtype=torch.float64))
    assert "round 15" in caplog.text and "damaged" in caplog.text
    for key in [e.body["digest"] for e in node.ledger.entries("checkpoint")]:
        node.blobs.delete(key)
    with pytest.raises(StorageError, match="no checkpoint of backbone"):
        _checkpointing_node(tmp_path, node.identity, node.ledger).restore()


def test_restore_and_start_read_only_the_end_of_a_long_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = _checkpointing_node(tmp_path)
    for rnd in range(0, 200, 5):
        _checkpoint_at(node, rnd, float(rnd))
        node.ledger.append_many([("mix", {"component": "backbone", "round": rnd + i}, rnd)
                                 for i in range(40)])
    assert len(node.ledger) > 1600
    fresh = _checkpointing_node(tmp_path, node.identity, node.ledger)
    read: list[int] = []
    entries = fresh.ledger.entries

    def counting(*args: Any, **kwargs: Any) -> Iterator[LedgerEntry]:
        for entry in entries(*args, **kwargs):
            read.append(entry.index)
            yield entry

    monkeypatch.setattr(fresh.ledger, "entries", counting)
    assert fresh.restore() == {"backbone": 195}
    fresh.set_round_limit(196, 0)
    fresh.start(0)  # (it looks for a checkpoint of every component too)
    assert len(read) <= 4


def test_a_node_reports_its_mixed_states_only_when_asked() -> None:
    import dataclasses

    from p2pfed.node import Mixed

    nodes = [make_node(v) for v in (0.0, 3.0, 6.0)]
    nodes[0].config = dataclasses.replace(nodes[0].config, report_mixes=True)
    wire(nodes, [(0, 1), (1, 2), (0, 2)])
    seen: list[tuple[str, object]] = []
    queue = start_all(nodes, limit=1)
    by_id = {n.peer_id: n for n in nodes}
    while queue:  # (deliver, keeping what each node returns)
        src, action = queue.pop(0)
        seen.append((src, action))
        if isinstance(action, Announce):
            for peer in action.recipients:
                queue += [(peer, a) for a in by_id[peer].receive(src, action.data, 0)]
        elif isinstance(action, Fetch):
            data = by_id[action.peer].serve_payload(action.digest)
            assert data is not None
            queue += [(src, a) for a in by_id[src].payload_received(
                action.peer, action.component, action.round, action.digest, data, 0)]
    mixed = [(src, a) for src, a in seen if isinstance(a, Mixed)]
    assert [src for src, _ in mixed] == [nodes[0].peer_id]  # the others were not asked
    (_, m), = mixed
    assert isinstance(m, Mixed) and (m.component, m.round, m.epoch) == ("backbone", 0, 0)
    assert torch.equal(m.state, value(nodes[0]))
    assert m.state.data_ptr() != value(nodes[0]).data_ptr()  # a copy: training may go on


# ---------------------------------------------------------------- missed announcements
def test_a_neighbour_that_missed_the_announcement_gets_it_when_heard_from_again() -> None:
    a, b = make_node(0.0), make_node(4.0)
    wire([a, b], [(0, 1)])
    a.set_round_limit(1, 0)
    lost = [x for x in a.start(0) if isinstance(x, Announce)]
    assert lost and lost[0].recipients == (b.peer_id,)
    assert a.send_failed(b.peer_id, lost[0].data, 0) == []  # b was restarting
    b.set_round_limit(1, 0)
    # b's own announcement reaches a, which sends b its round again (sealed afresh)
    deliver([a, b], [(b.peer_id, x) for x in b.start(10)], now=10)
    assert a.round_of("backbone") == b.round_of("backbone") == 1  # no deadline waited out
    assert torch.equal(value(a), torch.full((4,), 2.0, dtype=torch.float64))
    assert torch.equal(value(a), value(b))
    assert not a.rejected and not b.rejected  # (a replayed envelope would have been)


def test_a_new_neighbour_gets_the_current_announcement_and_others_get_nothing_twice() -> None:
    a, b, c = make_node(0.0), make_node(3.0), make_node(6.0)
    wire([a, b, c], [(0, 1)])
    for n in (a, b, c):
        n.set_round_limit(1, 0)
    first = [(a.peer_id, x) for x in a.start(0)]
    wire([a, b, c], [(0, 1), (0, 2)])  # c joins as a's neighbour after a announced
    assert all(isinstance(x, Announce) and c.peer_id not in x.recipients for _p, x in first)
    again = a.receive(c.peer_id, _announcement_of(c), 5)
    assert [x.recipients for x in again if isinstance(x, Announce)] == [(c.peer_id,)]
    assert not [x for x in a.receive(b.peer_id, _announcement_of(b), 6)
                if isinstance(x, Announce)]  # b got it the first time


def _announcement_of(node: Node) -> bytes:
    sent = [x for x in node.start(0) if isinstance(x, Announce)]
    return sent[0].data


def test_a_lone_component_waits_a_round_timeout_between_rounds_and_never_recurses() -> None:
    alone = make_node(1.0)
    g = nx.Graph()
    g.add_node(alone.peer_id)
    alone.set_topology(g, {})
    # no neighbour: the first round mixes alone at once ...
    assert [(type(x), x.round) for x in alone.start(0)] == [(RoundCompleted, 0)]
    assert alone.round_of("backbone") == 1
    assert alone.next_deadline() == TIMEOUT  # ... and the next waits a round timeout
    alone.tick(TIMEOUT - 1)
    assert alone.round_of("backbone") == 1
    alone.tick(TIMEOUT)
    assert alone.round_of("backbone") == 2
