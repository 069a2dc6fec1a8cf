"""What every record shares: the schema version, checked fields, `Record` and `Stored`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from gossip.errors import StorageError
from p2pfed.lineage import Lineage

#: the version of the entry bodies this code writes
SCHEMA = 2  # (2: lineages as packed member tags, p2pfed.lineage)
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


