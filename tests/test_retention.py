"""Bounded storage: compaction keeps the chain verifiable, the horizon keeps exact unlearning
exact, a request beyond it is refused as documented, and the budget stops rounds cleanly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import networkx as nx
import torch

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer
from gossip.identity import Identity
from p2pfed import kinds
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.ledger import Ledger, verify_ledger
from p2pfed.node import Node, NodeConfig
from p2pfed.node._retention import RetentionPolicy
from p2pfed.unlearning import check_unlearning
from tests.test_node import deliver

FED = b"R" * 32


# ---------------------------------------------------------------- the ledger
def _ledger(path: Path, n: int) -> Ledger:
    ledger = Ledger.open(path, Identity.from_seed(b"L" * 32))
    for i in range(n):
        ledger.append("contribution", {"i": i}, timestamp_ms=i)
    return ledger


def test_compacted_entries_are_gone_and_the_chain_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = _ledger(path, 20)  # entries 1..20 after the 'open' entry
    ledger.verify_new()  # (a verified mark at 21, below what is compacted next)
    entry = ledger.compact([3, 4, 5, 9, 0], 100, {"why": "test"})
    assert entry is not None and entry.kind == kinds.COMPACTION
    assert [g[:2] for g in entry.body["gaps"]] == [[3, 6], [9, 10]] and entry.body["count"] == 4
    assert ledger.compact([3, 4], 101, {}) is None  # deleted already: nothing to do
    left = [e.index for e in ledger.entries()]
    assert 3 not in left and 9 not in left and 0 in left and len(left) == 18
    # a second compaction names every run so far and deletes the first: one remains
    again = ledger.compact([12, 20], 102, {})
    assert again is not None
    assert [g[:2] for g in again.body["gaps"]] == [[3, 6], [9, 10], [12, 13], [20, 22]]
    assert [e.index for e in ledger.entries(kinds.COMPACTION)] == [again.index]
    ledger.append("mix", {"after": True}, timestamp_ms=103)
    assert ledger.verify().ok and ledger.verify_new().ok
    ledger.close()
    assert verify_ledger(path).ok
    reopened = Ledger.open(path, Identity.from_seed(b"L" * 32))  # start-up's incremental check
    assert reopened.verify_new().ok and len(reopened) == again.index + 2
    reopened.close()


def test_an_entry_deleted_without_its_compaction_entry_is_found(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = _ledger(path, 12)
    ledger.compact([2, 3], 100, {})
    ledger.close()
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM entries WHERE idx = 7")  # evidence quietly removed
    conn.commit()
    conn.close()
    report = verify_ledger(path)
    assert not report.ok and report.first_bad_index == 7 and "missing" in report.reason
    conn = sqlite3.connect(path)  # without the compaction entry, the runs it named are missing
    conn.execute("DELETE FROM entries WHERE kind = 'compaction'")
    conn.commit()
    conn.close()
    report = verify_ledger(path)
    assert not report.ok and report.first_bad_index == 2  # (the runs it named are missing now)


# ---------------------------------------------------------------- the horizon
def _node(i: int, root: Path | None, horizon: int, max_bytes: int = 0) -> Node:
    ident = Identity.from_seed(bytes([60 + i]) * 32)
    comp = FlatComponent.from_params(ComponentSpec.from_name("backbone"),
                                     {"w": torch.full((4,), float(i), dtype=torch.float64)})
    home = root / str(i) if root is not None else None
    return Node(ident, FED, {"backbone": comp},
                Ledger.open(home / "ledger.sqlite3" if home else None, ident),
                BlobStore(home / "blobs" if home else None),
                NodeConfig(round_timeout_ms=1000, checkpoint_every=2,
                           retention=RetentionPolicy(horizon, max_bytes)), Sequencer(0))


def _wire(nodes: list[Node]) -> None:
    g = nx.path_graph([n.peer_id for n in nodes])
    for n in nodes:
        n.set_topology(g, {"backbone": [m.peer_id for m in nodes]})


def _run(nodes: list[Node], limit: int) -> None:
    actions: list[tuple[str, object]] = []
    for n in nodes:
        actions += [(n.peer_id, a) for a in n.set_round_limit(limit, 0)]
        actions += [(n.peer_id, a) for a in n.start(0)]
    deliver(nodes, actions)


def _live(node: Node) -> tuple[int, int]:
    return len(list(node.ledger.entries())), len(node.blobs)


def test_a_long_run_keeps_a_bounded_history_that_verifies(tmp_path: Path) -> None:
    nodes = [_node(i, tmp_path, horizon=6) for i in range(3)]
    _wire(nodes)
    _run(nodes, 20)
    at_20 = [_live(n) for n in nodes]
    _run(nodes, 60)
    at_60 = [_live(n) for n in nodes]
    for (entries_20, blobs_20), (entries_60, blobs_60) in zip(at_20, at_60, strict=True):
        assert entries_60 <= entries_20
        assert blobs_60 <= blobs_20
    for i, n in enumerate(nodes):
        compactions = list(n.ledger.entries(kinds.COMPACTION))
        assert compactions and compactions[-1].body["oldest"] == {"backbone": 54}  # (60 - 6)
        assert n.round_of("backbone") == 60 and n.storage()["oldest_round"] == 54
        n.ledger.close()
        assert verify_ledger(tmp_path / str(i) / "ledger.sqlite3").ok
        again = _node(i, tmp_path, horizon=6)  # a restart knows what is still forgettable
        assert again.storage()["oldest_round"] == 54
        again.ledger.close()


def test_exact_unlearning_inside_the_horizon_is_bit_identical_and_beyond_it_refused() -> None:
    horizon = 6
    nodes = [_node(i, None, horizon) for i in range(3)]
    _wire(nodes)
    _run(nodes, 12)  # pruned up to round 6 by now
    late = _node(3, None, horizon)  # a member who joins at round 12
    late.fast_forward(12)
    everyone = [*nodes, late]
    _wire(everyone)
    _run(everyone, 16)
    assert all(n.shaped_by("backbone", late.peer_id) for n in nodes)
    actions: list[tuple[str, object]] = []
    for n in nodes:
        actions += [(n.peer_id, a) for a in n.forget(late.peer_id, "exact", 0)]
    _wire(nodes)
    deliver(nodes, actions)
    _run(nodes, 16)

    never = [_node(i, None, horizon) for i in range(3)]  # the federation without the member
    _wire(never)
    _run(never, 16)
    for ours, theirs in zip(nodes, never, strict=True):
        assert torch.equal(ours.components["backbone"].flat, theirs.components["backbone"].flat)
        assert check_unlearning(ours.ledger.entries()) == []
    # node 0 was there from the start: its influence predates everything kept
    before = [n.components["backbone"].flat.clone() for n in nodes[1:]]
    for n in nodes[1:]:
        assert n.forget(nodes[0].peer_id, "exact", 0) == []
        failed = n.ledger.last(kinds.FORGET_FAILED)
        assert failed is not None and failed.body["target"] == nodes[0].peer_id
    assert all(torch.equal(n.components["backbone"].flat, b)
               for n, b in zip(nodes[1:], before, strict=True))


def test_over_the_byte_budget_no_new_round_starts(tmp_path: Path) -> None:
    nodes = [_node(i, tmp_path, horizon=4, max_bytes=1) for i in range(2)]
    _wire(nodes)
    _run(nodes, 10)
    # the first checkpoint finds the budget spent: the round after it never starts
    assert [n.round_of("backbone") for n in nodes] == [2, 2]
    assert all(n.idle() for n in nodes)
    for i, n in enumerate(nodes):
        n.ledger.close()
        assert verify_ledger(tmp_path / str(i) / "ledger.sqlite3").ok
