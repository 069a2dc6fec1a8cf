"""The node's ledger: an append-only, hash-chained, signed log in SQLite.

Every entry links to the previous one by hash and is signed by the node's key::

    entry_hash = sha256(b"p2pfed/v1/ledger\\0"
                        + msgpack([index, kind, timestamp_ms, body, prev_hash]))
    signature  = ed25519(entry_hash)

with ``prev_hash`` of entry 0 all zeros.  ``body`` is a msgpack map, stored as the exact bytes
that were hashed.  A signed *head* record (entry count and last hash) is rewritten in the same
transaction as each append, so cutting entries off the tail is found too.  Editing, deleting or
reordering entries breaks a hash or a link at a precise index, which :func:`verify_ledger` names.
Entry 0 is always an ``open`` entry naming the owner's public key, written when the ledger is
created.  The ledger never reads the clock: timestamps are inputs.

Durability: WAL mode.  Entries that precede a send use ``durable=True`` (``synchronous=FULL``:
the commit, and every earlier one, is on disk when ``append`` returns); the others use
``NORMAL`` (they survive a process crash; a power cut may lose the last few, never corrupt).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gossip.envelope import digest, packb, unpackb
from gossip.errors import LedgerIntegrityError, LocalError, MalformedMessageError, StorageError
from gossip.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify_signature
from p2pfed.home import fsync_dir

log = logging.getLogger(__name__)

FORMAT = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
DOMAIN = b"p2pfed/v1/ledger\0"
HEAD_DOMAIN = b"p2pfed/v1/ledger-head\0"
MAX_BODY_BYTES = 4 << 20
MAX_KIND_CHARS = 64
_BATCH = 512

# Entry kinds used across p2pfed (the ledger itself does not interpret bodies).
OPEN = "open"
LOCAL_UPDATE = "local-update"
CONTRIBUTION = "contribution"
MIX = "mix"
CHECKPOINT = "checkpoint"
JOIN = "join"
LEAVE = "leave"
UNLEARN = "unlearn"

_SCHEMA = """
CREATE TABLE entries (idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, ts INTEGER NOT NULL,
    body BLOB NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL,
    signature BLOB NOT NULL);
CREATE INDEX entries_by_kind ON entries (kind, idx);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
_COLUMNS = "idx, kind, ts, body, prev_hash, entry_hash, signature"


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


def entry_hash(index: int, kind: str, timestamp_ms: int, body: bytes, prev_hash: bytes) -> bytes:
    """The hash of an entry whose body has the msgpack encoding ``body``.

    Equal to ``digest(DOMAIN + packb([index, kind, timestamp_ms, body_map, prev_hash]))``: a
    msgpack array is its header followed by its elements, so the stored body bytes are hashed
    exactly as stored (a re-encoded but equal body would not verify).
    """
    head = b"\x95" + packb(index) + packb(kind) + packb(timestamp_ms)
    return digest(DOMAIN + head + body + packb(prev_hash))


def _head_message(count: int, head: bytes) -> bytes:
    return HEAD_DOMAIN + packb([count, head])


def _signed_head(value: object, key: bytes) -> tuple[int, bytes] | str:
    """(count, last hash) from the stored head record, or why it cannot be trusted."""
    try:
        fields = unpackb(value) if isinstance(value, bytes) else None
    except MalformedMessageError:
        fields = None
    if not (isinstance(fields, list) and len(fields) == 3 and isinstance(fields[0], int)
            and isinstance(fields[1], bytes) and isinstance(fields[2], bytes)):
        return "the signed head record is missing or malformed"
    count, head, sig = fields
    if not verify_signature(key, _head_message(count, head), sig):
        return "the signed head record does not verify (edited)"
    return count, head


def _head_problem(signed: tuple[int, bytes], count: int, last: bytes) -> tuple[int, str] | None:
    """(first bad index, reason) when ``count`` entries ending in ``last`` contradict the head."""
    head_count, head_hash = signed
    if head_count > count:
        return count, (f"entries {count}..{head_count - 1} were cut off the tail "
                       f"(the signed head records {head_count} entries)")
    if head_count < count:
        return head_count, f"entries from {head_count} on are not covered by the signed head"
    if count == 0:
        return 0, "the ledger has no entries"
    if head_hash != last:
        return count - 1, "the last entry does not match the signed head"
    return None


