"""The records of a node's rounds: its own updates, its neighbours', the mixes, checkpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from p2pfed import kinds
from p2pfed.config_sections import MAX_LEAN
from p2pfed.journal._base import (
    _VERSION,
    PROV_FIELDS,
    Record,
    SchemaError,
    _check_extra,
    _check_finite,
    _check_prov,
    _field,
    _floats,
    _lineage,
    _prov,
    _prov_body,
    _strs,
)
from p2pfed.lineage import Lineage

#: the largest make-up factor a ledger entry may hold (``[rounds] make_up`` is at most this)
MAX_MAKE_UP = 100
#: the longest objective name a ledger entry may hold
MAX_OBJECTIVE = 32


@dataclass(frozen=True)
class PrivacySpent:
    """What a private release has spent so far (part of :class:`LocalUpdate`)."""

    releases: int
    epsilon: float
    delta: float
    sigma: float
    clip: float
    released: bool  # this update is a release (not a round that only mixed)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PrivacySpent:
        return cls(_field(body, "releases", int), _field(body, "epsilon", float),
                   _field(body, "delta", float), _field(body, "sigma", float),
                   _field(body, "clip", float), _field(body, "released", bool, False))

    def to_body(self) -> dict[str, Any]:
        return {"releases": self.releases, "epsilon": self.epsilon, "delta": self.delta,
                "sigma": self.sigma, "clip": self.clip, "released": self.released}


@dataclass(frozen=True)
class LocalUpdate(Record):
    """This node's state of a round before it is announced (durable: precedes the send)."""

    KIND: ClassVar[str] = kinds.LOCAL_UPDATE
    component: str
    round: int
    digest: bytes  # the payload announced
    trained: bool  # the update includes local training
    start: bytes  # the state before training (b"": not kept)
    lineage: Lineage
    epoch: int
    dp: PrivacySpent | None = None
    #: the mass (the 2-norm of the change) this node's own training put into the state this
    #: round (None: not recorded)
    credit: float | None = None
    #: the make-up factor the round trained with (a part-time member making up the rounds it
    #: skipped: ``[rounds] make_up``), so that a re-run trains as it did whatever the settings
    #: are then (None: not recorded, a full-time member or an older ledger)
    make_up: int | None = None
    #: the local objective and its tilt the round trained with (``[fairness]``), so that a
    #: re-run trains with them whatever the settings are then (None: not recorded)
    objective: tuple[str, float] | None = None
    #: the lean the round's mix leaned on its loss with (``[fairness] mixing = "loss"``), so
    #: that a re-run leans as it did whatever the settings are then (None: it did not lean)
    lean: float | None = None

    def __post_init__(self) -> None:
        if self.credit is not None:
            _check_finite("credit", self.credit)
        if self.lean is not None:
            _check_finite("lean", self.lean)
            if not 0 < self.lean <= MAX_LEAN:
                raise SchemaError(f"field 'lean' is {self.lean!r}, not in (0, {MAX_LEAN:g}]")
        if self.make_up is not None and not 1 <= self.make_up <= MAX_MAKE_UP:
            raise SchemaError(f"field 'make_up' is {self.make_up!r}, not in 1..{MAX_MAKE_UP}")
        if self.objective is not None:
            name, tilt = self.objective
            if not 0 < len(name) <= MAX_OBJECTIVE or not name.isascii():
                raise SchemaError(f"field 'objective' is {name!r}, not a short name")
            _check_finite("tilt", tilt)

    def fields(self) -> dict[str, Any]:
        out = {"component": self.component, "round": self.round, "digest": self.digest,
               "trained": self.trained, "start": self.start, "lineage": self.lineage.packed,
               "epoch": self.epoch}
        return out | ({"dp": self.dp.to_body()} if self.dp is not None else {}) | (
            {"credit": self.credit} if self.credit is not None else {}) | (
            {"make_up": self.make_up} if self.make_up is not None else {}) | (
            {"objective": self.objective[0], "tilt": self.objective[1]}
            if self.objective is not None else {}) | (
            {"lean": self.lean} if self.lean is not None else {})

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> LocalUpdate:
        dp = _field(body, "dp", dict, None)
        name = _field(body, "objective", str, None)
        objective = None if name is None else (name, _field(body, "tilt", float))
        return cls(_field(body, "component", str), _field(body, "round", int),
                   _field(body, "digest", bytes), _field(body, "trained", bool, False),
                   _field(body, "start", bytes, b""), _lineage(body, "lineage"),
                   _field(body, "epoch", int, 0),
                   PrivacySpent.from_body(dp) if dp is not None else None,
                   _field(body, "credit", float, None), _field(body, "make_up", int, None),
                   objective, _field(body, "lean", float, None))


