"""Mixing weights, spectral diagnostics and in-place mixing, against hand-computed values."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from gossip.errors import ConfigError, LocalError
from p2pfed import consensus
from p2pfed.consensus import (
    consensus_distance,
    effective_weights,
    mean_vector,
    metropolis_hastings_row,
    metropolis_hastings_weights,
    mix_into,
    mixing_report,
    rounds_to_epsilon_bound,
    slem,
    weight_matrix,
)


def test_mh_weights_path_of_three() -> None:
    graph = nx.path_graph(["a", "b", "c"])
    w = metropolis_hastings_weights(graph, ["a", "b", "c"])
    assert w == {
        "a": {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)},
        "b": {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3), "c": pytest.approx(1 / 3)},
        "c": {"b": pytest.approx(1 / 3), "c": pytest.approx(2 / 3)},
    }


def test_mh_weights_star() -> None:
    graph = nx.star_graph(3)  # centre 0, leaves 1..3
    w = metropolis_hastings_weights(graph, graph.nodes)
    assert w[0][0] == pytest.approx(1 / 4)
    for leaf in (1, 2, 3):
        assert w[0][leaf] == pytest.approx(1 / 4)
        assert w[leaf][0] == pytest.approx(1 / 4)
        assert w[leaf][leaf] == pytest.approx(3 / 4)
        assert set(w[leaf]) == {0, leaf}


@pytest.mark.parametrize("seed", range(8))
def test_mh_weights_symmetric_doubly_stochastic(seed: int) -> None:
    graph = nx.gnp_random_graph(20, 0.2, seed=seed)
    holders = [n for n in graph.nodes if (n * 7 + seed) % 5 != 0]
    w = metropolis_hastings_weights(graph, holders)
    order = sorted(w)
    matrix = weight_matrix(w, order)
    assert np.allclose(matrix, matrix.T, atol=1e-15)
    assert np.allclose(matrix.sum(axis=0), 1.0, atol=1e-12)
    assert np.allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    assert (matrix >= 0).all()


def test_holder_subgraph_excludes_non_holders() -> None:
    graph = nx.path_graph(["a", "b", "c", "d"])
    w = metropolis_hastings_weights(graph, ["a", "b", "d", "z"])
    assert set(w) == {"a", "b", "d", "z"}
    assert all("c" not in row for row in w.values())
    # a-b is an edge of the holder subgraph (degrees 1 and 1); d and z are isolated holders
    assert w["a"] == {"a": 0.5, "b": 0.5}
    assert w["b"] == {"a": 0.5, "b": 0.5}
    assert w["d"] == {"d": 1.0}
    assert w["z"] == {"z": 1.0}


def test_mh_rejects_directed_graphs() -> None:
    with pytest.raises(ConfigError):
        metropolis_hastings_weights(nx.DiGraph([(1, 2)]), [1, 2])


def test_weight_matrix_needs_every_node() -> None:
    w = metropolis_hastings_weights(nx.path_graph(3), range(3))
    with pytest.raises(ConfigError):
        weight_matrix(w, [0, 1])
    with pytest.raises(ConfigError):
        weight_matrix(w, [0, 1, 1])


def test_slem_ring_16_matches_closed_form() -> None:
    n = 16
    w = metropolis_hastings_weights(nx.cycle_graph(n), range(n))
    matrix = weight_matrix(w, list(range(n)))
    assert np.allclose(np.diag(matrix), 1 / 3)
    eigen = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(n)]
    expected = sorted((abs(e) for e in eigen), reverse=True)[1]
    assert expected == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / n))
    assert slem(matrix) == pytest.approx(expected, abs=1e-12)


def test_slem_edge_cases() -> None:
    two_parts = nx.Graph([(0, 1), (2, 3)])
    w = metropolis_hastings_weights(two_parts, range(4))
    assert slem(weight_matrix(w, list(range(4)))) == 1.0
    assert slem(np.ones((1, 1))) == 0.0
    complete = metropolis_hastings_weights(nx.complete_graph(4), range(4))
    assert slem(weight_matrix(complete, list(range(4)))) == 0.0
    # a non-symmetric stochastic matrix goes through the general eigen solver
    assert slem(np.array([[0.5, 0.5], [0.25, 0.75]])) == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        slem(np.ones((2, 3)))


def test_rounds_to_epsilon_bound() -> None:
    assert rounds_to_epsilon_bound(0.5) == math.ceil(math.log(1e-6) / math.log(0.5)) == 20
    assert rounds_to_epsilon_bound(0.1, eps=1e-3) == 3
    assert rounds_to_epsilon_bound(0.0) == 1
    assert rounds_to_epsilon_bound(1.0) is None
    assert rounds_to_epsilon_bound(1.2) is None
    with pytest.raises(ConfigError):
        rounds_to_epsilon_bound(0.5, eps=0.0)
    with pytest.raises(ConfigError):
        rounds_to_epsilon_bound(-0.1)


def test_ring_256_rounds_match_the_design_figure() -> None:
    report = mixing_report(nx.cycle_graph(256), range(256))
    assert report["nodes"] == 256
    rounds = report["rounds_to_eps"]
    assert isinstance(rounds, int)
    assert abs(rounds - 68_800) / 68_800 < 0.001


def test_mixing_reaches_epsilon_within_the_bound() -> None:
    graph = nx.cycle_graph(8)
    w = metropolis_hastings_weights(graph, graph.nodes)
    matrix = weight_matrix(w, list(range(8)))
    eps = 1e-6
    rounds = rounds_to_epsilon_bound(slem(matrix), eps)
    assert rounds is not None
    x = np.random.default_rng(0).normal(size=(8, 5))
    start = np.linalg.norm(x - x.mean(axis=0))
    for _ in range(rounds):
        x = matrix @ x
    assert np.linalg.norm(x - x.mean(axis=0)) <= eps * start


def test_effective_weights_missing_neighbour_goes_to_self() -> None:
    row = {"s": 0.4, "a": 0.25, "b": 0.35}
    assert effective_weights("s", row, {"a", "b"}) == (0.4, [("a", 0.25), ("b", 0.35)])
    self_w, used = effective_weights("s", row, {"a", "x"})
    assert self_w == pytest.approx(0.75)
    assert used == [("a", 0.25)]
    self_w, used = effective_weights("s", row, set())
    assert self_w == pytest.approx(1.0)
    assert used == []
    # sorted by str: "10" < "9"
    _, ordered = effective_weights(1, {1: 0.4, 9: 0.3, 10: 0.3}, {9, 10})
    assert [n for n, _ in ordered] == [10, 9]


def _mix_round(
    weights: dict[int, dict[int, float]],
    states: dict[int, torch.Tensor],
    missing: set[tuple[int, int]],
) -> dict[int, torch.Tensor]:
    """One gossip round; ``(i, j)`` in ``missing`` means i did not get j's update."""
    new = {}
    for node, row in weights.items():
        present = {j for j in row if (node, j) not in missing}
        self_w, used = effective_weights(node, row, present)
        out = torch.empty_like(states[node])
        mix_into(out, [(self_w, states[node])] + [(w, states[j]) for j, w in used])
        new[node] = out
    return new


