"""The ledger: appends chain and sign; any edit, deletion, reordering or cut is found."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from gossip.errors import StorageError
from gossip.identity import Identity
from p2pfed.ledger import Ledger, verify_ledger


@pytest.fixture
def ledger_path(tmp_path: Path) -> tuple[Path, Identity]:
    ident = Identity.generate()
    path = tmp_path / "ledger.sqlite3"
    with Ledger.open(path, ident) as ledger:
        for i in range(1, 10):
            ledger.append("mix", {"component": "backbone", "round": i, "digest": bytes([i]) * 32},
                          timestamp_ms=1000 * i, durable=i % 2 == 0)
    return path, ident


def _sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    for s in statements:
        conn.execute(s)
    conn.commit()
    conn.close()


def test_intact_ledger_verifies_and_reopens(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    report = verify_ledger(path, ident.public_key)
    assert report.ok and report.entries == 10 and report.first_bad_index is None
    with Ledger.open(path, ident) as ledger:
        assert len(ledger) == 10
        assert [e.body["round"] for e in ledger.entries("mix")] == list(range(1, 10))
        last = ledger.last("mix")
        assert last is not None and last.index == 9
        entry = ledger.append("checkpoint", {"round": 10}, timestamp_ms=1)
        assert entry.index == 10 and entry.prev_hash == last.entry_hash
    assert verify_ledger(path, ident.public_key).ok


def test_edited_body_is_found_at_its_index(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    conn = sqlite3.connect(path)
    body = conn.execute("SELECT body FROM entries WHERE idx=4").fetchone()[0]
    conn.execute("UPDATE entries SET body=? WHERE idx=4", (body.replace(b"round", b"ROUND"),))
    conn.commit()
    conn.close()
    report = verify_ledger(path, ident.public_key)
    assert not report.ok and report.first_bad_index == 4 and "edited" in report.reason


def test_edited_timestamp_and_kind_are_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "UPDATE entries SET ts=ts+1 WHERE idx=7")
    assert verify_ledger(path, ident.public_key).first_bad_index == 7
    _sql(path, "UPDATE entries SET kind='leave' WHERE idx=2")
    assert verify_ledger(path, ident.public_key).first_bad_index == 2


def test_deleted_entry_is_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "DELETE FROM entries WHERE idx=5")
    report = verify_ledger(path, ident.public_key)
    assert not report.ok and report.first_bad_index == 5 and "missing" in report.reason


def test_reordered_entries_are_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    conn = sqlite3.connect(path)
    cols = "kind, ts, body, prev_hash, entry_hash, signature"
    r3 = conn.execute(f"SELECT {cols} FROM entries WHERE idx=3").fetchone()
    r6 = conn.execute(f"SELECT {cols} FROM entries WHERE idx=6").fetchone()
    upd = "UPDATE entries SET kind=?, ts=?, body=?, prev_hash=?, entry_hash=?, signature=? " \
          "WHERE idx=?"
    conn.execute(upd, (*r6, 3))
    conn.execute(upd, (*r3, 6))
    conn.commit()
    conn.close()
    report = verify_ledger(path, ident.public_key)
    assert not report.ok and report.first_bad_index == 3


def test_truncated_tail_is_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "DELETE FROM entries WHERE idx>=8")
    report = verify_ledger(path, ident.public_key)
    assert not report.ok and report.first_bad_index == 8 and "cut off" in report.reason
    with pytest.raises(StorageError, match="signed head"):
        Ledger.open(path, ident)


def test_replaced_signature_is_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    forged = Identity.generate().sign(b"x")
    conn = sqlite3.connect(path)
    conn.execute("UPDATE entries SET signature=? WHERE idx=6", (forged,))
    conn.commit()
    conn.close()
    report = verify_ledger(path, ident.public_key)
    assert report.first_bad_index == 6 and "signature" in report.reason


def test_wrong_identity(ledger_path: tuple[Path, Identity]) -> None:
    path, _ident = ledger_path
    other = Identity.generate()
    with pytest.raises(StorageError, match="another identity"):
        Ledger.open(path, other)
    assert not verify_ledger(path, other.public_key).ok


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100])
def test_corrupt_files_are_reported_not_raised(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(content)
    report = verify_ledger(path, Identity.generate().public_key)
    assert not report.ok and report.reason
    if content:
        with pytest.raises(StorageError):
            Ledger.open(path, Identity.generate())


def test_verify_does_not_modify_the_file(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns
    assert verify_ledger(path, ident.public_key).ok
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert path.stat().st_mtime_ns == mtime


def test_in_memory_ledger() -> None:
    ident = Identity.generate()
    ledger = Ledger.open(None, ident)
    for i in range(100):
        ledger.append("contribution", {"round": i}, timestamp_ms=i)
    assert len(ledger) == 101
    assert [e.index for e in ledger.entries(start=99)] == [99, 100]
