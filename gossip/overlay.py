"""Deterministic overlay: every member computes the same neighbour graph, no coordinator.

Members sit on a ring ordered by ``H(federation id ‖ key)`` (so the order is unrelated to when
they joined), and each adds ``(k − 2) / 2`` chords chosen by rendezvous hashing: member ``a``'s
``j``-th chord goes to the member ``b`` minimising ``H(federation id ‖ a ‖ j ‖ b)``.  A ring plus
random chords is an expander with high probability (SLEM far below a plain ring's), and removing
a member only moves the edges that touched it.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import networkx as nx

from gossip.envelope import digest


def _rank(federation_id: bytes, key: bytes) -> bytes:
    return digest(b"p2pfed/v1/overlay\0" + federation_id + key)


def overlay_graph(federation_id: bytes, members: Iterable[bytes], k: int = 4) -> nx.Graph:
    """The overlay on ``members`` (public keys) with degree about ``k``."""
    order = sorted(set(members), key=lambda m: _rank(federation_id, m))
    g: nx.Graph = nx.Graph()
    g.add_nodes_from(order)
    n = len(order)
    if n <= k + 1:
        g.add_edges_from((a, b) for i, a in enumerate(order) for b in order[i + 1 :])
        return g
    g.add_edges_from(zip(order, order[1:] + order[:1], strict=True))
    chords = max(0, (k - 2) // 2)
    for a in order:
        for j in range(chords):
            salt = federation_id + a + bytes([j])
            candidates = [b for b in order if b != a and not g.has_edge(a, b)]
            if candidates:
                g.add_edge(a, min(candidates, key=lambda b: digest(salt + b)))
    return g


def neighbours(graph: nx.Graph, key: bytes) -> list[bytes]:
    return sorted(graph.neighbors(key)) if key in graph else []


def holder_subgraph(graph: nx.Graph, holders: Iterable[bytes]) -> nx.Graph:
    """The overlay induced on a component's holders, bridged so that it is connected.

    Holders of a component mix only with each other; when the overlay restricted to them falls
    apart, consecutive pieces (ordered by their smallest key) are joined by one extra edge, an
    extra connection the holders open for that component.
    """
    sub = nx.Graph(graph.subgraph(h for h in holders if h in graph))
    pieces = sorted((sorted(c) for c in nx.connected_components(sub)), key=lambda c: c[0])
    for left, right in pairwise(pieces):
        sub.add_edge(left[0], right[0])
    return sub
