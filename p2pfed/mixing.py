"""Mixing rules: how a node combines its state with its neighbours' at the end of a round.

One small class per rule behind one interface (:class:`MixingRule`), found by name in a
registry (:func:`rule`); the node hands a rule a :class:`MixInput` and applies the
:class:`MixResult` it gets back, never knowing which rule runs.  The math stays in
:mod:`p2pfed.consensus` as pure functions; a rule only decides which of them to call.

A rule that remembers something between rounds (clipped gossip's radius) keeps it in the
:class:`Memory` it is handed and hands back a new one; the node stores it with its
checkpoints, so that a restart or an unlearning's rollback re-runs a round exactly.

Adding a rule is one class and one registration::

    class KeepOwn(MixingRule):
        name = "keep-own"

        def mix(self, inp: MixInput) -> MixResult:
            return MixResult(inp.own, 1.0, tuple(0.0 for _ in inp.neighbours), inp.memory)

    register(KeepOwn())
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gossip.errors import ConfigError
from p2pfed.consensus import (
    clipped_gossip,
    clipped_weights,
    heterogeneity,
    mix_into,
    noise_aware_weights,
    trimmed_mean_weights,
)

#: the rule used when a component names none
DEFAULT_RULE = "mh"


@dataclass(frozen=True)
class Memory:
    """What mixing rules carry from one round to the next (stored with each checkpoint).

    ``radius``: clipped gossip's radius in the last round it could judge (0: none yet).
    """

    radius: float = 0.0

    def to_record(self) -> dict[str, float]:
        """The fields a checkpoint body carries."""
        return {"radius": self.radius}

    @classmethod
    def from_record(cls, body: Mapping[str, Any]) -> Memory:
        """Read back from a checkpoint body (missing fields: a fresh memory)."""
        return cls(radius=float(body.get("radius", 0.0)))


@dataclass(frozen=True)
class Neighbour:
    """A neighbour's update that arrived in time for this round."""

    peer: str
    #: its Metropolis–Hastings weight in this node's row
    weight: float
    state: torch.Tensor
    #: the noise standard deviation its announcement declared
    noise: float = 0.0


@dataclass(frozen=True)
class MixInput:
    """Everything a rule may look at.  Neighbours are sorted by peer id."""

    own: torch.Tensor
    #: this node's weight, with the weights of the neighbours that missed the round added
    self_weight: float
    neighbours: tuple[Neighbour, ...]
    memory: Memory = field(default_factory=Memory)
    #: the noise standard deviation this node's own announcement declared
    own_noise: float = 0.0
    #: a buffer shaped like ``own`` that a rule may write its result into (never ``own``)
    scratch: torch.Tensor | None = None


@dataclass(frozen=True)
class MixResult:
    """The new state and what the ledger records of the mix.

    ``self_weight`` and ``weights`` are what the ledger records (a rule that leaves weights
    out, or is not linear, still records the ones it was handed); :meth:`linear_weights` are
    the weights the state equals, ``self_w · own + Σ w_j · x_j``, that provenance shares use.
    """

    state: torch.Tensor
    #: the weights the mix recorded: self's, and one per neighbour in input order
    self_weight: float
    weights: tuple[float, ...]
    memory: Memory
    #: extra fields for the ledger's ``mix`` entry (what the rule decided, for audits)
    audit: Mapping[str, Any] = field(default_factory=dict)
    #: (self's weight, one per neighbour in input order) such that the state equals
    #: ``self_w · own + Σ w_j · x_j`` in exact arithmetic; None: the recorded ones are
    share_weights: tuple[float, tuple[float, ...]] | None = None
    #: False when no linear weights give the state and ``share_weights`` approximate it
    exact: bool = True

    def linear_weights(self) -> tuple[float, tuple[float, ...]]:
        """``share_weights``, or the recorded weights when they are the linear ones."""
        if self.share_weights is not None:
            return self.share_weights
        return self.self_weight, self.weights


