"""The deterministic overlay: same graph everywhere, connected, expander-like, stable."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from gossip.envelope import digest
from gossip.overlay import holder_subgraph, neighbours, overlay_graph

FED = b"F" * 32


def keys(n: int, salt: bytes = b"") -> list[bytes]:
    return [digest(salt + i.to_bytes(4, "big")) for i in range(n)]


def slem(graph: nx.Graph) -> float:
    """SLEM of the Metropolis–Hastings weights of ``graph`` (computed here, not imported)."""
    nodes = sorted(graph.nodes)
    index = {v: i for i, v in enumerate(nodes)}
    w = np.zeros((len(nodes), len(nodes)))
    for u, v in graph.edges:
        w[index[u], index[v]] = w[index[v], index[u]] = 1 / (
            1 + max(graph.degree[u], graph.degree[v]))
    w[np.diag_indices_from(w)] = 1 - w.sum(axis=1)
    assert np.allclose(w, w.T) and np.allclose(w.sum(axis=1), 1) and (w >= 0).all()
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))
    return float(eig[-2])


def edges(graph: nx.Graph) -> set[frozenset[bytes]]:
    return {frozenset(e) for e in graph.edges}


def test_connected_deterministic_and_order_free_for_every_size() -> None:
    for n in range(2, 65):
        ks = keys(n)
        g = overlay_graph(FED, ks, k=4)
        assert set(g.nodes) == set(ks) and nx.is_connected(g), n
        again = overlay_graph(FED, [*reversed(ks), ks[0]], k=4)  # order and duplicates
        assert edges(again) == edges(g), n
        if n <= 5:
            assert g.number_of_edges() == n * (n - 1) // 2  # small: complete


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 8])
def test_degree_is_close_to_k(k: int) -> None:
    g = overlay_graph(FED, keys(128), k=k)
    degrees = [d for _, d in g.degree]
    assert abs(np.mean(degrees) - k) <= 0.5
    assert min(degrees) >= 2 and max(degrees) <= 3 * k
    if k == 2:
        assert all(d == 2 for d in degrees)  # a plain ring


def test_other_federation_other_graph() -> None:
    ks = keys(32)
    assert edges(overlay_graph(FED, ks)) != edges(overlay_graph(b"G" * 32, ks))


def test_neighbours() -> None:
    ks = keys(16)
    g = overlay_graph(FED, ks)
    assert neighbours(g, ks[3]) == sorted(g.neighbors(ks[3]))
    assert neighbours(g, b"x" * 32) == []
    with pytest.raises(ValueError, match="at least 2"):
        overlay_graph(FED, ks, k=1)


def test_mixes_much_faster_than_a_ring() -> None:
    ks = keys(64)
    lam = slem(overlay_graph(FED, ks, k=4))
    lam_ring = slem(nx.cycle_graph(ks))
    assert lam < 0.92 and lam_ring > 0.99
    rounds, rounds_ring = np.log(1e-6) / np.log(lam), np.log(1e-6) / np.log(lam_ring)
    assert rounds * 10 < rounds_ring


def test_removing_a_member_changes_few_edges() -> None:
    ks = keys(64)
    before = overlay_graph(FED, ks, k=4)
    for gone in ks[:16]:
        after = overlay_graph(FED, [m for m in ks if m != gone], k=4)
        kept = {e for e in edges(before) if gone not in e}
        assert len(kept ^ edges(after)) <= 8


def test_adding_a_member_changes_few_edges() -> None:
    ks = keys(65)
    before, after = overlay_graph(FED, ks[:-1]), overlay_graph(FED, ks)
    new = ks[-1]
    assert len(edges(before) ^ {e for e in edges(after) if new not in e}) <= 8


@pytest.mark.parametrize(("n", "step"), [(8, 2), (32, 3), (64, 2), (64, 5), (64, 16)])
def test_holder_subgraph_connected_and_fast(n: int, step: int) -> None:
    ks = keys(n)
    g = overlay_graph(FED, ks, k=4)
    holders = ks[::step]
    sub = holder_subgraph(g, [*holders, b"not-a-member" * 3])
    assert set(sub.nodes) == set(holders) and nx.is_connected(sub)
    assert edges(g.subgraph(holders)) <= edges(sub)  # direct overlay links are kept
    assert edges(holder_subgraph(g, list(reversed(holders)))) == edges(sub)
    if len(holders) > 8:
        assert slem(sub) < 0.95


def test_holder_subgraph_of_everyone_adds_nothing() -> None:
    ks = keys(40)
    g = overlay_graph(FED, ks)
    assert edges(holder_subgraph(g, ks)) == edges(g)


def test_holder_overlay_beats_bridging_only() -> None:
    ks = keys(64)
    g = overlay_graph(FED, ks, k=4)
    holders = ks[::3]
    bridged = holder_subgraph(g, holders, k=0)
    assert nx.is_connected(bridged)
    assert slem(holder_subgraph(g, holders)) < slem(bridged) - 0.05


def test_plain_graph_is_bridged_between_consecutive_pieces() -> None:
    ks = sorted(keys(12))
    path = nx.path_graph(ks)  # no federation id: only bridging
    holders = [ks[i] for i in (0, 1, 4, 5, 6, 9, 11)]  # pieces {0,1} {4,5,6} {9} {11}
    sub = holder_subgraph(path, holders)
    assert nx.is_connected(sub)
    assert edges(sub) - edges(path) == {
        frozenset((ks[1], ks[4])), frozenset((ks[6], ks[9])), frozenset((ks[9], ks[11]))}
    assert list(holder_subgraph(path, []).nodes) == []
