"""Gossip averaging math: mixing weights, spectral diagnostics, in-place mixing.

Everything here is a pure function (no I/O, no clock).  Per component, the nodes that hold it
form a subgraph of the overlay; mixing weights are Metropolis–Hastings on that subgraph::

    W[i][j] = 1 / (1 + max(d_i, d_j))   for each edge {i, j}   (degrees in the holder subgraph)
    W[i][i] = 1 - sum_j W[i][j]

which is symmetric and doubly stochastic, so repeated mixing converges to the plain average at
a rate set by the second largest eigenvalue modulus (SLEM) of ``W``: after ``t`` rounds the
consensus error shrinks at least like ``SLEM**t``.  A neighbour whose update misses the round
deadline gives its weight back to self (:func:`effective_weights`), which keeps each row a convex
combination.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple, TypeVar

import networkx as nx
import numpy as np
import numpy.typing as npt
import torch

from gossip.errors import ConfigError, LocalError

logger = logging.getLogger(__name__)

N = TypeVar("N", bound=Hashable)

SPECTRAL_TOLERANCE = 1e-12
MIX_CHUNK_ELEMENTS = 1 << 21


def _node_key(node: Hashable) -> str:
    return str(node)


def metropolis_hastings_row(graph: nx.Graph, holders: Collection[N], node: N) -> dict[N, float]:
    """``node``'s row of :func:`metropolis_hastings_weights` (the same numbers), from its
    neighbours' degrees alone: O(degree²), whatever the size of the graph."""
    if graph.is_directed():
        raise ConfigError("mixing weights need an undirected overlay graph")

    def held(n: N) -> list[N]:
        adjacent = graph.adj[n] if n in graph else {}
        return sorted((m for m in adjacent if m in holders and m != n), key=_node_key)

    mine = held(node)
    row = {other: 1.0 / (1 + max(len(mine), len(held(other)))) for other in mine}
    return {node: 1.0 - math.fsum(row.values()), **row}


def metropolis_hastings_weights(graph: nx.Graph, holders: Iterable[N]) -> dict[N, dict[N, float]]:
    """Metropolis–Hastings weights on the subgraph of ``graph`` induced by ``holders``.

    A holder absent from ``graph`` (or without holder neighbours) keeps weight 1 on itself.
    Rows and entries are ordered by ``str(node)`` so results are deterministic.
    """
    if graph.is_directed():
        raise ConfigError("mixing weights need an undirected overlay graph")
    members = sorted(set(holders), key=_node_key)
    member_set = set(members)
    neighbours: dict[N, list[N]] = {}
    for node in members:
        adjacent = graph.adj[node] if node in graph else {}
        neighbours[node] = sorted(
            (m for m in adjacent if m in member_set and m != node), key=_node_key
        )
    degree = {node: len(adj) for node, adj in neighbours.items()}
    weights: dict[N, dict[N, float]] = {}
    for node in members:
        row: dict[N, float] = {}
        for other in neighbours[node]:
            row[other] = 1.0 / (1 + max(degree[node], degree[other]))
        self_weight = 1.0 - math.fsum(row.values())
        weights[node] = {node: self_weight, **row}
    return weights


def weight_matrix(
    weights: Mapping[N, Mapping[N, float]], order: Sequence[N]
) -> npt.NDArray[np.float64]:
    """Dense matrix of ``weights``, rows and columns in ``order`` (which lists every node)."""
    index = {node: i for i, node in enumerate(order)}
    if len(index) != len(order) or set(index) != set(weights):
        raise ConfigError("order must list every node of the weights exactly once")
    matrix = np.zeros((len(order), len(order)), dtype=np.float64)
    for node, row in weights.items():
        for other, value in row.items():
            if other not in index:
                raise ConfigError(f"weight row {node!r} names unknown node {other!r}")
            matrix[index[node], index[other]] = value
    return matrix