def staleness(age: int) -> float:
    """``s(a) = 1 / (1 + a)``: the share of its weight a state ``age`` rounds old keeps."""
    return 1.0 / (1 + age)


def stale_weights(self_weight: float, own_age: int,
                  neighbours: Sequence[tuple[float, int]]) -> tuple[float, list[float]]:
    """This round's weights once stale states are down-weighted, before any rule runs.

    ``self_weight`` and the ``(weight, age)`` pairs are this node's row for the round (the
    Metropolis–Hastings weights, a missing neighbour's given to self: they sum to 1); an age
    is the number of rounds since a state last took part in a mix (0, but after a catch-up).

    *Why.*  A member that catches up from round ``r`` to ``r'`` (it was offline, or
    restarted from a checkpoint) holds a state that missed ``a = r' - r`` mixes, while each
    of those mixes pulled its neighbours' states towards each other.  Mixed at full weight,
    the stale state pulls its neighbours back by ``w_ij`` of the distance it fell behind, and
    it reaches them itself only at the pace of a fresh member.  We want the opposite: the
    returning member moves quickly to its neighbours and barely moves them.

    *The rule*, with ``s(a) = 1 / (1 + a)`` (:func:`staleness`):

    1. a neighbour ``j`` that announced age ``a_j > 0`` gets ``w'_ij = w_ij · s(a_j)``; the
       rest, ``w_ij · (1 - s(a_j))``, goes to self, as a missing neighbour's weight does (an
       update ``a`` rounds old counts as the share ``s(a)`` of an update that came):
       ``w'_ii = w_ii + Σ_j w_ij · (1 - s(a_j))``;
    2. if this node's own age ``a_i > 0``, its self weight becomes ``w''_ii = w'_ii · s(a_i)``
       and the mass removed, ``m = w'_ii · (1 - s(a_i))``, goes to the neighbours in
       proportion to their weights: ``w''_ij = w'_ij · (1 + m / S)``, ``S = Σ_j w'_ij``
       (no neighbour's update came, ``S = 0``: nowhere to move, self keeps its weight), but
       never above ``2 · w_ij`` (what is over stays with self): a member can force a catch-up
       by announcing a round far ahead, and must not take the stale node's state over by it.

    ``s`` is harmonic rather than geometric (``λ^a``, with λ the SLEM the rounds missed
    contracted by) because a node knows its age but not the overlay's SLEM, and a geometric
    share vanishes within a few rounds, which would shut a returning member out of its own
    first mix.  With ``s(a) = 1 / (1 + a)`` a state one round stale keeps half its weight,
    nine rounds stale a tenth; it is never zero, so the member still takes part.

    *What holds.*  Step 1 moves weight from a neighbour to self, step 2 from self to the
    neighbours: every weight stays in [0, 1] and the row still sums to 1, so the mix is a
    convex combination (no state leaves the hull of the inputs, whatever age a peer claims).
    The round's matrix is row-stochastic but no longer symmetric (a fresh node gives a
    stale one less than the stale one gives it), so the network average moves towards the
    fresh members' states: that is the point.  A node's age is 0 again after its first mix
    that takes in a neighbour's update, so this happens once per catch-up; in every other
    round the matrix is doubly stochastic and consensus converges as before.  ``s(0) = 1``:
    with all ages 0 the weights come back untouched, bit for bit.

    Returns the self weight and the neighbours' weights, in the order given.  The ``mix``
    ledger record stores the weights the rule actually used (:class:`MixResult`), so these.
    """
    weights = [w if a == 0 else w * staleness(a) for w, a in neighbours]
    if any(a for _, a in neighbours):
        self_weight += sum(w - kept for (w, a), kept in zip(neighbours, weights, strict=True)
                           if a)
    total = sum(weights)
    if own_age > 0 and total > 0.0:
        moved = self_weight * (1.0 - staleness(own_age))
        scale = 1.0 + moved / total
        # no neighbour gets more than twice its own weight: one that forced this catch-up
        # (by announcing a round far ahead) must not take the node's state over
        capped = [min(w * scale, 2.0 * w0) for w, (w0, _) in zip(weights, neighbours,
                                                                 strict=True)]
        self_weight -= sum(capped) - total
        weights = capped
    return self_weight, weights


