"""The ledger's chain rules: entry hashes, signed records about the chain, and verification.

An entry's hash covers its index, kind, timestamp, body bytes and the previous entry's hash; the
owner signs it.  Two signed records sit in the ledger's ``meta`` table:

* the *head* ``[count, last hash]``, rewritten with each append, so a cut tail is found;
* the *verified mark* ``[count, last hash]``: "entries ``0 .. count-1`` were read back from the
  file and verified, and the last of them hashes to ``last hash``".  The owning process writes
  it after verifying; start-up and ``status`` then verify only the entries after it.  An edit
  below the mark is found by the full verification (:func:`verify_ledger`, run by ``p2pfed
  ledger verify``), never by the incremental one.

Compaction (bounded storage) *prunes* entries: their body is emptied, their index, kind,
timestamp, links, hash and signature stay, so the chain still verifies link by link and
signature by signature.  Each compaction appends a signed ``compaction`` entry naming the
indexes it pruned (as ranges) and a digest over their ``(index, hash)`` pairs
(:func:`pruned_digest`).  A full verification (:class:`PruneAudit`) then checks that every
empty body was pruned by such an entry and that the entries it names are the ones it pruned:
a body removed by anyone else is found.

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


PRUNED = b""
COMPACTION_DOMAIN = b"p2pfed/v1/ledger-compaction\0"


def ranges_of(indexes: Iterable[int]) -> list[list[int]]:
    """Sorted indexes as ``[start, end)`` runs."""
    runs: list[list[int]] = []
    for i in sorted(set(indexes)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def pruned_digest(pairs: Iterable[tuple[int, bytes]]) -> bytes:
    """What a compaction entry commits to: its pruned entries' indexes and hashes, in order."""
    return digest(COMPACTION_DOMAIN + b"".join(i.to_bytes(8, "big") + h for i, h in pairs))


class PruneAudit:
    """Full verification's account of pruned entries: each one pruned by a compaction entry."""

    def __init__(self) -> None:
        self.pruned: dict[int, bytes] = {}
        self.claims: list[tuple[int, Any]] = []

    def add(self, row: tuple[Any, ...]) -> None:
        """A row that verified."""
        idx, kind, _ts, body, _prev, h, _sig = row
        if body == PRUNED:
            self.pruned[idx] = bytes(h)
        elif kind == COMPACTION:
            self.claims.append((idx, unpackb(body, max_bytes=MAX_BODY_BYTES)))

    def problem(self) -> tuple[int, str] | None:
        """The first pruned entry no compaction accounts for, or a compaction whose claim does
        not hold (index, reason); None when every pruned body is accounted for."""
        covered: set[int] = set()
        for index, body in self.claims:
            runs, claimed = body.get("ranges"), body.get("digest")
            try:
                idxs = [i for start, end in runs for i in range(start, end)]
            except (TypeError, ValueError):
                return index, "compaction entry has malformed ranges"
            if any(i >= index or i not in self.pruned or i in covered for i in idxs):
                return index, "compaction entry names entries that were not pruned before it"
            if pruned_digest((i, self.pruned[i]) for i in idxs) != claimed:
                return index, "pruned entries do not match their compaction entry"
            covered.update(idxs)
        stray = sorted(set(self.pruned) - covered)
        if stray:
            return stray[0], "body removed without a compaction entry accounting for it"
        return None


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
    if body == PRUNED:  # (its compaction entry accounts for it: see PruneAudit)
        if idx == 0:
            return "is the 'open' entry, which is never pruned"
        return None if verify_signature(key, h, sig) else "signature does not verify"
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
               key: bytes, audit: PruneAudit | None = None) -> tuple[int, bytes, str | None]:
    """Check rows that should continue a chain of ``count`` entries ending in ``prev``.

    Returns the new count and last hash, and the reason the first bad row is bad (None when
    every row verified).  ``audit`` collects pruned entries and compactions.
    """
    for row in rows:
        reason = check_row(row, count, prev, key)
        if reason is not None:
            return count, prev, f"entry {count} {reason}"
        if audit is not None:
            audit.add(row)
        prev = bytes(row[5])
        count += 1
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
    rows = conn.execute(f"SELECT {COLUMNS} FROM entries ORDER BY idx")
    audit = PruneAudit()
    count, prev, reason = check_rows(rows, 0, ZERO_HASH, key, audit)
    if reason is not None:
        return bad(count, count, reason, count + 1)
    pruned = audit.problem()
    if pruned is not None:
        return bad(pruned[0], pruned[0], f"entry {pruned[0]}: {pruned[1]}", count)
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
