"""The node's ledger: an append-only, hash-chained, signed log in SQLite.

Every entry links to the previous one by hash and is signed by the node's key::

    entry_hash = sha256(b"p2pfed/v1/ledger\\0"
                        + msgpack([index, kind, timestamp_ms, body, prev_hash]))
    signature  = ed25519(entry_hash)

with ``prev_hash`` of entry 0 all zeros.  ``body`` is a msgpack map, stored as the exact bytes
that were hashed.  A signed *head* record (entry count and last hash) is rewritten in the same
transaction as each append, so cutting entries off the tail is found too.  Editing, deleting or
reordering entries breaks a hash or a link at a precise index, which :func:`verify_ledger` names.
A signed *verified mark* records how far the owner has read back and verified the chain, so
start-up and ``status`` check only what came after it (:mod:`p2pfed.ledger_verify` holds these
rules).  Entry 0 is always an ``open`` entry naming the owner's public key, written when the
ledger is created.  The ledger never reads the clock: timestamps are inputs.

Durability: WAL mode.  Entries that precede a send use ``durable=True`` (``synchronous=FULL``:
the commit, and every earlier one, is on disk when ``append`` returns); the others use
``NORMAL`` (they survive a process crash; a power cut may lose the last few, never corrupt).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from gossip.envelope import packb
from gossip.errors import LedgerIntegrityError, StorageError
from gossip.identity import Identity
from p2pfed.home import (
    PRIVATE_FILE,
    MissingStateError,
    fsync_dir,
    make_private,
    storage_error,
)
from p2pfed.kinds import COMPACTION
from p2pfed.ledger_entry import LedgerEntry, read_entries, row_entry
from p2pfed.ledger_verify import (
    COLUMNS,
    DOMAIN,
    FORMAT,
    HASH_BYTES,
    HEAD_DOMAIN,
    MAX_BODY_BYTES,
    MAX_KIND_CHARS,
    OPEN,
    VERIFIED_DOMAIN,
    ZERO_HASH,
    Gaps,
    VerifyReport,
    bad,
    chain_message,
    check_entry,
    check_row,
    check_rows,
    connect,
    entry_hash,
    gaps_digest,
    head_problem,
    merge_gaps,
    read_gaps,
    signed_pair,
    verify_connection,
    verify_ledger,
)

# The ledger chains and signs bodies without reading them: the kinds of entry are named in
# p2pfed.kinds and what each body holds in p2pfed.journal.
__all__ = [
    "DOMAIN", "FORMAT", "HASH_BYTES", "MAX_BODY_BYTES", "MAX_KIND_CHARS", "OPEN", "ZERO_HASH",
    "Ledger", "LedgerEntry", "VerifyReport", "entry_hash", "read_entries", "verify_ledger",
]

log = logging.getLogger(__name__)

_BATCH = 512

_SCHEMA = """
CREATE TABLE entries (idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, ts INTEGER NOT NULL,
    body BLOB NOT NULL, prev_hash BLOB NOT NULL, entry_hash BLOB NOT NULL,
    signature BLOB NOT NULL);
CREATE INDEX entries_by_kind ON entries (kind, idx);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


