"""The federation's task catalogue: admin-signed records, merged as a set (a CRDT).

Three kinds of record, each an envelope signed by an admin named in the genesis:

* ``task-add`` — a new task: its name, its modalities (``text``, ``image``, ``activity``), its
  number of classes K (2..1000), the components its pipeline uses (``head.<name>`` always among
  them) and optionally the version of the data it starts with;
* ``task-retire`` — the task stops: no member trains it any more (its components stay named);
* ``task-data`` — attach a new data version to an active task.

Bodies are msgpack lists, the first item the body's format (1), in canonical form only (one
record, one encoding, one digest)::

    task-add     [1, name, [modality, ...], classes, [component, ...], data_version]
    task-retire  [1, name]
    task-data    [1, name, data_version]

The catalogue is *derived* from the set of valid records, never sent: the records are folded
in a canonical order, by the admin's signed time and then the envelope's digest, so views that
hold the same records derive the same catalogue whatever order they arrived in.  In that fold
a record that cannot apply is ignored, deterministically, and reported
(:attr:`TaskCatalogue.ignored`): an add of a name used before (retired names are not reused),
a retire of an unknown or retired task, a data version for an unknown or retired task or the
version it has already.  ``version`` is the number of records in the set (it grows with every
new record, replays change nothing); ``digest`` identifies the set, so equal digests mean equal
catalogues.

A new task's components get their initial values the way the genesis catalogue's do: from the
federation id and the component's name (and, for a head, the task's K), so every member that
builds them builds the same; nothing but the names and shapes travels here.  Who builds them
follows from the record set as well (:func:`holdings`): every member whose membership record
names the task's other components.

Pure: no I/O, no clock (a record's time is its envelope's).  :class:`TaskBook` is the set;
:class:`gossip.membership.MembershipView` holds one and carries its records with the membership
records (anti-entropy, bundles, the ledger).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gossip.catalog import ComponentSpec
from gossip.envelope import Envelope, digest, packb, seal, unpackb
from gossip.errors import (
    MalformedMessageError,
    NotAdminError,
    OversizedMessageError,
    UnauthorizedError,
)
from gossip.identity import Identity
from gossip.records import Genesis

TASK_ADD = "task-add"
TASK_RETIRE = "task-retire"
TASK_DATA = "task-data"
TASK_KINDS = frozenset({TASK_ADD, TASK_RETIRE, TASK_DATA})
FORMAT = 1
MODALITIES = ("activity", "image", "text")
#: the encoder each modality's pipeline starts with (the names :mod:`p2pfed.model.m3t` uses)
ENCODERS = {"activity": "encoder.activity", "image": "encoder.image", "text": "encoder.text.lora"}
MIN_CLASSES = 2
MAX_CLASSES = 1000
MAX_TASK_NAME_CHARS = 48
MAX_COMPONENTS = 16
MAX_DATA_VERSION_CHARS = 64
#: a body is far smaller (a full add is under 700 bytes): anything bigger is refused unread
MAX_BODY_BYTES = 2048
#: the most catalogue records a view keeps (every member re-sends them every refresh)
MAX_TASK_RECORDS = 256
TASK_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
DATA_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
ACTIVE = "active"
RETIRED = "retired"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise MalformedMessageError(message)


def check_task_name(name: Any) -> str:
    """A task name: one segment of a component name (so ``head.<name>`` is a valid one)."""
    _check(isinstance(name, str) and 0 < len(name) <= MAX_TASK_NAME_CHARS
           and TASK_NAME_RE.match(name) is not None,
           f"a task name is 1..{MAX_TASK_NAME_CHARS} characters: a lower-case letter, then "
           f"letters, digits, '-' or '_' (got {name!r})")
    return str(name)


def check_data_version(version: Any, *, empty: bool = False) -> str:
    if empty and version == "":
        return ""
    _check(isinstance(version, str) and 0 < len(version) <= MAX_DATA_VERSION_CHARS
           and DATA_VERSION_RE.match(version) is not None,
           f"a data version is 1..{MAX_DATA_VERSION_CHARS} characters of letters, digits and "
           f"'._:+-', starting with a letter or digit (got {version!r})")
    return str(version)


def default_components(name: str, modalities: Iterable[str]) -> tuple[str, ...]:
    """The components of a task with no others named: an encoder per modality and its head."""
    return tuple(sorted({ENCODERS[m] for m in modalities if m in ENCODERS} | {f"head.{name}"}))


def _strs(value: Any, what: str, limit: int) -> list[str]:
    _check(isinstance(value, list) and len(value) <= limit
           and all(isinstance(x, str) for x in value), f"{what} must be a list of strings")
    return list(value)


@dataclass(frozen=True)
class TaskAdd:
    """A new task (see the module doc); fields are checked on construction."""

    KIND: ClassVar[str] = TASK_ADD
    name: str
    modalities: tuple[str, ...]
    classes: int
    components: tuple[str, ...] = ()  # () = default_components
    data_version: str = ""

    def __post_init__(self) -> None:
        check_task_name(self.name)
        mods = tuple(sorted(set(self.modalities)))
        _check(bool(mods) and set(mods) <= set(MODALITIES),
               f"modalities must be some of {', '.join(MODALITIES)} (got {list(self.modalities)})")
        _check(isinstance(self.classes, int) and not isinstance(self.classes, bool)
               and MIN_CLASSES <= self.classes <= MAX_CLASSES,
               f"classes must be {MIN_CLASSES}..{MAX_CLASSES} (got {self.classes!r})")
        comps = tuple(sorted(set(self.components))) or default_components(self.name, mods)
        _check(len(comps) <= MAX_COMPONENTS, f"at most {MAX_COMPONENTS} components")
        for comp in comps:
            try:
                ComponentSpec.from_name(comp)
            except ValueError as exc:
                raise MalformedMessageError(f"component {comp!r}: {exc}") from None
        _check(f"head.{self.name}" in comps, f"the components must include head.{self.name}")
        check_data_version(self.data_version, empty=True)
        object.__setattr__(self, "modalities", mods)
        object.__setattr__(self, "components", comps)

    def to_body(self) -> bytes:
        return packb([FORMAT, self.name, list(self.modalities), self.classes,
                      list(self.components), self.data_version])


@dataclass(frozen=True)
class TaskRetire:
    KIND: ClassVar[str] = TASK_RETIRE
    name: str

    def __post_init__(self) -> None:
        check_task_name(self.name)

    def to_body(self) -> bytes:
        return packb([FORMAT, self.name])


@dataclass(frozen=True)
class TaskData:
    KIND: ClassVar[str] = TASK_DATA
    name: str
    data_version: str

    def __post_init__(self) -> None:
        check_task_name(self.name)
        check_data_version(self.data_version)

    def to_body(self) -> bytes:
        return packb([FORMAT, self.name, self.data_version])


TaskRecord = TaskAdd | TaskRetire | TaskData


def decode_task_body(kind: str, body: bytes) -> TaskRecord:
    """A record's body, checked: its size first, then its shape, fields and canonical form."""
    if len(body) > MAX_BODY_BYTES:
        raise OversizedMessageError(f"a task record's body is at most {MAX_BODY_BYTES} bytes "
                                    f"(got {len(body)})")
    obj = unpackb(body)
    _check(isinstance(obj, list) and len(obj) >= 2 and obj[0] == FORMAT,
           f"bad {kind} record")
    record: TaskRecord
    if kind == TASK_ADD:
        _check(len(obj) == 6, "bad task-add record")
        _, name, mods, classes, comps, version = obj
        _check(isinstance(classes, int) and isinstance(version, str), "bad task-add fields")
        record = TaskAdd(name, tuple(_strs(mods, "modalities", 8)), classes,
                         tuple(_strs(comps, "components", MAX_COMPONENTS)), version)
    elif kind == TASK_RETIRE:
        _check(len(obj) == 2, "bad task-retire record")
        record = TaskRetire(obj[1])
    elif kind == TASK_DATA:
        _check(len(obj) == 3, "bad task-data record")
        record = TaskData(obj[1], obj[2])
    else:
        raise MalformedMessageError(f"{kind!r} is not a task-catalogue record kind")
    _check(record.to_body() == body, f"the {kind} record is not in canonical form")
    return record