def leaned_weights(self_weight: float, weights: Sequence[float], loss: float,
                   lean: float) -> tuple[float, list[float]]:
    """This round's weights when the member leans on its own loss (``[fairness] mixing =
    "loss"``), before any rule runs.

    ``loss`` is how badly the member's model fitted its own data this round, relative to a
    uniform guess, in [0, 1] (:meth:`~p2pfed.model.train.LocalTrainer.loss_of`).  Each
    neighbour's weight is multiplied by ``f = 1 / (1 + lean · loss)`` and the rest goes to
    self: the member keeps more of its own state the worse the consensus fits it.

    *Why this changes what the federation learns.*  With a doubly-stochastic matrix the
    members' mean moves by the mean of their updates whatever the weights are: the federation
    minimises the plain sum of the members' losses.  A member that moves only ``f_i`` of the
    way its row says makes the matrix row-stochastic, and the consensus it converges to is the
    π-weighted mean of the members' states with ``π_i ∝ 1 / f_i = 1 + lean · loss_i``
    (``π^T W = π^T`` for ``W = F W₀ + I − F`` and ``W₀`` doubly stochastic gives ``F π ∝ 1``).
    So a member's update counts ``1 + lean · loss_i`` times: what q-FFL does on a server
    (weighting each member's update by a power of its loss), here without a server and
    without any member telling another its loss.

    *What holds.*  Only the member's own row changes, every weight stays in [0, 1] and the row
    sums to 1: the mix is a convex combination, no state leaves the hull of the inputs, and
    the neighbours weigh this member as before.  A member can lean all the way (never move)
    already by sending whatever state it likes; the robust rules judge its state as any other.
    ``loss = 0`` or ``lean = 0`` gives the weights back untouched, bit for bit.
    """
    factor = 1.0 / (1.0 + lean * min(max(loss, 0.0), 1.0))
    if factor == 1.0:
        return self_weight, list(weights)
    kept = [w * factor for w in weights]
    return self_weight + math.fsum(weights) - math.fsum(kept), kept


class MixingRule:
    """One way of mixing.  Subclasses set :attr:`name` and implement :meth:`mix`."""

    name: ClassVar[str] = ""
    #: the state depends on the weights the rule is handed (a trimmed mean's does not: loss
    #: mixing, which works through the weights, then does not lean)
    uses_weights: ClassVar[bool] = True

    def mix(self, inp: MixInput) -> MixResult:
        raise NotImplementedError


def weighted(inp: MixInput, self_weight: float, weights: tuple[float, ...],
             memory: Memory | None = None,
             audit: Mapping[str, Any] | None = None) -> MixResult:
    """The plain weighted mix ``self_weight · own + Σ w_j · x_j`` (into ``inp.scratch``)."""
    out = inp.scratch if inp.scratch is not None else torch.empty_like(inp.own)
    terms = [(self_weight, inp.own)]
    terms += [(w, n.state) for w, n in zip(weights, inp.neighbours, strict=True)]
    mix_into(out, terms)
    return MixResult(out, self_weight, weights, inp.memory if memory is None else memory,
                     audit or {})


def _plain(inp: MixInput) -> MixResult:
    return weighted(inp, inp.self_weight, tuple(n.weight for n in inp.neighbours))


class MetropolisHastings(MixingRule):
    """The weighted average with the Metropolis–Hastings row (the default)."""

    name = "mh"

    def mix(self, inp: MixInput) -> MixResult:
        return _plain(inp)


