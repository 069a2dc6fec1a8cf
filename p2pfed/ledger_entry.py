"""A ledger entry as read back, and reading a ledger file read-only (entries a compaction
deleted are gone: see :mod:`p2pfed.ledger_verify`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossip.envelope import unpackb
from gossip.errors import LedgerIntegrityError, MalformedMessageError
from p2pfed.ledger_verify import COLUMNS, MAX_BODY_BYTES, connect


@dataclass(frozen=True)
class LedgerEntry:
    """One entry, as appended or read back (``body`` decoded: tuples come back as lists)."""

    index: int
    kind: str
    timestamp_ms: int
    body: dict[str, Any]
    prev_hash: bytes
    entry_hash: bytes
    signature: bytes


def row_entry(row: tuple[Any, ...]) -> LedgerEntry:
    """The entry a stored row holds (its body decoded)."""
    idx, kind, ts, body, prev, h, sig = row
    try:
        decoded = unpackb(bytes(body), max_bytes=MAX_BODY_BYTES)
    except MalformedMessageError:
        decoded = None
    if not isinstance(decoded, dict):
        raise LedgerIntegrityError(int(idx), "body is not a msgpack map")
    return LedgerEntry(int(idx), str(kind), int(ts), decoded, bytes(prev), bytes(h), bytes(sig))


def read_entries(path: Path) -> list[LedgerEntry]:
    """Every entry of the ledger at ``path``, read-only in one snapshot (verify it first)."""
    conn = connect(path, "ro")
    try:
        rows = conn.execute(f"SELECT {COLUMNS} FROM entries WHERE length(body) > 0 "
                            "ORDER BY idx").fetchall()
    finally:
        conn.close()
    return [row_entry(row) for row in rows]
