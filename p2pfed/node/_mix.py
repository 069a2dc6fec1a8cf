"""A component's place in the overlay and its mix at the end of a round.

* :func:`placement`: from the overlay and the holders of a component, this node's mixing
  weights (Metropolis–Hastings on the holders' subgraph), its neighbours and the members its
  weights depend on (:func:`place_all`: for every component);
* :func:`mix_round`: the neighbours' updates that came in time, mixed into the component by
  its rule (:mod:`p2pfed.mixing`, which the node never looks inside), after stale states
  (this node's after a catch-up, a neighbour's that announced an age) are down-weighted by
  :func:`~p2pfed.mixing.stale_weights`; the ``mix`` record says what was used: the weights
  the rule returned, so those after down-weighting (``contribution`` records keep the
  Metropolis–Hastings weight of the sender, as before).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import networkx as nx
import torch

from p2pfed.consensus import effective_weights, metropolis_hastings_row
from p2pfed.journal import Mix, MixInputRef
from p2pfed.lineage import Lineage
from p2pfed.mixing import (
    MixingRule,
    MixInput,
    MixResult,
    Neighbour,
    leaned_weights,
    stale_weights,
)
from p2pfed.node._config import NodeConfig
from p2pfed.node._provenance import fields, received
from p2pfed.node._state import ComponentRound, Received
from p2pfed.provenance import PARTIAL, Provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a component sits in the overlay, for this node."""

    weights: dict[str, float]  # this node's Metropolis–Hastings row (itself included)
    neighbours: tuple[str, ...]
    #: members whose presence shapes the weights (within two hops)
    weight_deps: frozenset[str]


def placement(graph: nx.Graph, holders: Iterable[str], self_id: str) -> Placement:
    """This node's weights for a component held by ``holders`` over ``graph``."""
    members = {n for n in {*holders, self_id} if n in graph}
    if self_id not in members:
        return Placement({self_id: 1.0}, (), frozenset())
    row = metropolis_hastings_row(graph, members, self_id)
    # A weight w_ij depends on the degrees of i and j: on every holder within two hops.
    near = {m for p in row for m in graph.adj[p] if m in members}
    return Placement(row, tuple(sorted(p for p in row if p != self_id)),
                     frozenset(row.keys() | near))


def place_all(states: Mapping[str, ComponentRound], graph: nx.Graph,
              holders: Mapping[str, Iterable[str]], forgotten: Collection[str],
              self_id: str) -> tuple[nx.Graph, dict[str, frozenset[str]], dict[str, set[str]]]:
    """Place every component (forgotten members left out; a node itself forgotten mixes no
    more); the overlay and holders kept, and per component its new neighbours."""
    if self_id in forgotten:
        graph = nx.Graph()
    elif any(n in graph for n in forgotten):  # (else the caller's graph is used as it is)
        graph = graph.copy()
        graph.remove_nodes_from(forgotten)
    kept = {c: frozenset(h) - set(forgotten) for c, h in holders.items()}
    new: dict[str, set[str]] = {}
    for name, st in states.items():
        place = placement(graph, kept.get(name, ()), self_id)
        new[name] = set(place.neighbours) - set(st.neighbours)
        st.weights, st.neighbours = place.weights, place.neighbours
        st.weight_deps = Lineage.of(place.weight_deps)
    return graph, kept, new


@dataclass(frozen=True)
class MixOutcome:
    record: Mix
    present: tuple[str, ...]  # the neighbours whose updates were mixed
    missing: tuple[str, ...]  # those whose updates did not come in time


#: one work buffer per size and type for every node of the process: a mix runs start to end on
#: the event loop's thread, so no two mixes share one at once (and a simulation of a thousand
#: nodes keeps a few buffers, not one per node)
_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _scratch_like(flat: torch.Tensor) -> torch.Tensor:
    key = (flat.numel(), flat.dtype)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) >= 64:  # (bounded: a node has a handful of component sizes)
            _SCRATCH.clear()
        buf = _SCRATCH[key] = torch.empty_like(flat)
    return buf


def lean_of(config: NodeConfig, name: str, st: ComponentRound, epoch: int,
            private: bool, rule: MixingRule) -> tuple[float, float] | None:
    """``(lean, loss)`` when this round's mix leans on the node's loss
    (:func:`~p2pfed.mixing.leaned_weights`), asked once its training is done: only in a round
    the node trained, with the loss its trainer measured then, by ``[fairness] lean`` (in an
    unlearning re-run: the lean its live round recorded, whatever the settings are now).
    Never for a component under differential privacy (``private``: its loss is not released,
    and the state it mixes into is), in a catch-up (a stale state moves to its neighbours,
    :func:`~p2pfed.mixing.stale_weights`), or with a rule whose state ignores the weights."""
    if config.loss_of is None or not st.trained or private or st.age or not rule.uses_weights:
        return None
    lean = config.lean if st.replay is None else st.replay.leans.get(st.round, 0.0)
    loss = config.loss_of(name, epoch, st.round) if lean else None
    return None if loss is None or not math.isfinite(loss) else (lean, min(max(loss, 0.0), 1.0))