def test_mixing_preserves_the_mean_and_contracts() -> None:
    graph = nx.random_regular_graph(3, 10, seed=1)
    w = metropolis_hastings_weights(graph, graph.nodes)
    gen = torch.Generator().manual_seed(0)
    states = {n: torch.randn(50, generator=gen, dtype=torch.float64) for n in graph.nodes}
    mean = mean_vector(list(states.values()))
    before = consensus_distance(list(states.values()))

    mixed = _mix_round(w, states, missing=set())
    assert torch.allclose(mean_vector(list(mixed.values())), mean, atol=1e-12)
    assert consensus_distance(list(mixed.values())) < before

    # a link that fails both ways keeps the effective matrix doubly stochastic: mean preserved
    i, j = next(iter(graph.edges))
    dropped = _mix_round(w, states, missing={(i, j), (j, i)})
    assert torch.allclose(mean_vector(list(dropped.values())), mean, atol=1e-12)
    # one-way loss: every node still takes a convex combination (constants stay constant)
    ones = {n: torch.ones(4, dtype=torch.float64) for n in graph.nodes}
    lossy = _mix_round(w, ones, missing={(i, j)})
    assert all(torch.allclose(v, torch.ones(4, dtype=torch.float64)) for v in lossy.values())


def test_mix_into_by_hand() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([4.0, 5.0, 6.0])
    z = torch.tensor([0.0, 10.0, -10.0])
    out = torch.empty(3)
    assert mix_into(out, [(0.25, x), (0.5, y), (0.25, z)]) is out
    assert out.tolist() == [2.25, 5.5, 1.25]
    # mixing into self (aliasing the first term) is allowed
    mix_into(x, [(0.5, x), (0.5, y)])
    assert x.tolist() == [2.5, 3.5, 4.5]