def _encode_body(body: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The canonical bytes of ``body`` and the dict a reader will get back from them."""
    if not isinstance(body, Mapping):
        raise LocalError(f"a ledger body must be a mapping, not {type(body).__name__}")
    if not all(isinstance(k, str) for k in body):
        raise LocalError("ledger body keys must be strings")
    try:
        raw = packb(dict(body))
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalError(f"ledger body cannot be encoded as msgpack: {exc}") from exc
    if len(raw) > MAX_BODY_BYTES:
        raise LocalError(f"ledger body of {len(raw)} bytes exceeds the cap of {MAX_BODY_BYTES}")
    try:
        decoded = unpackb(raw, max_bytes=MAX_BODY_BYTES)
    except MalformedMessageError as exc:  # e.g. a nested map with non-string keys
        raise LocalError(f"ledger body does not round-trip through msgpack: {exc}") from exc
    return raw, decoded


def _row_entry(row: tuple[Any, ...]) -> LedgerEntry:
    idx, kind, ts, body, prev, h, sig = row
    try:
        decoded = unpackb(bytes(body), max_bytes=MAX_BODY_BYTES)
    except MalformedMessageError:
        decoded = None
    if not isinstance(decoded, dict):
        raise LedgerIntegrityError(int(idx), "body is not a msgpack map")
    return LedgerEntry(int(idx), str(kind), int(ts), decoded, bytes(prev), bytes(h), bytes(sig))


def _connect(path: Path, mode: str) -> sqlite3.Connection:
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


class Ledger:
    """A node's ledger.  Open with :meth:`open`; ``path=None`` keeps it in memory.

    Safe to share between threads (one lock serialises access); the runtime appends from its
    event-loop thread while :func:`verify_ledger` may read the file from another connection.
    """

    def __init__(self, conn: sqlite3.Connection, identity: Identity, path: Path | None) -> None:
        self._conn = conn
        self._identity = identity
        self._lock = threading.Lock()
        self._closed = False
        self._sync = ""
        self.path = path
        row = conn.execute("SELECT idx, entry_hash FROM entries ORDER BY idx DESC LIMIT 1")
        last = row.fetchone()
        self._count = 0 if last is None else int(last[0]) + 1
        self._head = ZERO_HASH if last is None else bytes(last[1])

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Path | None, identity: Identity, *, timestamp_ms: int = 0) -> Ledger:
        """Open the ledger at ``path``, creating it (with its ``open`` entry) if absent.

        ``timestamp_ms`` stamps the ``open`` entry of a new ledger.  An existing file must belong
        to ``identity`` and have a consistent head (the last entry and the signed head are
        checked; :func:`verify_ledger` checks everything).  Raises :class:`StorageError`
        (:class:`LedgerIntegrityError` for a broken head).
        """
        if path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.executescript(_SCHEMA)
            return cls._initialise(conn, identity, None, timestamp_ms)
        if not path.exists():
            cls._create(path, identity, timestamp_ms)
        try:
            conn = _connect(path, "rw")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open ledger {path}: {exc}") from exc
        try:
            ledger = cls._attach(conn, identity, path)
        except (StorageError, sqlite3.Error) as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"ledger {path} is not a usable SQLite ledger: {exc}") from exc
            raise
        log.debug("opened ledger %s with %d entries", path, len(ledger))
        return ledger

    @classmethod
    def _attach(cls, conn: sqlite3.Connection, identity: Identity, path: Path) -> Ledger:
        """Check an existing ledger file before anything is written to it."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"entries", "meta"} <= tables:
            raise StorageError(f"{path} is not a p2pfed ledger: it has no ledger tables")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT or not isinstance(meta.get("owner"), bytes):
            raise StorageError(f"{path} is not a p2pfed ledger (format {meta.get('format')!r})")
        if meta["owner"] != identity.public_key:
            raise StorageError(
                f"ledger {path} belongs to another identity; it cannot be opened with "
                f"{identity.peer_id}"
            )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("ledger %s runs in journal mode %s, not WAL", path, mode)
        ledger = cls(conn, identity, path)
        ledger._check_head(meta.get("head"))
        return ledger

    @classmethod
    def _initialise(
        cls, conn: sqlite3.Connection, identity: Identity, path: Path | None, timestamp_ms: int
    ) -> Ledger:
        conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        conn.execute("INSERT INTO meta VALUES ('owner', ?)", (identity.public_key,))
        ledger = cls(conn, identity, path)
        ledger.append(OPEN, {"owner": identity.public_key, "peer_id": identity.peer_id,
                             "format": FORMAT}, timestamp_ms=timestamp_ms, durable=True)
        return ledger

    @classmethod
    def _create(cls, path: Path, identity: Identity, timestamp_ms: int) -> None:
        """Build a new ledger beside ``path`` and rename it into place (never half-created)."""
        wal, tmp = Path(f"{path}-wal"), path.with_name(path.name + ".new")
        if wal.exists() and wal.stat().st_size > 0:
            raise StorageError(f"ledger {path} is missing but its write-ahead log {wal} is not")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in (wal, Path(f"{path}-shm"), tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                stale.unlink(missing_ok=True)
            conn = _connect(tmp, "rwc")
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                cls._initialise(conn, identity, tmp, timestamp_ms)
            finally:
                conn.close()  # checkpoints the WAL into the file and removes it
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot create ledger {path}: {exc}") from exc
        log.info("created ledger %s for %s", path, identity.peer_id)

    def _check_head(self, head: object) -> None:
        """Cheap consistency check of the signed head and the last entry."""
        n, key = self._count, self._identity.public_key
        signed = _signed_head(head, key)
        if isinstance(signed, str):
            raise LedgerIntegrityError(n, signed)
        problem = _head_problem(signed, n, self._head)
        if problem is not None:
            raise LedgerIntegrityError(*problem)
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM entries WHERE idx >= ? ORDER BY idx", (n - 2,)
        ).fetchall()
        prev = ZERO_HASH if n == 1 else bytes(rows[0][5])
        reason = _check_row(rows[-1], n - 1, prev, key)
        if reason is not None:
            raise LedgerIntegrityError(n - 1, f"{reason}; run 'p2pfed ledger verify'")

    # ------------------------------------------------------------------ writing
    def append(
        self, kind: str, body: Mapping[str, Any], *, timestamp_ms: int, durable: bool = False
    ) -> LedgerEntry:
        """Append, sign and commit one entry; ``durable=True`` before anything is sent."""
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
            raise LocalError(f"ledger entry kind must be 1..{MAX_KIND_CHARS} characters")
        if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool) or timestamp_ms < 0:
            raise LocalError(f"ledger timestamp must be a non-negative int, not {timestamp_ms!r}")
        raw, decoded = _encode_body(body)
        with self._lock:
            self._check_open()
            index, prev = self._count, self._head
            h = entry_hash(index, kind, timestamp_ms, raw, prev)
            sig = self._identity.sign(h)
            head_sig = self._identity.sign(_head_message(index + 1, h))
            try:
                self._set_sync("FULL" if durable else "NORMAL")
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (index, kind, timestamp_ms, raw, prev, h, sig),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('head', ?)",
                    (packb([index + 1, h, head_sig]),),
                )
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise StorageError(f"cannot append to ledger {self.path}: {exc}") from exc
            self._count = index + 1
            self._head = h
        return LedgerEntry(index, kind, timestamp_ms, decoded, prev, h, sig)

    def _set_sync(self, mode: str) -> None:
        if self.path is not None and mode != self._sync:
            self._conn.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._count

    @property
    def head_hash(self) -> bytes:
        """Hash of the last entry (all zeros for an empty chain)."""
        return self._head

    def entries(self, kind: str | None = None, start: int = 0) -> Iterator[LedgerEntry]:
        """Entries with index >= ``start`` (of ``kind`` if given), in order, read in batches."""
        where = "idx >= ?" + (" AND kind = ?" if kind is not None else "")
        query = f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY idx LIMIT {_BATCH}"
        nxt = start
        while True:
            params: tuple[Any, ...] = (nxt, kind) if kind is not None else (nxt,)
            rows = self._fetch(query, params)
            for row in rows:
                yield _row_entry(row)
            if len(rows) < _BATCH:
                return
            nxt = int(rows[-1][0]) + 1

    def get(self, index: int) -> LedgerEntry:
        rows = self._fetch(f"SELECT {_COLUMNS} FROM entries WHERE idx = ?", (index,))
        if not rows:
            raise IndexError(f"no ledger entry {index}")
        return _row_entry(rows[0])

    def last(self, kind: str | None = None) -> LedgerEntry | None:
        """The last entry (of ``kind`` if given), or None."""
        where, params = ("", ()) if kind is None else ("WHERE kind = ?", (kind,))
        rows = self._fetch(f"SELECT {_COLUMNS} FROM entries {where} ORDER BY idx DESC LIMIT 1",
                           params)
        return _row_entry(rows[0]) if rows else None

    def verify(self, public_key: bytes | None = None) -> VerifyReport:
        """Verify this ledger through its own connection (works for in-memory ledgers)."""
        with self._lock:
            self._check_open()
            return _verify_connection(self._conn, public_key)

    def _fetch(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(query, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read ledger {self.path}: {exc}") from exc

    # ------------------------------------------------------------------ closing
    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"ledger {self.path} is closed")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------- verification
@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a full verification.

    ``entries`` counts the entries that verified, in order, before the first problem (all of
    them when ``ok``).  ``first_bad_index`` is the index of the first bad or missing entry, or
    None when the problem is not an entry (unreadable file, foreign owner key).
    """

    ok: bool
    entries: int
    first_bad_index: int | None
    reason: str


def _bad(entries: int, index: int | None, reason: str) -> VerifyReport:
    return VerifyReport(False, entries, index, reason)


def _check_row(row: tuple[Any, ...], expected: int, prev: bytes, key: bytes) -> str | None:
    """Why the row stored for index ``expected`` is bad, or None when it verifies."""
    idx, kind, ts, body, prev_hash, h, sig = row
    if not isinstance(idx, int) or isinstance(idx, bool):
        return f"has a non-integer index {idx!r}"
    if idx > expected:
        return f"is missing (the next stored index is {idx})"
    if idx != expected:
        return f"is stored under the unexpected index {idx}"
    sizes = ((prev_hash, HASH_BYTES), (h, HASH_BYTES), (sig, SIGNATURE_BYTES), (body, None))
    if not (isinstance(kind, str) and isinstance(ts, int) and all(
            isinstance(v, bytes) and n in (None, len(v)) for v, n in sizes)):
        return "has fields of the wrong type or size"
    if prev_hash != prev:
        return "does not link to the previous entry (entries reordered, replaced or removed)"
    if entry_hash(idx, kind, ts, body, prev_hash) != h:
        return "content does not match its hash (kind, timestamp or body edited)"
    if not verify_signature(key, h, sig):
        return "signature does not verify (replaced or forged)"
    try:
        decoded = unpackb(body, max_bytes=MAX_BODY_BYTES)
    except MalformedMessageError:
        return "body is not valid msgpack"
    if not isinstance(decoded, dict):
        return "body is not a msgpack map"
    if idx == 0 and (kind != OPEN or decoded.get("owner") != key):
        return "the first entry is not an 'open' entry naming the owner's key"
    return None


def _verify_connection(conn: sqlite3.Connection, public_key: bytes | None) -> VerifyReport:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"entries", "meta"} <= tables:
        return _bad(0, None, "not a p2pfed ledger: the database has no ledger tables")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        return _bad(0, None, f"unsupported ledger format {meta.get('format')!r}")
    owner = meta.get("owner")
    if not isinstance(owner, bytes) or len(owner) != PUBLIC_KEY_BYTES:
        return _bad(0, None, "the ledger records no valid owner key")
    if public_key is not None and owner != public_key:
        return _bad(0, None, "the ledger belongs to another identity than the given key")
    key = owner if public_key is None else public_key
    prev = ZERO_HASH
    count = 0
    for row in conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY idx"):
        reason = _check_row(row, count, prev, key)
        if reason is not None:
            return _bad(count, count, f"entry {count} {reason}")
        prev = row[5]
        count += 1
    signed = _signed_head(meta.get("head"), key)
    if isinstance(signed, str):
        return _bad(count, count, f"{signed}; entries from {count} on may have been cut off")
    problem = _head_problem(signed, count, prev)
    if problem is not None:
        return _bad(min(count, problem[0]), problem[0], problem[1])
    return VerifyReport(True, count, None, "ok")


def verify_ledger(path: Path, public_key: bytes | None = None) -> VerifyReport:
    """Check the whole chain read-only and name the first bad entry; never raises on bad files.

    ``public_key`` comes from the node's identity file; without it the owner key recorded in
    the ledger is used, which proves only internal consistency.  Reads one snapshot, so it is
    safe while the daemon appends.
    """
    if not path.is_file():
        return _bad(0, None, f"no ledger file at {path}")
    try:
        conn = _connect(path, "ro")
    except sqlite3.Error as exc:
        return _bad(0, None, f"cannot open {path}: {exc}")
    try:
        conn.execute("BEGIN")  # one read snapshot for entries and head
        return _verify_connection(conn, public_key)
    except sqlite3.Error as exc:
        return _bad(0, None, f"{path} is not a readable SQLite ledger: {exc}")
    finally:
        conn.close()


def read_entries(path: Path) -> list[LedgerEntry]:
    """Every entry of the ledger at ``path``, read-only in one snapshot (verify it first)."""
    conn = _connect(path, "ro")
    try:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY idx").fetchall()
    finally:
        conn.close()
    return [_row_entry(row) for row in rows]
