"""The records of membership, the task catalogue, unlearning, the base model of an adapter
and the ledger itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from p2pfed import kinds
from p2pfed.journal._base import (
    PROV_FIELDS,
    Record,
    SchemaError,
    _check_extra,
    _check_prov,
    _field,
    _floats,
    _lineage,
    _prov,
    _prov_body,
    _strs,
)
from p2pfed.journal._rounds import Checkpoint
from p2pfed.ledger_verify import OPEN
from p2pfed.lineage import Lineage


@dataclass(frozen=True)
class _Signed(Record):
    """A signed record as it arrived (its bytes; :mod:`gossip.records` reads them)."""

    record: bytes

    def fields(self) -> dict[str, Any]:
        return {"record": self.record}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Record:
        return cls(_field(body, "record", bytes))


@dataclass(frozen=True)
class Membership(_Signed):
    """A signed membership record (genesis aside): a join, an admission or a leave; or a task
    catalogue record (``task-add``, ``task-retire``, ``task-data``, signed by an admin)."""

    KIND: ClassVar[str] = kinds.MEMBERSHIP


@dataclass(frozen=True)
class JoinRequest(_Signed):
    """The newcomer's own join, kept until a member admits it."""

    KIND: ClassVar[str] = kinds.JOIN_REQUEST


@dataclass(frozen=True)
class ForgetRecord(_Signed):
    """A signed request to forget a member, as received or made."""

    KIND: ClassVar[str] = kinds.FORGET_RECORD



#: a task's fields in a :class:`CatalogueApplied` (and ``p2pfed status``), and their types
_TASK_FIELDS: dict[str, type | tuple[type, ...]] = {
    "phase": str, "modalities": (list, tuple), "classes": int, "components": (list, tuple),
    "data_version": str}


@dataclass(frozen=True)
class CatalogueApplied(Record):
    """A new version of the task catalogue, applied at a round boundary (the first round
    ``component`` starts under it is ``round``; ``""`` and 0 when it was applied at start-up):
    the version, the digest of its record set, each task as ``p2pfed status`` shows it, and the
    records the fold ignored (why, in words)."""

    KIND: ClassVar[str] = kinds.CATALOGUE
    version: int
    digest: bytes
    tasks: Mapping[str, Mapping[str, Any]]
    ignored: tuple[str, ...] = ()
    component: str = ""
    round: int = 0

    def fields(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest,
                "tasks": {n: dict(t) for n, t in sorted(self.tasks.items())},
                "ignored": list(self.ignored), "component": self.component,
                "round": self.round}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> CatalogueApplied:
        tasks = _field(body, "tasks", dict)
        for name, task in tasks.items():
            if not isinstance(name, str) or not isinstance(task, dict):
                raise SchemaError("field 'tasks' is not a map of task name to task")
            for key, kind in _TASK_FIELDS.items():
                _field(task, key, kind)
            if not all(isinstance(v, str) for v in (*task["modalities"], *task["components"])):
                raise SchemaError(f"task {name!r}: modalities and components must be strings")
        return cls(_field(body, "version", int), _field(body, "digest", bytes), tasks,
                   _strs(body, "ignored", ()), _field(body, "component", str, ""),
                   _field(body, "round", int, 0))


@dataclass(frozen=True)
class BaseModel(Record):
    """The frozen base model ``component``'s adapter applies to: its identity's ``digest`` and
    ``summary`` (:func:`p2pfed.model.textbase.identity`); the checkpoints of ``component``
    after this entry, up to the next one, were made over that base."""

    KIND: ClassVar[str] = kinds.BASE_MODEL
    component: str
    digest: str
    summary: str

    def fields(self) -> dict[str, Any]:
        return {"component": self.component, "digest": self.digest, "summary": self.summary}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> BaseModel:
        return cls(_field(body, "component", str), _field(body, "digest", str),
                   _field(body, "summary", str))


@dataclass(frozen=True)
class Rerun:
    """One component of a forget: the checkpoint it rolls back to and the round it re-runs
    to (``keep``: its present state, put back when it is re-run only to feed the others)."""

    until: int
    checkpoint: bytes
    lineage: Lineage
    memory: Mapping[str, float] = field(default_factory=dict)
    keep: Checkpoint | None = None
    #: the checkpoint's mass vector (aligned with ``lineage``) and its flags; None: not kept
    mass: bytes | None = None
    prov_flags: int | None = None

    def __post_init__(self) -> None:
        _check_extra(self.memory, _RERUN_FIELDS, "the rule's memory")
        _check_prov(self.mass, self.prov_flags, self.lineage)

    def to_body(self) -> dict[str, Any]:
        keep = {"keep": self.keep.fields()} if self.keep is not None else {}
        return {"until": self.until, "checkpoint": self.checkpoint,
                "lineage": self.lineage.packed, **self.memory, **keep,
                **_prov_body(self.mass, self.prov_flags)}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Rerun:
        keep = _field(body, "keep", dict, None)
        return cls(_field(body, "until", int), _field(body, "checkpoint", bytes),
                   _lineage(body, "lineage", b""), _floats(body, _RERUN_FIELDS),
                   Checkpoint.from_fields(keep) if keep is not None else None, *_prov(body))

    def rollback(self, component: str, start: int) -> Checkpoint:
        """The checkpoint this component rolls back to (its mass vector with it)."""
        return Checkpoint(component, start, self.checkpoint, self.lineage, self.memory,
                          self.mass, self.prov_flags)