class NoiseAware(MixingRule):
    """Metropolis–Hastings reweighted by the noise each member declares
    (:func:`~p2pfed.consensus.noise_aware_weights`)."""

    name = "noise-aware"

    def mix(self, inp: MixInput) -> MixResult:
        if not inp.neighbours:
            return _plain(inp)
        noises = [n.noise for n in inp.neighbours]
        between = heterogeneity(inp.own, [(n.noise, n.state) for n in inp.neighbours],
                                inp.own_noise)
        self_w, reweighted = noise_aware_weights(
            inp.self_weight, inp.own_noise, [(n.weight, n.noise) for n in inp.neighbours],
            between)
        return weighted(inp, self_w, tuple(reweighted),
                        audit={"noise": [inp.own_noise, *noises], "heterogeneity": between})


class Clipped(MixingRule):
    """Clipped gossip (:func:`~p2pfed.consensus.clipped_gossip`); its radius is its memory."""

    name = "clipped"

    def mix(self, inp: MixInput) -> MixResult:
        if not inp.neighbours:
            return _plain(inp)
        clip = clipped_gossip(inp.own, [(n.weight, n.state) for n in inp.neighbours],
                              previous=inp.memory.radius)
        memory = inp.memory
        if len(inp.neighbours) > 1:  # (one neighbour alone cannot be judged: keep the memory)
            memory = dataclasses.replace(memory, radius=clip.radius)
        weights = tuple(n.weight for n in inp.neighbours)
        # the ledger keeps the weights the rule was handed; the state is the mix with the
        # left-out neighbours at 0 and their weight with self (``clipped_weights``)
        self_w, used = clipped_weights(inp.self_weight, weights, clip.left_out)
        shares = (self_w, tuple(used))
        return MixResult(
            clip.state, inp.self_weight, weights, memory,
            {"radius": clip.radius, "left_out": [inp.neighbours[i].peer for i in clip.left_out]},
            share_weights=None if shares == (inp.self_weight, weights) else shares)


class TrimmedMean(MixingRule):
    """The coordinate-wise mean of self and the neighbours after dropping a quarter at each
    end (:func:`~p2pfed.consensus.trimmed_mean`).  It records the weights it was handed; its
    share weights are each input's share of the values kept
    (:func:`~p2pfed.consensus.trimmed_mean_weights`), in general not exact."""

    name = "trimmed-mean"
    uses_weights = False

    def mix(self, inp: MixInput) -> MixResult:
        if not inp.neighbours:
            return _plain(inp)
        states = [inp.own, *(n.state for n in inp.neighbours)]
        trimmed = trimmed_mean_weights(states, max(1, len(states) // 4))
        own_w, *others = trimmed.weights
        return MixResult(trimmed.state, inp.self_weight,
                         tuple(n.weight for n in inp.neighbours), inp.memory,
                         share_weights=(own_w, tuple(others)), exact=trimmed.exact)


_REGISTRY: dict[str, MixingRule] = {}


def register(rule_: MixingRule, *, replace: bool = False) -> MixingRule:
    """Make ``rule_`` available under its name (a second rule of the same name is refused
    unless ``replace``)."""
    if not rule_.name:
        raise ConfigError("a mixing rule needs a name")
    if rule_.name in _REGISTRY and not replace:
        raise ConfigError(f"a mixing rule named {rule_.name!r} is already registered")
    _REGISTRY[rule_.name] = rule_
    return rule_


def unregister(name: str) -> None:
    """Remove a rule (tests that register their own)."""
    _REGISTRY.pop(name, None)


def rule(name: str) -> MixingRule:
    """The rule registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown mixing rule {name!r}; choose from "
                          f"{', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Names of the registered rules, built-in ones first."""
    return tuple(_REGISTRY)


for _builtin in (MetropolisHastings(), Clipped(), TrimmedMean(), NoiseAware()):
    register(_builtin)