def make_task_record(identity: Identity, federation_id: bytes, record: TaskRecord,
                     now_ms: int, seq: int) -> Envelope:
    """``record`` signed by ``identity`` (which should be an admin: no one else's counts)."""
    return seal(identity, kind=record.KIND, federation_id=federation_id, seq=seq,
                timestamp_ms=now_ms, body=record.to_body())


def check_task_record(genesis: Genesis, env: Envelope) -> TaskRecord:
    """An opened envelope (signature and federation verified) as a catalogue record: signed by
    an admin (:class:`NotAdminError` otherwise), not before the federation was created."""
    _check(env.kind in TASK_KINDS, f"{env.kind!r} is not a task-catalogue record kind")
    if env.sender not in genesis.admins:
        raise NotAdminError(f"a {env.kind} record signed by {env.sender_id}, who is not an "
                            "admin of the federation: only its admins may change the task "
                            "catalogue")
    _check(env.timestamp_ms >= genesis.created_ms,
           f"a {env.kind} record signed before the federation was created")
    return decode_task_body(env.kind, env.body)


# ------------------------------------------------------------------------------ the catalogue
@dataclass(frozen=True)
class Task:
    name: str
    phase: str  # ACTIVE or RETIRED
    modalities: tuple[str, ...]
    classes: int
    components: tuple[str, ...]
    data_version: str

    def creates(self, catalog: frozenset[str]) -> tuple[str, ...]:
        """The components this task brings that the genesis ``catalog`` lacks (see
        :func:`created_components`)."""
        return created_components(self.name, self.modalities, self.components, catalog)

    def to_status(self) -> dict[str, Any]:
        return {"phase": self.phase, "modalities": list(self.modalities),
                "classes": self.classes, "components": list(self.components),
                "data_version": self.data_version}