def test_mix_into_chunks_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consensus, "MIX_CHUNK_ELEMENTS", 7)
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=100) for _ in range(4)]
    ws = [0.1, 0.2, 0.3, 0.4]
    out = torch.empty(100, dtype=torch.float64)
    mix_into(out, [(w, torch.from_numpy(x)) for w, x in zip(ws, xs, strict=True)])
    expected = sum(w * x for w, x in zip(ws, xs, strict=True))
    assert np.allclose(out.numpy(), expected, atol=1e-14)


def test_mix_into_rejects_misuse() -> None:
    x = torch.ones(6)
    y = torch.ones(6)
    with pytest.raises(LocalError):
        mix_into(x, [])
    with pytest.raises(LocalError):
        mix_into(x, [(0.5, y), (0.5, x)])  # output aliases a later term
    buf = torch.zeros(10)
    with pytest.raises(LocalError):
        mix_into(buf[:6], [(1.0, buf[4:10])])  # partial overlap
    with pytest.raises(LocalError):
        mix_into(x, [(1.0, torch.ones(5))])
    with pytest.raises(LocalError):
        mix_into(x, [(1.0, torch.ones(6, dtype=torch.float64))])
    with pytest.raises(LocalError):
        mix_into(x, [(1.0, torch.ones(12)[::2])])


def test_consensus_distance_and_mean_against_numpy() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 33)).astype(np.float32)
    states = [torch.from_numpy(row.copy()) for row in x]
    x64 = x.astype(np.float64)
    expected = np.linalg.norm(x64 - x64.mean(axis=0))
    assert consensus_distance(states) == pytest.approx(expected, rel=1e-12)
    mean = mean_vector(states)
    assert mean.dtype == torch.float32
    assert np.allclose(mean.numpy(), x64.mean(axis=0), atol=1e-7)
    assert mean_vector(states, dtype=torch.float64).dtype == torch.float64
    assert consensus_distance([states[0], states[0].clone()]) == 0.0
    with pytest.raises(LocalError):
        consensus_distance([])
    with pytest.raises(LocalError):
        mean_vector([torch.ones(2), torch.ones(3)])


def test_one_row_is_the_full_matrix_row_for_any_holder_set() -> None:
    import random

    rng = random.Random(7)
    for n in (2, 9, 40):
        graph = nx.random_regular_graph(4, n, seed=n) if n > 4 else nx.complete_graph(n)
        holders = {v for v in graph if rng.random() < 0.7} | {0}
        full = metropolis_hastings_weights(graph, holders)
        for node in holders:
            assert metropolis_hastings_row(graph, holders, node) == full[node]
            assert list(metropolis_hastings_row(graph, holders, node)) == list(full[node])
