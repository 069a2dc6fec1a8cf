"""The ledger's chain rules: entry hashes, signed records about the chain, and verification.

An entry's hash covers its index, kind, timestamp, body bytes and the previous entry's hash; the
owner signs it.  Two signed records sit in the ledger's ``meta`` table:

* the *head* ``[count, last hash]``, rewritten with each append, so a cut tail is found;
* the *verified mark* ``[count, last hash]``: "entries ``0 .. count-1`` were read back from the
  file and verified, and the last of them hashes to ``last hash``".  The owning process writes
  it after verifying; start-up and ``status`` then verify only the entries after it.  An edit
  below the mark is found by the full verification (:func:`verify_ledger`, run by ``p2pfed
  ledger verify``), never by the incremental one.

Compaction (bounded storage) *deletes* runs of old entries.  The signed ``compaction`` entry
that does it names every run deleted so far, ``[start, end)``, with the hash of the run's last
entry, and a digest over those (:func:`gaps_digest`); each compaction supersedes the one before
(which it deletes too), so a ledger holds one.  Verification reads that entry first
(:func:`read_gaps`) and steps over each run: the entry after a run must link to the run's last
hash, which that entry's own signed hash vouches for.  An entry deleted by anything else is
missing, and named.

Everything here is pure (bodies or rows in, bytes or reasons out) but :func:`verify_ledger`,
which opens the file read-only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossip.envelope import digest, packb, unpackb
from gossip.errors import LocalError, MalformedMessageError
from gossip.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, verify_signature
from p2pfed.kinds import COMPACTION

FORMAT = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)
DOMAIN = b"p2pfed/v1/ledger\0"
HEAD_DOMAIN = b"p2pfed/v1/ledger-head\0"
VERIFIED_DOMAIN = b"p2pfed/v1/ledger-verified\0"
MAX_BODY_BYTES = 4 << 20
MAX_KIND_CHARS = 64
OPEN = "open"
COLUMNS = "idx, kind, ts, body, prev_hash, entry_hash, signature"


def entry_hash(index: int, kind: str, timestamp_ms: int, body: bytes, prev_hash: bytes) -> bytes:
    """The hash of an entry whose body has the msgpack encoding ``body``.

    Equal to ``digest(DOMAIN + packb([index, kind, timestamp_ms, body_map, prev_hash]))``: a
    msgpack array is its header followed by its elements, so the stored body bytes are hashed
    exactly as stored (a re-encoded but equal body would not verify).
    """
    head = b"\x95" + packb(index) + packb(kind) + packb(timestamp_ms)
    return digest(DOMAIN + head + body + packb(prev_hash))


def chain_message(domain: bytes, count: int, last: bytes) -> bytes:
    """What the owner signs for a head or verified-mark record of ``count`` entries."""
    return domain + packb([count, last])


def signed_pair(value: object, key: bytes, domain: bytes) -> tuple[int, bytes] | str:
    """(count, last hash) from a stored head or mark record, or why it cannot be trusted."""
    try:
        fields = unpackb(value) if isinstance(value, bytes) else None
    except MalformedMessageError:
        fields = None
    what = "head" if domain == HEAD_DOMAIN else "verified mark"
    if not (isinstance(fields, list) and len(fields) == 3 and isinstance(fields[0], int)
            and not isinstance(fields[0], bool) and fields[0] >= 0
            and isinstance(fields[1], bytes) and isinstance(fields[2], bytes)):
        return f"the signed {what} record is missing or malformed"
    count, last, sig = fields
    if not verify_signature(key, chain_message(domain, count, last), sig):
        return f"the signed {what} record does not verify (edited)"
    return count, last


def head_problem(signed: tuple[int, bytes], count: int, last: bytes) -> tuple[int, str] | None:
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


def encode_body(body: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
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


def check_entry(kind: str, body: Mapping[str, Any],
                timestamp_ms: int) -> tuple[str, int, bytes, dict[str, Any]]:
    """A new entry's fields checked, with its body's bytes and the body a reader will get."""
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
        raise LocalError(f"ledger entry kind must be 1..{MAX_KIND_CHARS} characters")
    if not isinstance(timestamp_ms, int) or isinstance(timestamp_ms, bool) or timestamp_ms < 0:
        raise LocalError(f"ledger timestamp must be a non-negative int, not {timestamp_ms!r}")
    raw, decoded = encode_body(body)
    return kind, timestamp_ms, raw, decoded


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verification.

    ``entries`` counts the entries that verified, in order, before the first problem (all of
    them when ``ok``).  ``first_bad_index`` is the index of the first bad or missing entry, or
    None when the problem is not an entry (unreadable file, foreign owner key).  ``checked``
    counts the entries actually read and checked (fewer than ``entries`` when an incremental
    verification started from a verified mark).
    """

    ok: bool
    entries: int
    first_bad_index: int | None
    reason: str
    checked: int = 0


def bad(entries: int, index: int | None, reason: str, checked: int = 0) -> VerifyReport:
    return VerifyReport(False, entries, index, reason, checked)


COMPACTION_DOMAIN = b"p2pfed/v1/ledger-compaction\0"

#: runs of deleted entries: start -> (end, hash of the entry at end - 1)
Gaps = dict[int, tuple[int, bytes]]