def slem(matrix: npt.ArrayLike) -> float:
    """Second largest eigenvalue modulus of a stochastic matrix.

    1.0 when the graph is disconnected (eigenvalue 1 is repeated), 0.0 for a single node.
    Values within 1e-12 of 0 or 1 snap to them so the rounds bound is stable.
    """
    w = np.asarray(matrix, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ConfigError(f"expected a square matrix, got shape {w.shape}")
    if w.shape[0] <= 1:
        return 0.0
    if np.allclose(w, w.T, rtol=0.0, atol=1e-12):
        moduli = np.abs(np.linalg.eigvalsh(w))
    else:
        moduli = np.abs(np.linalg.eigvals(w))
    moduli = np.sort(moduli)[::-1]
    value = float(moduli[1])
    if abs(value - 1.0) < SPECTRAL_TOLERANCE:
        return 1.0
    if value < SPECTRAL_TOLERANCE:
        return 0.0
    return value


def spectral_gap(matrix: npt.ArrayLike) -> float:
    """``1 - slem(matrix)``."""
    return 1.0 - slem(matrix)


def rounds_to_epsilon_bound(slem_value: float, eps: float = 1e-6) -> int | None:
    """Rounds ``t`` after which ``slem**t <= eps``: ``ceil(ln eps / ln slem)``.

    ``None`` when ``slem >= 1`` (no convergence guarantee), 1 when ``slem == 0``.
    """
    if not 0.0 < eps < 1.0:
        raise ConfigError(f"eps must be in (0, 1), got {eps}")
    if slem_value < 0.0 or math.isnan(slem_value):
        raise ConfigError(f"slem must be non-negative, got {slem_value}")
    if slem_value >= 1.0:
        return None
    if slem_value == 0.0:
        return 1
    return max(1, math.ceil(math.log(eps) / math.log(slem_value)))


def effective_weights(
    self_id: N, row: Mapping[N, float], present: Collection[N]
) -> tuple[float, list[tuple[N, float]]]:
    """This round's weights: a neighbour whose update is not ``present`` gives its weight to self.

    Returns ``(self_weight, [(neighbour, weight), ...])`` with neighbours sorted by ``str`` so
    the order of the float sums is deterministic.
    """
    self_weight = row.get(self_id, 0.0)
    used: list[tuple[N, float]] = []
    missing = 0.0
    for node in sorted(row, key=_node_key):
        if node == self_id:
            continue
        if node in present:
            used.append((node, row[node]))
        else:
            missing += row[node]
    return self_weight + missing, used


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def mix_into(out: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``out = sum_k w_k * x_k`` in place, on flat contiguous buffers.

    ``out`` may be the first term's tensor (mix into self) but must not overlap any other term.
    Works in cache-sized chunks so ``out`` is written to memory once, whatever the number of
    terms.
    """
    if not terms:
        raise LocalError("mix_into needs at least one term")
    if not out.is_contiguous():
        raise LocalError("mix_into output must be contiguous")
    for k, (_, x) in enumerate(terms):
        if x.numel() != out.numel() or x.dtype != out.dtype or x.device != out.device:
            raise LocalError(
                f"term {k}: {x.numel()} x {x.dtype} on {x.device} does not match output "
                f"{out.numel()} x {out.dtype} on {out.device}"
            )
        if not x.is_contiguous():
            raise LocalError(f"term {k} is not contiguous")
        if k == 0 and x.data_ptr() == out.data_ptr():
            continue
        if out.numel() and _overlaps(out, x):
            raise LocalError(f"mix_into output overlaps term {k}")
    flat_out = out.view(-1)
    flats = [(float(w), x.detach().view(-1)) for w, x in terms]
    n = flat_out.numel()
    with torch.no_grad():
        for start in range(0, max(n, 1), MIX_CHUNK_ELEMENTS):
            stop = min(start + MIX_CHUNK_ELEMENTS, n)
            chunk = flat_out[start:stop]
            w0, x0 = flats[0]
            torch.mul(x0[start:stop], w0, out=chunk)
            for w, x in flats[1:]:
                chunk.add_(x[start:stop], alpha=w)
    return out


def _as_float64_rows(states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not states:
        raise LocalError("need at least one state")
    numel = states[0].numel()
    if any(s.numel() != numel for s in states):
        raise LocalError("all states must have the same number of elements")
    return [s.detach().reshape(-1) for s in states]


def mean_vector(
    states: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Elementwise mean of ``states``, accumulated in float64 (returned as ``dtype``, default
    the first state's dtype)."""
    rows = _as_float64_rows(states)
    total = torch.zeros(rows[0].numel(), dtype=torch.float64)
    for row in rows:
        total.add_(row)
    total.div_(len(rows))
    return total.to(dtype or states[0].dtype)


def consensus_distance(states: Sequence[torch.Tensor]) -> float:
    """Frobenius norm ``||X - 1 mean^T||_F`` of the stacked states, computed in float64."""
    rows = _as_float64_rows(states)
    mean = mean_vector(rows, dtype=torch.float64)
    squares = 0.0
    for row in rows:
        diff = row.to(torch.float64) - mean
        squares += float(torch.dot(diff, diff))
    return math.sqrt(squares)


def mixing_report(
    graph: nx.Graph, holders: Iterable[N], eps: float = 1e-6
) -> dict[str, float | int | None]:
    """Spectral summary of MH mixing among ``holders``: size, SLEM, gap, rounds bound."""
    weights = metropolis_hastings_weights(graph, holders)
    order = list(weights)
    value = slem(weight_matrix(weights, order))
    return {
        "nodes": len(order),
        "slem": value,
        "spectral_gap": 1.0 - value,
        "rounds_to_eps": rounds_to_epsilon_bound(value, eps),
    }


#: aggregation rules a component can use (``NodeConfig.robust``)
RULES = ("mh", "clipped", "trimmed-mean", "noise-aware")  # (p2pfed.mixing: one class each)

#: noise-aware mixing: the largest trust factor of a member that declares little (or no) noise,
#: relative to the median member of the neighbourhood...
NOISE_CAP = 4.0
#: ...and the largest multiple of its Metropolis–Hastings weight a neighbour ends up with
SHARE_CAP = 2.0


def noise_factor(noise: float, reference: float, between: float = 0.0) -> float:
    """Trust of a state released with Gaussian noise of std ``noise``, relative to one released
    with ``reference``: the random-effects inverse-variance ratio
    ``(between + reference²) / (between + noise²)``, at most :data:`NOISE_CAP`.

    ``between`` is the variance per coordinate by which members' states differ for other
    reasons than noise (their data): noise well below it changes little, noise well above it
    counts fully.  Claiming more noise than the reference only lowers a member's own weight
    (to 0 when everything else is noise-free); claiming less raises it by at most the cap.
    """
    num, den = between + reference * reference, between + noise * noise
    if den <= 0.0:
        return 1.0 if num <= 0.0 else NOISE_CAP
    return min(NOISE_CAP, num / den)


def heterogeneity(own: torch.Tensor, others: Sequence[tuple[float, torch.Tensor]],
                  own_noise: float) -> float:
    """Variance per coordinate between this node's state and its neighbours' beyond their
    declared noise: ``median_j (‖x_j − x_i‖² / n − s_i² − s_j²) / 2``, at least 0 (and
    ``inf`` when the states are too far apart to measure in float64).

    ``others`` are ``(declared noise std, state)``.  (``‖x_j − x_i‖² / n`` has expectation
    ``2τ² + s_i² + s_j²`` when members differ by τ² and add their own noise.)
    """
    if not others or own.numel() == 0:
        return 0.0
    own64 = own.to(torch.float64)
    excess = [float(torch.sum((x.to(torch.float64) - own64) ** 2)) / own.numel()
              - own_noise * own_noise - s * s for s, x in others]
    median = float(np.median(excess))
    return max(0.0, median / 2) if not math.isnan(median) else math.inf


def noise_aware_weights(
    self_weight: float, self_noise: float, terms: Sequence[tuple[float, float]],
    between: float = 0.0,
) -> tuple[float, list[float]]:
    """Reweight one row of mixing weights by declared noise.

    ``terms`` are ``(weight, declared noise std)`` per neighbour, ``between`` the
    :func:`heterogeneity` of the neighbourhood.  Each weight is scaled by :func:`noise_factor`
    against the median noise declared by self and the neighbours (self's own weight is left as
    it is when it adds no noise: it only mixes this component), and the row is renormalised.
    Then no neighbour keeps more than ``SHARE_CAP`` times its plain weight; the excess stays
    with self (for a lone neighbour of weight ½ that is no bound).  Declared noise cannot be
    checked, so this bounds what a member gains by claiming less than it adds; it is no
    defence against members that lie otherwise (see :func:`clipped_gossip`).  With equal
    noise everywhere it is plain Metropolis–Hastings; otherwise the matrix is row- but no
    longer column-stochastic, so the federation agrees on an average that leans towards its
    quieter members.
    """
    noises = [self_noise, *(s for _, s in terms)]
    if any(not math.isfinite(s) or s < 0.0 for s in noises) or between < 0.0:
        raise LocalError("declared noise must be finite and non-negative")
    if not math.isfinite(between):  # members differ beyond measure: noise does not matter
        return self_weight, [w for w, _ in terms]
    scale = max(noises) or 1.0  # (the factors are ratios: keep the squares within float64)
    noises = [s / scale for s in noises]
    self_noise, between = noises[0], between / (scale * scale)
    reference = float(np.median(noises))
    scaled = [self_weight * (noise_factor(self_noise, reference, between)
                             if self_noise > 0.0 else 1.0)]
    scaled += [w * noise_factor(s, reference, between)
               for (w, _), s in zip(terms, noises[1:], strict=True)]
    total = math.fsum(scaled)
    if total <= 0.0:  # (only with a self weight of 0)
        return 1.0, [0.0] * len(terms)
    own = scaled[0] / total
    row = []
    for (w, _), x in zip(terms, scaled[1:], strict=True):
        share = min(x / total, SHARE_CAP * w)
        own += x / total - share
        row.append(share)
    return own, row


#: clipped gossip's adaptive radius: CLIP_FACTOR times this quantile of the neighbours' distances
CLIP_QUANTILE = 0.5
CLIP_FACTOR = 2.0
#: ...but never below this share of the previous round's radius, so it shrinks by at most 5 %
#: a round
CLIP_MEMORY = 0.95


def clip_radius(distances: Sequence[float], previous: float = 0.0) -> float:
    """The adaptive radius: twice the median distance to the neighbours (the lower median, so
    with three neighbours it is set by the middle one and one outlier cannot stretch it), and at
    least ``CLIP_MEMORY * previous``.

    Without the memory a group of nodes that has agreed among itself sets a radius that shuts
    out its other neighbours, and the federation freezes in parts (seen on small-world-32
    without any attacker); with it the radius follows the distances down only as fast as
    averaging can bring the groups together.
    """
    median = float(np.quantile(distances, CLIP_QUANTILE, method="lower")) if distances else 0.0
    return max(CLIP_FACTOR * median, CLIP_MEMORY * previous)


class Clipped(NamedTuple):
    state: torch.Tensor
    radius: float
    left_out: list[int]  # indices into the terms


def clipped_gossip(own: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]],
                   radius: float | None = None, previous: float = 0.0) -> Clipped:
    """Clipped gossip with a hard clip: ``own + Σ w_j · (x_j − own)`` over the neighbours
    within distance τ of this node; a difference longer than τ is clipped to nothing this round
    (its weight stays with self).  τ is ``radius`` if given, else :func:`clip_radius` of the
    distances and the ``previous`` round's τ.  Returns the new state, τ and who was left out.

    A neighbour therefore moves the node by at most ``w_j · τ``, and only while it stays about
    as close as honest neighbours are: while more than half of the neighbours are honest the
    median is an honest distance (with an even count, half of them suffice to set it).
    Clipping a far neighbour to τ instead (classic ClippedGossip) lets it pull by ``w_j · τ``
    every round, always the same way, which adds up: on the education workload with three
    sign-flippers that left digits at 0.42 against 0.89 without them.  A difference too large
    for float64 (infinite norm) is always left out and does not count towards τ.
    """
    own64 = own.to(torch.float64)
    diffs = [(w, x.to(torch.float64) - own64) for w, x in terms]
    norms = [float(torch.linalg.vector_norm(d)) for _, d in diffs]
    tau = radius if radius is not None else clip_radius(
        [n for n in norms if math.isfinite(n)], previous if math.isfinite(previous) else 0.0)
    out = own64.clone()
    left_out = []
    for i, ((w, d), norm) in enumerate(zip(diffs, norms, strict=True)):
        if norm <= tau and math.isfinite(norm):
            out += w * d
        else:
            left_out.append(i)
    return Clipped(out, tau, left_out)