_RERUN_FIELDS = ("until", "checkpoint", "lineage", "keep", *PROV_FIELDS)


@dataclass(frozen=True)
class Forget(Record):
    """A forget request applied: what it rolls back (durable, before any rollback)."""

    KIND: ClassVar[str] = kinds.FORGET
    target: str
    mode: str
    epoch: int
    start: int  # the round rolled back to
    components: Mapping[str, Rerun]
    influenced: tuple[str, ...]
    untouched: tuple[str, ...]

    def fields(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "epoch": self.epoch,
                "start": self.start,
                "components": {c: r.to_body() for c, r in sorted(self.components.items())},
                "influenced": list(self.influenced), "untouched": list(self.untouched)}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Forget:
        comps = _field(body, "components", dict)
        if not all(isinstance(c, str) and isinstance(r, dict) for c, r in comps.items()):
            raise SchemaError("field 'components' is not a map of component to re-run")
        return cls(_field(body, "target", str), _field(body, "mode", str),
                   _field(body, "epoch", int), _field(body, "start", int),
                   {c: Rerun.from_body(r) for c, r in comps.items()},
                   _strs(body, "influenced"), _strs(body, "untouched"))


@dataclass(frozen=True)
class Unlearned(Record):
    """The re-run a :class:`Forget` began is finished."""

    KIND: ClassVar[str] = kinds.UNLEARNED
    target: str
    mode: str
    epoch: int
    rolled_back: tuple[str, ...]
    untouched: tuple[str, ...]
    from_round: int

    @classmethod
    def closing(cls, forget: Forget) -> Unlearned:
        return cls(forget.target, forget.mode, forget.epoch, forget.influenced,
                   forget.untouched, forget.start)

    def fields(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "epoch": self.epoch,
                "rolled_back": list(self.rolled_back), "untouched": list(self.untouched),
                "from_round": self.from_round}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Unlearned:
        return cls(_field(body, "target", str), _field(body, "mode", str),
                   _field(body, "epoch", int), _strs(body, "rolled_back"),
                   _strs(body, "untouched"), _field(body, "from_round", int))


@dataclass(frozen=True)
class ForgetFailed(Record):
    """A forget request that could not be applied (no clean checkpoint)."""

    KIND: ClassVar[str] = kinds.FORGET_FAILED
    target: str
    mode: str
    components: tuple[str, ...]

    def fields(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "components": list(self.components)}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> ForgetFailed:
        return cls(_field(body, "target", str), _field(body, "mode", str),
                   _strs(body, "components"))


@dataclass(frozen=True)
class Opened(Record):
    """Entry 0, written by the ledger itself: whose ledger this is."""

    KIND: ClassVar[str] = OPEN
    owner: bytes
    peer_id: str
    format: int

    def fields(self) -> dict[str, Any]:
        return {"owner": self.owner, "peer_id": self.peer_id, "format": self.format}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Opened:
        return cls(_field(body, "owner", bytes), _field(body, "peer_id", str),
                   _field(body, "format", int))


#: every kind of entry, and its record type


@dataclass(frozen=True)
class Compaction(Record):
    """Old entries deleted to keep storage bounded (written by the ledger, which checks the
    runs and digest: see :mod:`p2pfed.ledger_verify`), and why."""

    KIND: ClassVar[str] = kinds.COMPACTION
    #: every run deleted so far: [start, end) and the hash of the entry at end - 1
    gaps: tuple[tuple[int, int, bytes], ...]
    count: int
    digest: bytes
    #: the rounds of history kept for exact unlearning, per component the oldest round a
    #: forget can roll back to, and the blobs deleted with the entries
    horizon: int = 0
    oldest: Mapping[str, int] = field(default_factory=dict)
    blobs: int = 0

    def fields(self) -> dict[str, Any]:
        return {"gaps": [list(g) for g in self.gaps], "count": self.count,
                "digest": self.digest, "horizon": self.horizon, "oldest": dict(self.oldest),
                "blobs": self.blobs}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Compaction:
        runs = _field(body, "gaps", (list, tuple))
        if not all(isinstance(r, list | tuple) and len(r) == 3 and isinstance(r[0], int)
                   and isinstance(r[1], int) and isinstance(r[2], bytes) for r in runs):
            raise SchemaError("field 'gaps' is not a list of [start, end, last hash] runs")
        oldest = _field(body, "oldest", dict, {})
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in oldest.items()):
            raise SchemaError("field 'oldest' is not a map of component to round")
        return cls(tuple((r[0], r[1], r[2]) for r in runs), _field(body, "count", int),
                   _field(body, "digest", bytes), _field(body, "horizon", int, 0),
                   dict(oldest), _field(body, "blobs", int, 0))
