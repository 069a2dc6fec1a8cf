"""What every record shares: the schema version, checked fields, `Record` and `Stored`."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from gossip.errors import StorageError
from p2pfed.lineage import Lineage

#: the version of the entry bodies this code writes
SCHEMA = 3  # (2: lineages as packed member tags, p2pfed.lineage; 3: provenance fields)
_VERSION = "v"
_MISSING: Any = object()


class SchemaError(StorageError):
    """A ledger entry whose body does not hold what its kind says (signed, so written by this
    node: a bug or a newer p2pfed; never by a peer)."""

    code = "ledger-schema"


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
           default: Any = _MISSING) -> Any:
    if key not in body:
        if default is _MISSING:
            raise SchemaError(f"no field {key!r}")
        return default
    value = body[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SchemaError(f"field {key!r} is a {type(value).__name__}, not a {name}")
    return value


def _strs(body: Mapping[str, Any], key: str, default: Any = _MISSING) -> tuple[str, ...]:
    value = _field(body, key, (list, tuple), default)
    if not all(isinstance(v, str) for v in value):
        raise SchemaError(f"field {key!r} holds a non-string")
    return tuple(value)


def _lineage(body: Mapping[str, Any], key: str, default: Any = _MISSING) -> Lineage:
    """A lineage field: packed tags, or (schema 0 and 1) a list of peer ids."""
    value = _field(body, key, (bytes, list, tuple), default)
    try:
        return Lineage.decode(value, trusted=True)  # (the node's own signed entries)
    except ValueError as exc:
        raise SchemaError(f"field {key!r}: {exc}") from exc


#: the provenance fields a record may carry (schema 3): never a rule's memory or audit
PROV_FIELDS = ("mass", "prov_flags")
#: the largest ``prov_flags`` (``PARTIAL | APPROX``)
PROV_FLAGS_MAX = 3


def _prov(body: Mapping[str, Any]) -> tuple[bytes | None, int | None]:
    """A record's mass vector and its flags (None, None: not written)."""
    return _field(body, "mass", bytes, None), _field(body, "prov_flags", int, None)


def _prov_body(mass: bytes | None, flags: int | None) -> dict[str, Any]:
    """The provenance fields to write: none when there is no vector."""
    return {} if mass is None else {"mass": mass, "prov_flags": flags}


def _check_finite(key: str, value: object) -> None:
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise SchemaError(f"field {key!r} is {value!r}, not a finite number >= 0")


def _check_prov(mass: bytes | None, flags: int | None, lineage: Lineage) -> None:
    """``mass`` is little-endian float64s, finite and >= 0, one per member of ``lineage``, and
    comes with its flags (0..3), or neither is there."""
    if (mass is None) != (flags is None):
        raise SchemaError("fields 'mass' and 'prov_flags' come together")
    if mass is None:
        return
    if not isinstance(mass, bytes):
        raise SchemaError(f"field 'mass' is a {type(mass).__name__}, not a bytes")
    if len(mass) % 8:
        raise SchemaError(f"field 'mass' holds {len(mass)} bytes, not a whole number of "
                          "float64s")
    if len(mass) != 8 * len(lineage):
        raise SchemaError(f"field 'mass' holds {len(mass) // 8} values for a lineage of "
                          f"{len(lineage)} members")
    if not all(math.isfinite(m) and m >= 0 for m in struct.unpack(f"<{len(mass) // 8}d", mass)):
        raise SchemaError("field 'mass' holds a value that is negative or not finite")
    if not isinstance(flags, int) or isinstance(flags, bool) or not 0 <= flags <= PROV_FLAGS_MAX:
        raise SchemaError(f"field 'prov_flags' is {flags!r}, not an int in 0..{PROV_FLAGS_MAX}")


def _check_extra(extra: Mapping[str, Any], known: Iterable[str], what: str) -> None:
    """A rule's ``what`` (memory, audit) uses none of the record's own field names."""
    clash = sorted(set(extra) & {*known, _VERSION})
    if clash:
        raise SchemaError(f"{what} uses the record's own field names {clash}")


def _floats(body: Mapping[str, Any], skip: Iterable[str]) -> dict[str, float]:
    """The numeric fields of ``body`` not in ``skip`` (a mixing rule's memory)."""
    skip = set(skip) | {_VERSION}
    return {k: float(v) for k, v in body.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)}


class Record:
    """A ledger entry's body, typed.  Subclasses are frozen dataclasses."""

    KIND: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_body(self) -> dict[str, Any]:
        """The body to append (with the schema version)."""
        return {**self.fields(), _VERSION: SCHEMA}

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Record:
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Record:
        """Decode and check ``body`` (:class:`SchemaError` when it is not one of these)."""
        version = _field(body, _VERSION, int, 0)
        if version > SCHEMA:
            raise SchemaError(f"written with ledger schema {version}; this p2pfed reads up to "
                              f"{SCHEMA} (upgrade p2pfed)")
        return cls.from_fields(body)


R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Stored(Generic[R]):
    """A record as read back: where it is in the ledger, and when it was written."""

    index: int
    timestamp_ms: int
    record: R


