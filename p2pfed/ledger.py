"""The node's ledger: an append-only, hash-chained, signed log in SQLite.

Every entry links to the previous one by hash and is signed by the node's key::

    entry_hash = sha256(b"p2pfed/v1/ledger\\0"
                        + msgpack([index, kind, timestamp_ms, body, prev_hash]))
    signature  = ed25519(entry_hash)

A signed *head* (entry count and last hash) is kept beside the entries, so cutting off the tail
is found too.  Editing, deleting or reordering entries breaks a hash or a link at a precise index,
which :func:`verify_ledger` names.  The ledger never reads the clock: timestamps are inputs.

Entries that precede a send are appended with ``durable=True`` (SQLite ``synchronous=FULL``);
others use ``NORMAL`` (in WAL mode they survive a process crash, and at worst the last few are
lost on power failure, never corrupted).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gossip.envelope import digest, packb, unpackb
from gossip.errors import MalformedMessageError, StorageError
from gossip.identity import Identity, verify_signature

log = logging.getLogger(__name__)

ZERO_HASH = bytes(32)
DOMAIN = b"p2pfed/v1/ledger\0"
HEAD_DOMAIN = b"p2pfed/v1/ledger-head\0"
MAX_BODY_BYTES = 16 << 20

# Entry kinds (the ledger does not interpret bodies).
OPEN = "open"
LOCAL_UPDATE = "local-update"
CONTRIBUTION = "contribution"
MIX = "mix"
CHECKPOINT = "checkpoint"
JOIN = "join"
LEAVE = "leave"
UNLEARN = "unlearn"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    ts INTEGER NOT NULL,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


@dataclass(frozen=True)
class LedgerEntry:
    index: int
    kind: str
    timestamp_ms: int
    body: dict[str, Any]
    prev_hash: bytes
    entry_hash: bytes
    signature: bytes


def entry_hash(index: int, kind: str, timestamp_ms: int, body: bytes, prev_hash: bytes) -> bytes:
    """Hash of an entry; ``body`` is its msgpack encoding as stored."""
    return digest(DOMAIN + packb([index, kind, timestamp_ms, body, prev_hash]))


def _head_message(count: int, head: bytes) -> bytes:
    return HEAD_DOMAIN + packb([count, head])


class Ledger:
    """A node's ledger.  Open with :meth:`open`; ``path=None`` keeps it in memory."""

    def __init__(self, conn: sqlite3.Connection, identity: Identity, path: Path | None) -> None:
        self._conn = conn
        self._identity = identity
        self.path = path
        row = conn.execute("SELECT idx, entry_hash FROM entries ORDER BY idx DESC LIMIT 1")
        last = row.fetchone()
        self._count = 0 if last is None else int(last[0]) + 1
        self._head = ZERO_HASH if last is None else bytes(last[1])
        self._sync = ""

    @classmethod
    def open(cls, path: Path | None, identity: Identity) -> Ledger:
        try:
            if path is None:
                conn = sqlite3.connect(":memory:", isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            owner = conn.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"ledger {path} is not a usable SQLite database: {exc}") from exc
        if owner is None:
            conn.execute("INSERT INTO meta VALUES ('owner', ?)", (identity.public_key,))
        elif bytes(owner[0]) != identity.public_key:
            conn.close()
            raise StorageError(f"ledger {path} belongs to another identity")
        ledger = cls(conn, identity, path)
        if ledger._count:
            ledger._check_head()
        else:
            ledger.append(OPEN, {"owner": identity.public_key}, timestamp_ms=0, durable=True)
        return ledger

    def _check_head(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='head'").fetchone()
        if row is None:
            raise StorageError(f"ledger {self.path} has entries but no signed head")
        count, head, _sig = unpackb(bytes(row[0]))
        if count != self._count or head != self._head:
            raise StorageError(
                f"ledger {self.path}: the signed head ({count} entries) does not match the "
                f"entries table ({self._count}); run 'p2pfed ledger verify'"
            )

    # ------------------------------------------------------------------ writing
    def append(
        self, kind: str, body: Mapping[str, Any], *, timestamp_ms: int, durable: bool = False
    ) -> LedgerEntry:
        raw = packb(dict(body))
        if len(raw) > MAX_BODY_BYTES:
            raise StorageError(f"ledger entry of {len(raw)} bytes is too large")
        index = self._count
        h = entry_hash(index, kind, timestamp_ms, raw, self._head)
        sig = self._identity.sign(h)
        head_sig = self._identity.sign(_head_message(index + 1, h))
        sync = "FULL" if durable else "NORMAL"
        try:
            if sync != self._sync:
                self._conn.execute(f"PRAGMA synchronous={sync}")
                self._sync = sync
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.execute(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (index, kind, timestamp_ms, raw, self._head, h, sig),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('head', ?)",
                    (packb([index + 1, h, head_sig]),),
                )
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot append to ledger {self.path}: {exc}") from exc
        entry = LedgerEntry(index, kind, timestamp_ms, dict(body), self._head, h, sig)
        self._count += 1
        self._head = h
        return entry

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._count

    @property
    def head_hash(self) -> bytes:
        return self._head

    def entries(self, kind: str | None = None, start: int = 0) -> Iterator[LedgerEntry]:
        query = "SELECT idx, kind, ts, body, prev_hash, entry_hash, signature FROM entries "
        query += "WHERE idx >= ? " + ("AND kind = ? " if kind is not None else "")
        params: tuple[Any, ...] = (start, kind) if kind is not None else (start,)
        for row in self._conn.execute(query + "ORDER BY idx", params).fetchall():
            yield _row_entry(row)

    def last(self, kind: str | None = None) -> LedgerEntry | None:
        query = "SELECT idx, kind, ts, body, prev_hash, entry_hash, signature FROM entries "
        if kind is None:
            row = self._conn.execute(query + "ORDER BY idx DESC LIMIT 1").fetchone()
        else:
            row = self._conn.execute(
                query + "WHERE kind = ? ORDER BY idx DESC LIMIT 1", (kind,)
            ).fetchone()
        return None if row is None else _row_entry(row)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _row_entry(row: tuple[Any, ...]) -> LedgerEntry:
    idx, kind, ts, body, prev, h, sig = row
    return LedgerEntry(int(idx), str(kind), int(ts), unpackb(bytes(body), max_bytes=MAX_BODY_BYTES),
                       bytes(prev), bytes(h), bytes(sig))


# ---------------------------------------------------------------------- verification
@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    first_bad_index: int | None
    reason: str


def _bad(entries: int, index: int | None, reason: str) -> VerifyReport:
    return VerifyReport(False, entries, index, reason)


def verify_ledger(path: Path, public_key: bytes | None = None) -> VerifyReport:
    """Check the whole chain without modifying the file; name the first bad entry.

    ``public_key`` comes from the node's identity file; without it the owner key recorded in
    the ledger is used (which only proves internal consistency).
    """
    if not path.is_file():
        return _bad(0, None, f"{path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError as exc:
        return _bad(0, None, f"cannot open {path}: {exc}")
    try:
        return _verify(conn, public_key)
    except sqlite3.DatabaseError as exc:
        return _bad(0, None, f"{path} is not a readable ledger: {exc}")
    finally:
        conn.close()


def _verify(conn: sqlite3.Connection, public_key: bytes | None) -> VerifyReport:
    owner_row = conn.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
    if owner_row is None:
        return _bad(0, None, "no owner recorded: not a p2pfed ledger")
    owner = bytes(owner_row[0])
    if public_key is not None and owner != public_key:
        return _bad(0, 0, "the ledger's recorded owner is not this node's identity")
    key = public_key or owner
    prev = ZERO_HASH
    count = 0
    rows = conn.execute(
        "SELECT idx, kind, ts, body, prev_hash, entry_hash, signature FROM entries ORDER BY idx"
    )
    for idx, kind, ts, body, prev_hash, h, sig in rows:
        if idx != count:
            return _bad(count, count, f"entry {count} is missing (next stored index is {idx})")
        if bytes(prev_hash) != prev:
            return _bad(count, count, "does not link to the previous entry (reordered or replaced)")
        if not isinstance(kind, str) or not isinstance(ts, int) or not isinstance(body, bytes):
            return _bad(count, count, "has fields of the wrong type")
        if entry_hash(idx, kind, ts, body, prev) != bytes(h):
            return _bad(count, count, "content does not match its hash (edited)")
        if not verify_signature(key, bytes(h), bytes(sig)):
            return _bad(count, count, "signature does not verify")
        try:
            unpackb(body, max_bytes=MAX_BODY_BYTES)
        except MalformedMessageError:
            return _bad(count, count, "body is not valid msgpack")
        prev = bytes(h)
        count += 1
    head_row = conn.execute("SELECT value FROM meta WHERE key='head'").fetchone()
    if head_row is None:
        return _bad(count, count if count else None, "no signed head")
    try:
        head_count, head_hash, head_sig = unpackb(bytes(head_row[0]))
    except (MalformedMessageError, ValueError, TypeError):
        return _bad(count, count, "signed head is malformed")
    if not verify_signature(key, _head_message(head_count, head_hash), head_sig):
        return _bad(count, count, "signed head does not verify")
    if head_count > count:
        return _bad(count, count, f"entries {count}..{head_count - 1} were cut off the tail")
    if head_count < count or head_hash != prev:
        return _bad(count, head_count, "entries after the signed head (appended by someone else)")
    return VerifyReport(True, count, None, "ok")