def mix_round(name: str, st: ComponentRound, rule: MixingRule, self_id: str,
              epoch: int, lean: tuple[float, float] | None = None) -> MixOutcome:
    """Mix the updates of round ``st.round`` that arrived into ``st`` (state, memory,
    lineage, disagreement history); ``lean``: :func:`lean_of`."""
    present = {p: rec for (r, p), rec in st.inbox.items()
               if r == st.round and rec.flat is not None and p in st.neighbours}
    self_w, terms = effective_weights(self_id, st.weights, present.keys())
    if st.age or any(rec.announcement.age for rec in present.values()):  # (stale states)
        self_w, stale = stale_weights(self_w, st.age, [(w, present[p].announcement.age)
                                                       for p, w in terms])
        terms = [(p, w) for (p, _), w in zip(terms, stale, strict=True)]
    audit: dict[str, float] = {}
    if lean is not None and terms:
        self_w, kept = leaned_weights(self_w, [w for _, w in terms], lean[1], lean[0])
        terms = [(p, w) for (p, _), w in zip(terms, kept, strict=True)]
        audit = {"lean": lean[0], "loss": lean[1]}
    scratch = _scratch_like(st.comp.flat)
    if present:
        st.disagreement.append(disagreement(st.comp.flat, [r.flat for r in present.values()],
                                            scratch))
    neighbours = tuple(_neighbour(p, w, present[p]) for p, w in terms)
    mixed = rule.mix(MixInput(st.comp.flat, self_w, neighbours, st.memory,
                              own_noise=st.noise, scratch=scratch))
    st.prov = mixed_provenance(st, mixed, [present[n.peer] for n in neighbours])
    st.comp.flat.copy_(mixed.state)
    st.memory = mixed.memory
    if present:  # (the state took part in a mix: it is fresh again)
        st.age = 0
    st.lineage = st.lineage.union(*(rec.announcement.lineage for rec in present.values()),
                                  st.weight_deps)
    missing = tuple(p for p in st.neighbours if p not in present)
    inputs = tuple(MixInputRef(n.peer, w, present[n.peer].announcement.digest)
                   for n, w in zip(neighbours, mixed.weights, strict=True))
    record = Mix(name, st.round, mixed.self_weight, inputs, missing, st.lineage,
                 epoch, rule.name, {**mixed.audit, **audit}, **fields(st.prov, st.lineage),
                 share_weights=mixed.share_weights)
    return MixOutcome(record, tuple(sorted(present)), missing)


def mixed_provenance(st: ComponentRound, mixed: MixResult,
                     inputs: list[Received]) -> Provenance:
    """The state's vector after the mix: mixed as the parameters were (a weight that rounds
    below 0 counts as 0, and the vector is then marked approximate).  Nothing a peer sent can
    make it fail the round: should the vector not mix, the state goes on with mass nobody is
    credited with (PARTIAL), and the reason is logged."""
    own_w, linear = mixed.linear_weights()
    approx = not mixed.exact or own_w < 0.0 or any(w < 0.0 for w in linear)
    try:
        return Provenance.mix(max(own_w, 0.0), st.prov, [
            (max(w, 0.0), received(rec.announcement))
            for rec, w in zip(inputs, linear, strict=True)], approx=approx)
    except ValueError as exc:
        log.warning("provenance of a mix lost: %s", exc)
        return Provenance.empty(PARTIAL)


def _neighbour(peer: str, weight: float, rec: Received) -> Neighbour:
    assert rec.flat is not None
    return Neighbour(peer, weight, rec.flat, rec.announcement.noise)


def disagreement(own: torch.Tensor, others: list[torch.Tensor | None],
                 scratch: torch.Tensor | None = None) -> float:
    """Largest ‖x_j − x_i‖ / ‖x_i‖ over the neighbours' updates (a local consensus distance;
    the differences go into ``scratch`` when given, instead of a new tensor each)."""
    scale = max(float(torch.linalg.vector_norm(own)), 1e-30)
    dists = [float(torch.linalg.vector_norm(torch.sub(o, own, out=scratch)))
             for o in others if o is not None]
    return max(dists, default=0.0) / scale