@dataclass(frozen=True)
class Ignored:
    """A record in the set that the fold did not apply, and why."""

    kind: str
    name: str
    signed_ms: int
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name} (signed at {self.signed_ms}): {self.reason}"


@dataclass(frozen=True)
class TaskCatalogue:
    """The catalogue the record set implies (see the module doc)."""

    version: int = 0
    digest: bytes = b""
    tasks: Mapping[str, Task] = field(default_factory=dict)
    ignored: tuple[Ignored, ...] = ()

    def active(self) -> list[str]:
        return sorted(n for n, t in self.tasks.items() if t.phase == ACTIVE)

    def components(self) -> frozenset[str]:
        """The components of every task, active or retired (their names stay taken)."""
        return frozenset(c for t in self.tasks.values() for c in t.components)

    def to_status(self) -> dict[str, Any]:
        """``p2pfed status``'s ``catalogue`` (see ``docs/status.schema.json``)."""
        return {"version": self.version, "digest": self.digest.hex(),
                "tasks": {n: t.to_status() for n, t in sorted(self.tasks.items())}}

    def describe(self) -> dict[str, Any]:
        """:meth:`to_status` and the records the fold ignored (``p2pfed task list --json``)."""
        return {**self.to_status(), "ignored": [str(i) for i in self.ignored]}

    def would_ignore(self, record: TaskRecord) -> str | None:
        """Why the fold would ignore ``record`` if it came after every record here (None: it
        would apply)."""
        return _step(dict(self.tasks), record)


def _step(tasks: dict[str, Task], record: TaskRecord) -> str | None:
    """Apply ``record`` to ``tasks`` in place; the reason it cannot apply, or None."""
    cur = tasks.get(record.name)
    if isinstance(record, TaskAdd):
        if cur is not None:
            return f"task {record.name} exists ({cur.phase}): a name is never reused"
        tasks[record.name] = Task(record.name, ACTIVE, record.modalities, record.classes,
                                  record.components, record.data_version)
        return None
    if cur is None:
        return f"no task {record.name}"
    if cur.phase == RETIRED:
        return f"task {record.name} is retired"
    if isinstance(record, TaskRetire):
        tasks[record.name] = dataclasses.replace(cur, phase=RETIRED)
        return None
    if record.data_version == cur.data_version:
        return f"task {record.name} has data version {cur.data_version} already"
    tasks[record.name] = dataclasses.replace(cur, data_version=record.data_version)
    return None