class Ledger:
    """A node's ledger.  Open with :meth:`open`; ``path=None`` keeps it in memory.

    Safe to share between threads (one lock serialises access); the runtime appends from its
    event-loop thread while :meth:`verify_new` runs in a worker thread and :func:`verify_ledger`
    may read the file from another connection.
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
        #: entries read back and verified: (count, hash of the last); see ledger_verify
        self._verified: tuple[int, bytes] = (0, ZERO_HASH)
        self._anchored = True  # whether the entry under the verified mark was re-checked
        self._problem: VerifyReport | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Path | None, identity: Identity, *, timestamp_ms: int = 0,
             create: bool = True) -> Ledger:
        """Open the ledger at ``path``, creating it (with its ``open`` entry) if absent.

        ``timestamp_ms`` stamps the ``open`` entry of a new ledger; ``create=False`` refuses a
        missing file (:class:`~p2pfed.home.MissingStateError`).  An existing file must belong
        to ``identity`` and have a consistent head (the last entry and the signed head are
        checked; :meth:`verify_new` checks what was appended since the last verification,
        :func:`verify_ledger` everything).  Raises :class:`StorageError`
        (:class:`LedgerIntegrityError` for a broken head, a ``DiskFullError`` for a full disk).
        """
        if path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.executescript(_SCHEMA)
            return cls._initialise(conn, identity, None, timestamp_ms)
        if not path.exists():
            if not create:
                raise MissingStateError(f"no ledger at {path}")
            cls._create(path, identity, timestamp_ms)
        for part in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                make_private(part, PRIVATE_FILE)
            except OSError as exc:
                raise storage_error(exc, f"cannot make {part} private") from exc
        try:
            conn = connect(path, "rw")
        except sqlite3.Error as exc:
            raise storage_error(exc, f"cannot open ledger {path}") from exc
        try:
            ledger = cls._attach(conn, identity, path)
        except (StorageError, sqlite3.Error) as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise storage_error(exc, f"ledger {path} is not a usable SQLite ledger") from exc
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
        ledger._load_mark(meta.get("verified"))
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
            # owner-only whatever the umask; SQLite gives its -wal/-shm files the same mode
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
            os.chmod(tmp, PRIVATE_FILE)
            conn = connect(tmp, "rwc")
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                cls._initialise(conn, identity, tmp, timestamp_ms)
            finally:
                conn.close()  # checkpoints the WAL into the file and removes it
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except (OSError, sqlite3.Error) as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(exc, f"cannot create ledger {path}") from exc
        log.info("created ledger %s for %s", path, identity.peer_id)

    def _check_head(self, head: object) -> None:
        """Cheap consistency check of the signed head and the last entry."""
        n, key = self._count, self._identity.public_key
        signed = signed_pair(head, key, HEAD_DOMAIN)
        if isinstance(signed, str):
            raise LedgerIntegrityError(n, signed)
        problem = head_problem(signed, n, self._head)
        if problem is not None:
            raise LedgerIntegrityError(*problem)
        rows = self._conn.execute(
            f"SELECT {COLUMNS} FROM entries WHERE idx >= ? ORDER BY idx", (n - 2,)
        ).fetchall()
        prev = ZERO_HASH if n == 1 else bytes(rows[0][5])
        reason = check_row(rows[-1], n - 1, prev, key)
        if reason is not None:
            raise LedgerIntegrityError(n - 1, f"{reason}; run 'p2pfed ledger verify'")

    def _load_mark(self, value: object) -> None:
        """Take the stored verified mark if it is ours and fits the entries."""
        if value is None:
            return  # never verified (a new ledger, or one from before marks)
        mark = signed_pair(value, self._identity.public_key, VERIFIED_DOMAIN)
        if isinstance(mark, str):
            log.warning("ledger %s: %s; verifying every entry", self.path, mark)
        elif mark[0] > self._count:
            self._problem = bad(self._count, self._count,
                                f"entries {self._count}..{mark[0] - 1} were verified once and "
                                "are gone")
        else:
            self._verified, self._anchored = mark, mark[0] == 0

    # ------------------------------------------------------------------ writing
    def append(
        self, kind: str, body: Mapping[str, Any], *, timestamp_ms: int, durable: bool = False
    ) -> LedgerEntry:
        """Append, sign and commit one entry; ``durable=True`` before anything is sent."""
        return self.append_many([(kind, body, timestamp_ms)], durable=durable)[0]

    def append_many(self, items: Iterable[tuple[str, Mapping[str, Any], int]], *,
                    durable: bool = False, delete: Sequence[int] = ()) -> list[LedgerEntry]:
        """Append ``(kind, body, timestamp_ms)`` entries in one transaction: all or none
        (with ``delete``, those entries are deleted in it: see :meth:`compact`)."""
        encoded = [check_entry(kind, body, ts) for kind, body, ts in items]
        out: list[LedgerEntry] = []
        with self._lock:
            self._check_open()
            index, prev = self._count, self._head
            rows = []
            for kind, ts, raw, decoded in encoded:
                h = entry_hash(index, kind, ts, raw, prev)
                sig = self._identity.sign(h)
                rows.append((index, kind, ts, raw, prev, h, sig))
                out.append(LedgerEntry(index, kind, ts, decoded, prev, h, sig))
                index, prev = index + 1, h
            if not rows:
                return out
            head_sig = self._identity.sign(chain_message(HEAD_DOMAIN, index, prev))
            try:
                self._set_sync("FULL" if durable else "NORMAL")
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    f"INSERT INTO entries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.executemany("DELETE FROM entries WHERE idx = ?",
                                       [(i,) for i in delete])
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('head', ?)",
                                   (packb([index, prev, head_sig]),))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise storage_error(exc, f"cannot append to ledger {self.path}") from exc
            self._count, self._head = index, prev
        return out

    def compact(self, indexes: Iterable[int], timestamp_ms: int,
                extra: Mapping[str, Any]) -> LedgerEntry | None:
        """Delete the entries at ``indexes`` (never entry 0) with the compaction entry before,
        and append the signed ``compaction`` entry that names every run deleted so far (with
        ``extra`` fields; see ledger_verify), durably, in one transaction.  None when none of
        them is left to delete."""
        found = self._hashes(sorted(set(indexes) - {0}))
        if not found:
            return None
        with self._lock:
            old = read_gaps(self._conn)
        if isinstance(old, str):
            raise LedgerIntegrityError(len(self), old)
        earlier = self._hashes([int(r[0]) for r in self._fetch(
            "SELECT idx FROM entries WHERE kind = ?", (COMPACTION,))])
        hashes = dict(found + earlier)
        gaps = merge_gaps(old, hashes)
        body = {**extra, "gaps": [[a, b, h] for a, (b, h) in sorted(gaps.items())],
                "count": sum(b - a for a, (b, _h) in gaps.items()), "digest": gaps_digest(gaps)}
        return self.append_many([(COMPACTION, body, timestamp_ms)], durable=True,
                                delete=sorted(hashes))[0]

    def _hashes(self, indexes: Sequence[int]) -> list[tuple[int, bytes]]:
        """(index, hash) of the entries at ``indexes`` still stored."""
        found: list[tuple[int, bytes]] = []
        for start in range(0, len(indexes), _BATCH):
            chunk = indexes[start:start + _BATCH]
            found += [(int(i), bytes(h)) for i, h in self._fetch(
                f"SELECT idx, entry_hash FROM entries WHERE idx IN ({','.join('?' * len(chunk))})",
                tuple(chunk))]
        return found

    def _set_sync(self, mode: str) -> None:
        if self.path is not None and mode != self._sync:
            self._conn.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    # ------------------------------------------------------------------ verifying
    @property
    def verified(self) -> int:
        """How many entries (from the first) were read back and verified."""
        return self._verified[0]

    @property
    def problem(self) -> VerifyReport | None:
        """What :meth:`verify_new` found wrong (it stays until the ledger is reopened)."""
        return self._problem

    def verify_new(self) -> VerifyReport:
        """Verify the entries after the verified mark and the signed head; advance the (signed)
        mark.  Costs what was appended since, never the whole history (an edit below the mark
        is left to :func:`verify_ledger`); reads in batches, letting appends in between; never
        raises on a bad entry (the report, and :attr:`problem`, say what is wrong)."""
        key = self._identity.public_key
        checked = 0
        while True:
            with self._lock:
                self._check_open()
                if self._problem is not None:
                    return self._problem
                start, prev = self._verified
                try:
                    gaps = read_gaps(self._conn)
                    anchor = gaps if isinstance(gaps, str) else self._check_anchor(key, gaps)
                    rows = self._conn.execute(
                        f"SELECT {COLUMNS} FROM entries WHERE idx >= ? ORDER BY idx "
                        f"LIMIT {_BATCH}", (start,)).fetchall()
                except sqlite3.Error as exc:
                    raise storage_error(exc, f"cannot read ledger {self.path}") from exc
                if anchor is not None or isinstance(gaps, str):  # the mark vouches for nothing
                    self._verified = (0, ZERO_HASH)
                    self._problem = bad(start - 1, start - 1, str(anchor), checked + 1)
                    return self._problem
                count, prev, reason = check_rows(rows, start, prev, key, gaps)
                self._verified = (count, prev)
                checked += count - start
                if reason is not None:
                    self._problem = bad(count, count, reason, checked + 1)
                    return self._problem
                if len(rows) == _BATCH:
                    continue
                return self._finish_verify(count, prev, checked)

    def _check_anchor(self, key: bytes, gaps: Gaps) -> str | None:
        """Re-check the entry under a stored mark once (its own hash and signature; when a
        compaction deleted it since, the run that holds it must end with the marked hash)."""
        if self._anchored:
            return None
        count, prev = self._verified
        row = self._conn.execute(f"SELECT {COLUMNS} FROM entries WHERE idx = ?",
                                 (count - 1,)).fetchone()
        if row is None:
            run = next(((b, h) for a, (b, h) in gaps.items() if a <= count - 1 < b), None)
            if run is None or (run[0] == count and run[1] != prev):
                return f"entry {count - 1} (the last verified one) is missing"
            self._anchored = True
            return None
        if row[5] != prev:
            return f"entry {count - 1} is not the one verified before (replaced)"
        reason = check_row(row, count - 1, row[4], key)
        if reason is not None:
            return f"entry {count - 1} {reason}"
        self._anchored = True
        return None

    def _finish_verify(self, count: int, prev: bytes, checked: int) -> VerifyReport:
        """Check the signed head against the verified entries; store the mark (lock held)."""
        key = self._identity.public_key
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
            signed = signed_pair(row[0] if row else None, key, HEAD_DOMAIN)
            problem = (count, signed) if isinstance(signed, str) else head_problem(signed,
                                                                                   count, prev)
            if problem is not None:
                self._problem = bad(min(count, problem[0]), problem[0], problem[1], checked)
                return self._problem
            if self.path is not None:
                sig = self._identity.sign(chain_message(VERIFIED_DOMAIN, count, prev))
                self._set_sync("NORMAL")
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('verified', ?)",
                                   (packb([count, prev, sig]),))
        except sqlite3.Error as exc:
            raise storage_error(exc, f"cannot record the verified head of {self.path}") from exc
        return VerifyReport(True, count, None, "ok", checked)

    def verify(self, public_key: bytes | None = None) -> VerifyReport:
        """Verify every entry through this ledger's own connection (works in memory too)."""
        with self._lock:
            self._check_open()
            return verify_connection(self._conn, public_key)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """The database's size: its pages (in memory too) plus the write-ahead log's file."""
        pages = self._fetch("SELECT page_count * page_size FROM pragma_page_count, "
                            "pragma_page_size", ())
        wal = Path(f"{self.path}-wal") if self.path is not None else None
        return int(pages[0][0]) + (wal.stat().st_size if wal is not None and wal.exists() else 0)

    @property
    def head_hash(self) -> bytes:
        """Hash of the last entry (all zeros for an empty chain)."""
        return self._head

    def entries(self, kind: str | None = None, start: int = 0, *,
                reverse: bool = False) -> Iterator[LedgerEntry]:
        """Entries with index >= ``start`` (of ``kind`` if given), in order, read in batches;
        ``reverse=True``: newest first (stop early to read only the end of a long ledger)."""
        kind_clause = " AND kind = ?" if kind is not None else ""
        if reverse:
            query = (f"SELECT {COLUMNS} FROM entries WHERE idx >= ? AND idx <= ?{kind_clause} "
                     f"ORDER BY idx DESC LIMIT {_BATCH}")
        else:
            query = (f"SELECT {COLUMNS} FROM entries WHERE idx >= ?{kind_clause} "
                     f"ORDER BY idx LIMIT {_BATCH}")
        nxt = len(self) - 1 if reverse else start
        while True:
            bounds: tuple[Any, ...] = (start, nxt) if reverse else (nxt,)
            rows = self._fetch(query, bounds + ((kind,) if kind is not None else ()))
            for row in rows:
                yield row_entry(row)
            if len(rows) < _BATCH:
                return
            nxt = int(rows[-1][0]) + (-1 if reverse else 1)

    def get(self, index: int) -> LedgerEntry:
        rows = self._fetch(f"SELECT {COLUMNS} FROM entries WHERE idx = ?", (index,))
        if not rows:
            raise IndexError(f"no ledger entry {index} (never written, or compacted)")
        return row_entry(rows[0])

    def last(self, kind: str | None = None) -> LedgerEntry | None:
        """The last entry (of ``kind`` if given), or None."""
        where, params = ("", ()) if kind is None else ("WHERE kind = ?", (kind,))
        rows = self._fetch(f"SELECT {COLUMNS} FROM entries {where} ORDER BY idx DESC LIMIT 1",
                           params)
        return row_entry(rows[0]) if rows else None

    def _fetch(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(query, params).fetchall()
            except sqlite3.Error as exc:
                raise storage_error(exc, f"cannot read ledger {self.path}") from exc

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