def runs_of(indexes: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indexes as ``[start, end)`` runs."""
    runs: list[list[int]] = []
    for i in sorted(set(indexes)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def merge_gaps(old: Gaps, hashes: Mapping[int, bytes]) -> Gaps:
    """The runs deleted so far (``old``) and the entries deleted now (index -> hash), as runs
    with the hash each ends with."""
    ends = {end: last for end, last in old.values()}
    deleted = set(hashes) | {i for a, (b, _h) in old.items() for i in range(a, b)}
    return {a: (b, hashes[b - 1] if b - 1 in hashes else ends[b]) for a, b in runs_of(deleted)}


def gaps_digest(gaps: Gaps) -> bytes:
    """What a compaction entry commits to: each deleted run and the hash it ends with."""
    return digest(COMPACTION_DOMAIN + b"".join(
        a.to_bytes(8, "big") + b.to_bytes(8, "big") + h for a, (b, h) in sorted(gaps.items())))


def gaps_of(index: int, body: Any) -> Gaps | str:
    """The runs a compaction entry (at ``index``) says were deleted, or why it says nothing
    sound."""
    runs = body.get("gaps") if isinstance(body, dict) else None
    if not isinstance(runs, list):
        return f"entry {index} (compaction) has no list of deleted runs"
    gaps: Gaps = {}
    last_end = 1  # (entry 0, the 'open' entry, is never deleted)
    for run in runs:
        if not (isinstance(run, list) and len(run) == 3 and all(isinstance(v, int) for v in run[:2])
                and isinstance(run[2], bytes) and len(run[2]) == HASH_BYTES
                and last_end <= run[0] < run[1] <= index):
            return f"entry {index} (compaction) names a malformed or overlapping run"
        gaps[run[0]] = (run[1], run[2])
        last_end = run[1]
    if gaps_digest(gaps) != body.get("digest"):
        return f"entry {index} (compaction) does not match its own digest"
    return gaps


def read_gaps(conn: sqlite3.Connection) -> Gaps | str:
    """The deleted runs the ledger's (one) compaction entry names; empty without one."""
    row = conn.execute("SELECT idx, body FROM entries WHERE kind = ? ORDER BY idx DESC LIMIT 1",
                       (COMPACTION,)).fetchone()
    if row is None:
        return {}
    try:
        body = unpackb(bytes(row[1]), max_bytes=MAX_BODY_BYTES)
    except MalformedMessageError:
        return f"entry {row[0]} (compaction) is not valid msgpack"
    return gaps_of(int(row[0]), body)


def check_row(row: tuple[Any, ...], expected: int, prev: bytes, key: bytes) -> str | None:
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


def check_rows(rows: Iterable[tuple[Any, ...]], count: int, prev: bytes,
               key: bytes, gaps: Gaps | None = None) -> tuple[int, bytes, str | None]:
    """Check rows that should continue a chain of ``count`` entries ending in ``prev``,
    stepping over the runs ``gaps`` says were deleted.

    Returns the new count and last hash, and the reason the first bad row is bad (None when
    every row verified).
    """
    gaps = gaps or {}
    for start, (end, last) in gaps.items():
        if start < count < end:  # (verified up to inside a run deleted since)
            count, prev = end, last
    for row in rows:
        while count in gaps:
            count, prev = gaps[count]
        reason = check_row(row, count, prev, key)
        if reason is not None:
            return count, prev, f"entry {count} {reason}"
        prev = bytes(row[5])
        count += 1
    while count in gaps:  # (a run at the end of what was read: the rest comes later)
        count, prev = gaps[count]
    return count, prev, None


def verify_connection(conn: sqlite3.Connection, public_key: bytes | None) -> VerifyReport:
    """Full verification through an open connection (in-memory ledgers use this)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"entries", "meta"} <= tables:
        return bad(0, None, "not a p2pfed ledger: the database has no ledger tables")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        return bad(0, None, f"unsupported ledger format {meta.get('format')!r}")
    owner = meta.get("owner")
    if not isinstance(owner, bytes) or len(owner) != PUBLIC_KEY_BYTES:
        return bad(0, None, "the ledger records no valid owner key")
    if public_key is not None and owner != public_key:
        return bad(0, None, "the ledger belongs to another identity than the given key")
    key = owner if public_key is None else public_key
    gaps = read_gaps(conn)
    if isinstance(gaps, str):
        return bad(0, None, gaps)
    rows = conn.execute(f"SELECT {COLUMNS} FROM entries ORDER BY idx")
    count, prev, reason = check_rows(rows, 0, ZERO_HASH, key, gaps)
    if reason is not None:
        return bad(count, count, reason, count + 1)
    signed = signed_pair(meta.get("head"), key, HEAD_DOMAIN)
    if isinstance(signed, str):
        return bad(count, count, f"{signed}; entries from {count} on may have been cut off",
                   count)
    problem = head_problem(signed, count, prev)
    if problem is not None:
        return bad(min(count, problem[0]), problem[0], problem[1], count)
    return VerifyReport(True, count, None, "ok", count)


def connect(path: Path, mode: str) -> sqlite3.Connection:
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


def verify_ledger(path: Path, public_key: bytes | None = None) -> VerifyReport:
    """Check the whole chain read-only and name the first bad entry; never raises on bad files.

    ``public_key`` comes from the node's identity file; without it the owner key recorded in
    the ledger is used, which proves only internal consistency.  Reads one snapshot, so it is
    safe while the daemon appends.  The verified mark is ignored: every entry is checked.
    """
    if not path.is_file():
        return bad(0, None, f"no ledger file at {path}")
    try:
        conn = connect(path, "ro")
    except sqlite3.Error as exc:
        return bad(0, None, f"cannot open {path}: {exc}")
    try:
        conn.execute("BEGIN")  # one read snapshot for entries and head
        return verify_connection(conn, public_key)
    except sqlite3.Error as exc:
        return bad(0, None, f"{path} is not a readable SQLite ledger: {exc}")
    finally:
        conn.close()