def created_components(name: str, modalities: Iterable[str], components: Iterable[str],
                       catalog: frozenset[str]) -> tuple[str, ...]:
    """The components a catalogue task creates: those it names that the genesis ``catalog``
    does not, when the task is one every member can build (its components are each
    modality's encoder, optionally ``backbone`` and ``prompt.<name>``, and ``head.<name>``) and
    names at least one component of the catalogue (its holders hold them); otherwise none."""
    comps = frozenset(components)
    encoders = frozenset(ENCODERS[m] for m in modalities if m in ENCODERS)
    buildable = encoders | {"backbone", f"prompt.{name}", f"head.{name}"}
    created = comps - catalog
    if not encoders <= comps or not comps <= buildable or created == comps:
        return ()
    return tuple(sorted(created))


def holdings(catalogue: TaskCatalogue, modules: Iterable[str],
             catalog: frozenset[str]) -> frozenset[str]:
    """What a member whose membership record names ``modules`` holds: those, and the
    components every catalogue task (active or retired) creates whose other components it
    holds by its record.  A function of the record set alone, so every member computes the
    same holders whatever order the records came in."""
    return held_with(creations(catalogue, catalog), modules)


def creations(catalogue: TaskCatalogue, catalog: frozenset[str]
              ) -> list[tuple[frozenset[str], tuple[str, ...]]]:
    """Per catalogue task that creates components: (the task's other components, those it
    creates): what :func:`holdings` tests each member against."""
    return [(frozenset(t.components) - frozenset(new), new)
            for t in catalogue.tasks.values() if (new := t.creates(catalog))]


def held_with(created: Iterable[tuple[frozenset[str], tuple[str, ...]]],
              modules: Iterable[str]) -> frozenset[str]:
    """``modules`` and what ``created`` (:func:`creations`) gives a member holding them."""
    held = frozenset(modules)
    return held | {c for rest, new in created if rest <= held for c in new}


def fold(records: Iterable[tuple[int, bytes, TaskRecord]]) -> TaskCatalogue:
    """The catalogue of ``records`` (signed time, envelope digest, record), in canonical order."""
    ordered = sorted(records, key=lambda r: (r[0], r[1]))
    tasks: dict[str, Task] = {}
    ignored: list[Ignored] = []
    for signed_ms, _key, record in ordered:
        reason = _step(tasks, record)
        if reason is not None:
            ignored.append(Ignored(record.KIND, record.name, signed_ms, reason))
    return TaskCatalogue(len(ordered), digest(packb(sorted(k for _, k, _ in ordered))),
                         dict(sorted(tasks.items())), tuple(ignored))


@dataclass(frozen=True)
class _Entry:
    raw: bytes
    signed_ms: int
    record: TaskRecord


class TaskBook:
    """The set of valid catalogue records of one federation (grow-only, merged by union)."""

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self._entries: dict[bytes, _Entry] = {}  # digest(raw) -> entry
        self._catalogue: TaskCatalogue | None = None

    def knows(self, key: bytes) -> bool:
        return key in self._entries

    def add(self, env: Envelope, raw: bytes) -> bool:
        """Add an opened envelope (signature and federation checked by the caller) and its
        bytes; True when it is new.  Raises a :class:`~gossip.errors.RemoteError` when it is
        not a valid catalogue record."""
        key = digest(raw)
        if key in self._entries:
            return False  # a replay: nothing changes
        record = check_task_record(self.genesis, env)
        if len(self._entries) >= MAX_TASK_RECORDS:
            # Keep the MAX_TASK_RECORDS first in the fold's order, whatever order they came
            # in (first come, first kept would let members hold different sets for ever).
            last = max(self._entries, key=lambda k: (self._entries[k].signed_ms, k))
            if (env.timestamp_ms, key) > (self._entries[last].signed_ms, last):
                raise UnauthorizedError(
                    f"task catalogue record limit ({MAX_TASK_RECORDS}) reached")
            del self._entries[last]
        self._entries[key] = _Entry(raw, env.timestamp_ms, record)
        self._catalogue = None
        return True

    def records(self) -> frozenset[bytes]:
        return frozenset(e.raw for e in self._entries.values())

    def keys(self) -> frozenset[bytes]:
        """The digests of the records (the view's digest covers them)."""
        return frozenset(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def catalogue(self) -> TaskCatalogue:
        if self._catalogue is None:
            self._catalogue = fold((e.signed_ms, k, e.record) for k, e in self._entries.items())
        return self._catalogue