@dataclass(frozen=True)
class Contribution(Record):
    """A neighbour's update, fetched, checked and kept for a round (``kept``: taken from this
    node's own store during an unlearning re-run)."""

    KIND: ClassVar[str] = kinds.CONTRIBUTION
    sender: str
    component: str
    round: int
    digest: bytes
    weight: float
    lineage: Lineage
    noise: float = 0.0  # the noise std its announcement declared
    kept: bool = False
    #: the rounds its sender's state had missed (a catch-up; mixing down-weights it): written
    #: only when above 0, so a re-run mixes it as the original round did
    age: int = 0
    #: the sender's announced mass vector (little-endian float64s, one per member of
    #: ``lineage``) and its flags (``PARTIAL=1``, ``APPROX=2``); None: not announced
    mass: bytes | None = None
    prov_flags: int | None = None

    def __post_init__(self) -> None:
        _check_prov(self.mass, self.prov_flags, self.lineage)

    def fields(self) -> dict[str, Any]:
        out = {"sender": self.sender, "component": self.component, "round": self.round,
               "digest": self.digest, "weight": self.weight, "lineage": self.lineage.packed,
               "noise": self.noise}
        return out | ({"kept": True} if self.kept else {}) | (
            {"age": self.age} if self.age > 0 else {}) | _prov_body(self.mass, self.prov_flags)

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Contribution:
        return cls(_field(body, "sender", str), _field(body, "component", str),
                   _field(body, "round", int), _field(body, "digest", bytes),
                   _field(body, "weight", float), _lineage(body, "lineage"),
                   _field(body, "noise", float, 0.0), _field(body, "kept", bool, False),
                   _field(body, "age", int, 0), *_prov(body))


@dataclass(frozen=True)
class MixInputRef:
    """One neighbour's update in a mix: who, with what weight, which payload."""

    peer: str
    weight: float
    digest: bytes


_MIX_FIELDS = ("component", "round", "self_weight", "inputs", "missing", "lineage", "epoch",
               "rule", *PROV_FIELDS, "share_weights")


