"""The deterministic overlay: same graph everywhere, connected, expander-like, stable."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from gossip.envelope import digest
from gossip.overlay import holder_subgraph, neighbours, overlay_graph
from p2pfed.consensus import metropolis_hastings_weights, slem, weight_matrix

FED = b"F" * 32


def keys(n: int) -> list[bytes]:
    return [digest(bytes([i % 256, i // 256])) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5, 6, 16, 64])
def test_connected_and_deterministic(n: int) -> None:
    ks = keys(n)
    g = overlay_graph(FED, ks, k=4)
    assert nx.is_connected(g) and set(g.nodes) == set(ks)
    assert nx.utils.graphs_equal(g, overlay_graph(FED, list(reversed(ks)), k=4))
    if n > 5:
        degrees = [d for _, d in g.degree]
        assert min(degrees) >= 2 and np.mean(degrees) == pytest.approx(4, abs=0.3)
    assert neighbours(g, ks[0]) == sorted(g.neighbors(ks[0]))


def test_mixes_much_faster_than_a_ring() -> None:
    ks = keys(64)
    g = overlay_graph(FED, ks, k=4)
    lam = slem(weight_matrix(metropolis_hastings_weights(g, ks), ks))
    ring = nx.cycle_graph(ks)
    lam_ring = slem(weight_matrix(metropolis_hastings_weights(ring, ks), ks))
    assert lam < 0.9 < lam_ring
    assert np.log(1e-6) / np.log(lam) < np.log(1e-6) / np.log(lam_ring) / 10


def test_removing_a_member_changes_few_edges() -> None:
    ks = keys(64)
    before = overlay_graph(FED, ks, k=4)
    after = overlay_graph(FED, ks[1:], k=4)
    kept = {frozenset(e) for e in before.edges if ks[0] not in e}
    now = {frozenset(e) for e in after.edges}
    assert len(kept - now) + len(now - kept) <= 8


def test_holder_subgraph_is_bridged() -> None:
    ks = keys(32)
    g = overlay_graph(FED, ks, k=4)
    holders = ks[::3]
    sub = holder_subgraph(g, holders)
    assert set(sub.nodes) == set(holders) and nx.is_connected(sub)