def clipped_weights(self_weight: float, weights: Sequence[float],
                    left_out: Collection[int]) -> tuple[float, list[float]]:
    """The linear weights :func:`clipped_gossip`'s state equals: a neighbour left out (by index
    into ``weights``) weighs 0 and its weight stays with self.  (The state, ``own + Σ_kept w_j ·
    (x_j − own)``, is ``(1 − Σ_kept w_j) · own + Σ_kept w_j · x_j``; with a row that sums to 1
    that self weight is ``self_weight + Σ_left w_j``, and nothing left out gives the row back.)
    """
    kept = [0.0 if i in left_out else w for i, w in enumerate(weights)]
    return self_weight + math.fsum(w for i, w in enumerate(weights) if i in left_out), kept


class Trimmed(NamedTuple):
    state: torch.Tensor
    weights: list[float]  # per input, in input order: its share of the values kept
    exact: bool  # the state is exactly the sum of the inputs by these weights


def trimmed_mean_weights(states: Sequence[torch.Tensor], trim: int) -> Trimmed:
    """:func:`trimmed_mean`, and each input's share of it: ``ω_j = c_j / (d · (n − 2t))``,
    ``c_j`` the number of the ``d`` coordinates where input ``j`` lies in the kept band.

    The ω sum to 1.  A trimmed mean is no linear combination of its inputs (each coordinate
    keeps its own set), so ω is exact only when every input is kept in all coordinates or in
    none (then the state is the plain mean of those kept), or when nothing is trimmed.  Ties
    go by input order (a stable sort): of equal values the earlier input ranks lower.
    """
    stacked = torch.stack([s.to(torch.float64) for s in states])
    n, d = stacked.shape[0], stacked[0].numel()
    trim = min(trim, (n - 1) // 2)
    if trim <= 0 or d == 0:  # (the plain mean; an empty state is any mix of the inputs)
        state = stacked.mean(dim=0) if trim <= 0 else stacked[trim:n - trim].mean(dim=0)
        return Trimmed(state, [1.0 / n] * n, True)
    ordered = torch.sort(stacked, dim=0, stable=True)
    counts = torch.bincount(ordered.indices[trim:n - trim].reshape(-1), minlength=n).tolist()
    kept = d * (n - 2 * trim)
    return Trimmed(ordered.values[trim:n - trim].mean(dim=0), [c / kept for c in counts],
                   all(c in (0, d) for c in counts))


def trimmed_mean(states: Sequence[torch.Tensor], trim: int) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``trim`` largest and smallest values."""
    return trimmed_mean_weights(states, trim).state