@dataclass(frozen=True)
class Mix(Record):
    """One round's mix: weights, inputs, what was missing, the rule and what it decided."""

    KIND: ClassVar[str] = kinds.MIX
    component: str
    round: int
    self_weight: float
    inputs: tuple[MixInputRef, ...]
    missing: tuple[str, ...]
    lineage: Lineage
    epoch: int
    rule: str
    #: the rule's own audit fields (clipped gossip's radius, trimmed members, noise ...)
    audit: Mapping[str, Any] = field(default_factory=dict)
    #: the node's mass vector after the mix (little-endian float64s, one per member of
    #: ``lineage``) and its flags; None: not kept
    mass: bytes | None = None
    prov_flags: int | None = None
    #: the weights the vector was mixed with, (self, one per input), when they differ from
    #: ``self_weight`` and the inputs' (None: the same)
    share_weights: tuple[float, tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        _check_extra(self.audit, _MIX_FIELDS, "the rule's audit")
        _check_prov(self.mass, self.prov_flags, self.lineage)
        if self.share_weights is None:
            return
        own, weights = self.share_weights
        if len(weights) != len(self.inputs):
            raise SchemaError(f"field 'share_weights' holds {len(weights)} input weights for "
                              f"{len(self.inputs)} inputs")
        if not all(math.isfinite(w) for w in (own, *weights)):
            raise SchemaError(f"field 'share_weights' holds a weight that is not finite: "
                              f"{self.share_weights!r}")

    def fields(self) -> dict[str, Any]:
        shares = {} if self.share_weights is None else {
            "share_weights": [self.share_weights[0], list(self.share_weights[1])]}
        return {"component": self.component, "round": self.round,
                "self_weight": self.self_weight,
                "inputs": [[i.peer, i.weight, i.digest] for i in self.inputs],
                "missing": list(self.missing), "lineage": self.lineage.packed,
                "epoch": self.epoch, "rule": self.rule, **self.audit,
                **_prov_body(self.mass, self.prov_flags), **shares}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Mix:
        inputs = []
        for item in _field(body, "inputs", (list, tuple)):
            if (not isinstance(item, list | tuple) or len(item) != 3
                    or not isinstance(item[0], str) or not isinstance(item[2], bytes)
                    or not isinstance(item[1], int | float)):
                raise SchemaError("field 'inputs' holds an item other than [peer, weight, "
                                  "digest]")
            inputs.append(MixInputRef(item[0], float(item[1]), item[2]))
        return cls(_field(body, "component", str), _field(body, "round", int),
                   _field(body, "self_weight", float), tuple(inputs), _strs(body, "missing"),
                   _lineage(body, "lineage"), _field(body, "epoch", int, 0),
                   _field(body, "rule", str, "mh"),
                   {k: v for k, v in body.items() if k not in _MIX_FIELDS and k != _VERSION},
                   *_prov(body), _share_weights(body))


def _share_weights(body: Mapping[str, Any]) -> tuple[float, tuple[float, ...]] | None:
    value = _field(body, "share_weights", (list, tuple), None)
    if value is None:
        return None
    if (len(value) != 2 or not isinstance(value[1], list | tuple)
            or not all(isinstance(w, int | float) and not isinstance(w, bool)
                       for w in (value[0], *value[1]))):
        raise SchemaError("field 'share_weights' is not [self weight, [input weights]]")
    return float(value[0]), tuple(float(w) for w in value[1])


_CHECKPOINT_FIELDS = ("component", "round", "digest", "lineage", *PROV_FIELDS)


@dataclass(frozen=True)
class Checkpoint(Record):
    """A component's state stored as a blob: the start of round ``round``."""

    KIND: ClassVar[str] = kinds.CHECKPOINT
    component: str
    round: int
    digest: bytes  # of the state (payload format; safetensors before schema 2)
    lineage: Lineage
    #: what the mixing rule remembers (:class:`p2pfed.mixing.Memory`'s fields)
    memory: Mapping[str, float] = field(default_factory=dict)
    #: the mass vector of the state (aligned with ``lineage``) and its flags; None: not kept
    mass: bytes | None = None
    prov_flags: int | None = None

    def __post_init__(self) -> None:
        _check_extra(self.memory, _CHECKPOINT_FIELDS, "the rule's memory")
        _check_prov(self.mass, self.prov_flags, self.lineage)

    def fields(self) -> dict[str, Any]:
        return {"component": self.component, "round": self.round, "digest": self.digest,
                "lineage": self.lineage.packed, **self.memory,
                **_prov_body(self.mass, self.prov_flags)}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Checkpoint:
        return cls(_field(body, "component", str), _field(body, "round", int),
                   _field(body, "digest", bytes), _lineage(body, "lineage", b""),
                   _floats(body, _CHECKPOINT_FIELDS), *_prov(body))


@dataclass(frozen=True)
class CatchUp(Record):
    """A jump to a neighbour's later round."""

    KIND: ClassVar[str] = kinds.CATCH_UP
    component: str
    from_round: int
    to_round: int

    def fields(self) -> dict[str, Any]:
        return {"component": self.component, "from": self.from_round, "to": self.to_round}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> CatchUp:
        return cls(_field(body, "component", str), _field(body, "from", int),
                   _field(body, "to", int))


