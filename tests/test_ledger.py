"""The ledger: appends chain and sign; any edit, deletion, reordering or cut is found."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from gossip.envelope import digest, packb
from gossip.errors import LedgerIntegrityError, LocalError, StorageError
from gossip.identity import Identity, verify_signature
from p2pfed.home import DiskFullError, MissingStateError
from p2pfed.kinds import CHECKPOINT, CONTRIBUTION, MIX
from p2pfed.ledger import OPEN, Ledger, verify_ledger


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


# ---------------------------------------------------------------------- format and API
def test_hash_and_signatures_follow_the_documented_format(tmp_path: Path) -> None:
    ident = Identity.generate()
    with Ledger.open(tmp_path / "l.sqlite3", ident, timestamp_ms=5) as ledger:
        first = ledger.last()
        assert first is not None and first.index == 0 and first.kind == OPEN
        assert first.prev_hash == bytes(32) and first.timestamp_ms == 5
        assert first.body["owner"] == ident.public_key
        body = {"sender": "p", "component": "backbone", "round": 3, "digest": b"d" * 32,
                "weight": 0.25, "lineage": ("a", "b")}
        entry = ledger.append(CONTRIBUTION, body, timestamp_ms=7)
    expected = digest(b"p2pfed/v1/ledger\0" + packb([1, "contribution", 7, body, first.entry_hash]))
    assert entry.entry_hash == expected
    assert verify_signature(ident.public_key, entry.entry_hash, entry.signature)
    assert entry.body["lineage"] == ["a", "b"]  # as a reader will see it


def test_entries_by_kind_and_start_across_batches() -> None:
    ledger = Ledger.open(None, Identity.generate())
    for i in range(1200):
        ledger.append(MIX if i % 3 else CHECKPOINT, {"round": i}, timestamp_ms=i)
    assert len(ledger) == 1201
    assert [e.index for e in ledger.entries()] == list(range(1201))
    assert [e.body["round"] for e in ledger.entries(CHECKPOINT)] == list(range(0, 1200, 3))
    assert [e.index for e in ledger.entries(MIX, start=1195)] == [1196, 1197, 1199, 1200]
    last_cp = ledger.last(CHECKPOINT)
    assert last_cp is not None and last_cp.body["round"] == 1197
    assert ledger.get(10).body == {"round": 9}
    assert ledger.head_hash == ledger.get(1200).entry_hash
    assert ledger.verify().ok


def test_bad_appends_are_refused_and_leave_the_ledger_unchanged() -> None:
    ledger = Ledger.open(None, Identity.generate())
    head = ledger.head_hash
    bad_calls = [
        ("", {}, 1), ("x" * 65, {}, 1), ("mix", {}, -1), ("mix", {1: "int key"}, 1),
        ("mix", {"obj": object()}, 1), ("mix", {"nested": {2: "x"}}, 1),
    ]
    for kind, body, ts in bad_calls:
        with pytest.raises(LocalError):
            ledger.append(kind, body, timestamp_ms=ts)  # type: ignore[arg-type]
    assert len(ledger) == 1 and ledger.head_hash == head and ledger.verify().ok


def test_closed_ledger_refuses_use(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.sqlite3", Identity.generate())
    ledger.close()
    ledger.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        ledger.append("mix", {}, timestamp_ms=1)
    with pytest.raises(StorageError, match="closed"):
        list(ledger.entries())


def test_creation_is_atomic_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "home" / "ledger.sqlite3"
    with Ledger.open(path, Identity.generate()):
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite3"]


def test_thousand_appends_are_fast(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.sqlite3", Identity.generate()) as ledger:
        start = time.perf_counter()
        for i in range(1000):
            ledger.append("mix", {"round": i, "digest": b"x" * 32}, timestamp_ms=i,
                          durable=i % 10 == 0)
        assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------- more tampering
def test_deleted_first_entry_is_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "DELETE FROM entries WHERE idx=0")
    report = verify_ledger(path, ident.public_key)
    assert report.first_bad_index == 0 and "missing" in report.reason


def test_earliest_of_several_problems_is_named(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "DELETE FROM entries WHERE idx>=8", "UPDATE entries SET ts=0 WHERE idx=6",
         "DELETE FROM entries WHERE idx=3")
    assert verify_ledger(path, ident.public_key).first_bad_index == 3


def test_wrongly_typed_column_is_reported_not_raised(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "UPDATE entries SET ts='soon' WHERE idx=2",
         "UPDATE entries SET body=x'c1' WHERE idx=5")
    report = verify_ledger(path, ident.public_key)
    assert report.first_bad_index == 2 and "type" in report.reason


def test_forged_head_record_is_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM entries WHERE idx>=8")
    last_hash = conn.execute("SELECT entry_hash FROM entries WHERE idx=7").fetchone()[0]
    # the attacker rewrites the head to match the cut, but cannot sign it
    conn.execute("UPDATE meta SET value=? WHERE key='head'",
                 (packb([8, last_hash, Identity.generate().sign(b"head")]),))
    conn.commit()
    conn.close()
    report = verify_ledger(path, ident.public_key)
    assert not report.ok and report.first_bad_index == 8 and "head" in report.reason
    with pytest.raises(LedgerIntegrityError, match="head"):
        Ledger.open(path, ident)
    _sql(path, "DELETE FROM meta WHERE key='head'")
    assert not verify_ledger(path, ident.public_key).ok


def test_tampered_last_entry_is_refused_on_open(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    _sql(path, "UPDATE entries SET ts=ts+1 WHERE idx=9")
    with pytest.raises(LedgerIntegrityError) as info:
        Ledger.open(path, ident)
    assert info.value.index == 9


def test_entries_beyond_the_signed_head_are_found(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    conn = sqlite3.connect(path)
    old_head = conn.execute("SELECT value FROM meta WHERE key='head'").fetchone()[0]
    conn.close()
    with Ledger.open(path, ident) as ledger:
        ledger.append("mix", {"round": 99}, timestamp_ms=1)
    _sql(path, f"UPDATE meta SET value=x'{old_head.hex()}' WHERE key='head'")  # roll back head
    report = verify_ledger(path, ident.public_key)
    assert report.first_bad_index == 10 and "not covered" in report.reason


def test_verify_without_a_key_uses_the_recorded_owner(ledger_path: tuple[Path, Identity]) -> None:
    path, _ident = ledger_path
    assert verify_ledger(path).ok
    other = verify_ledger(path, Identity.generate().public_key)
    assert not other.ok and other.first_bad_index is None and "identity" in other.reason


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    report = verify_ledger(tmp_path / "nope.sqlite3")
    assert not report.ok and "no ledger" in report.reason
    assert not (tmp_path / "nope.sqlite3").exists()
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    assert "no ledger tables" in verify_ledger(empty).reason
    with pytest.raises(StorageError, match="not a p2pfed ledger"):
        Ledger.open(empty, Identity.generate())  # never silently restarts a wiped ledger
    assert empty.stat().st_size == 0


def test_verify_sees_one_snapshot_while_the_owner_appends(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "l.sqlite3"
    with Ledger.open(path, ident) as ledger:
        for i in range(50):
            ledger.append("mix", {"round": i}, timestamp_ms=i, durable=i % 2 == 0)
            if i % 10 == 0:
                report = verify_ledger(path, ident.public_key)
                assert report.ok and report.entries == i + 2
        mtime = path.stat().st_mtime_ns
        assert verify_ledger(path, ident.public_key).entries == 51
        assert path.stat().st_mtime_ns == mtime


def test_a_deleted_ledger_is_recreated_unless_its_wal_holds_data(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "ledger.sqlite3"
    Ledger.open(path, ident).close()
    assert verify_ledger(path).ok  # may leave empty -wal/-shm files behind (read-only reader)
    path.unlink()
    with Ledger.open(path, ident) as ledger:
        assert len(ledger) == 1
        ledger.append("mix", {}, timestamp_ms=1)
        path.unlink()  # deleted while the WAL still holds entries
        with pytest.raises(StorageError, match="write-ahead log"):
            Ledger.open(path, ident)


# ---------------------------------------------------------------------- incremental verification
def test_verify_new_reads_only_what_came_after_the_mark(
        ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    with Ledger.open(path, ident) as ledger:
        first = ledger.verify_new()  # never verified: every entry
        assert first.ok and first.entries == 10 and first.checked == 10
        assert ledger.verified == 10 and ledger.verify_new().checked == 0
        ledger.append_many([("mix", {"round": r}, r) for r in range(3)])
        again = ledger.verify_new()
        assert again.ok and again.entries == 13 and again.checked == 3
    with Ledger.open(path, ident) as ledger:  # the mark was stored, signed
        assert ledger.verified == 13
        assert ledger.verify_new().checked == 0 and ledger.problem is None


def test_an_edit_below_the_mark_is_left_to_the_full_verification(
        ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    with Ledger.open(path, ident) as ledger:
        assert ledger.verify_new().ok
    _sql(path, "UPDATE entries SET ts = ts + 1 WHERE idx = 3")
    with Ledger.open(path, ident) as ledger:
        report = ledger.verify_new()
        assert report.ok and report.checked == 0  # entry 3 is not read again
    full = verify_ledger(path, ident.public_key)  # ... but 'p2pfed ledger verify' finds it
    assert not full.ok and full.first_bad_index == 3


def test_an_edit_above_the_mark_is_found_and_kept(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    with Ledger.open(path, ident) as ledger:
        assert ledger.verify_new().ok
        for r in range(4):
            ledger.append("mix", {"round": r}, timestamp_ms=r)
    _sql(path, "UPDATE entries SET ts = ts + 1 WHERE idx = 11")
    with Ledger.open(path, ident) as ledger:
        report = ledger.verify_new()
        assert not report.ok and report.first_bad_index == 11 and "edited" in report.reason
        assert ledger.problem == report and ledger.verified == 11
        assert ledger.verify_new() == report  # kept until the ledger is reopened


def test_the_entry_under_the_mark_is_checked_once(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    with Ledger.open(path, ident) as ledger:
        assert ledger.verify_new().ok
        ledger.append("mix", {"round": 1}, timestamp_ms=1)
    _sql(path, "UPDATE entries SET ts = ts + 1 WHERE idx = 9")
    with Ledger.open(path, ident) as ledger:
        report = ledger.verify_new()
    assert not report.ok and report.first_bad_index == 9


def test_a_forged_mark_means_verifying_everything(ledger_path: tuple[Path, Identity]) -> None:
    path, ident = ledger_path
    with Ledger.open(path, ident) as ledger:
        assert ledger.verify_new().ok
    last = sqlite3.connect(path).execute("SELECT entry_hash FROM entries WHERE idx = 9")
    forged = packb([10, last.fetchone()[0], Identity.generate().sign(b"mark")])
    _sql(path, f"UPDATE meta SET value = x'{forged.hex()}' WHERE key = 'verified'")
    with Ledger.open(path, ident) as ledger:
        assert ledger.verified == 0
        assert ledger.verify_new().checked == 10


def test_entries_verified_once_and_cut_off_are_found(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "l.sqlite3"
    with Ledger.open(path, ident) as ledger:
        ledger.append("mix", {"round": 1}, timestamp_ms=1)
        head_at_2 = sqlite3.connect(path).execute(
            "SELECT value FROM meta WHERE key = 'head'").fetchone()[0]
        ledger.append_many([("mix", {"round": r}, r) for r in range(2, 6)])
        assert ledger.verify_new().entries == 6
    # the tail cut and an old, genuinely signed head put back: only the mark can tell
    _sql(path, "DELETE FROM entries WHERE idx >= 2",
         f"UPDATE meta SET value = x'{head_at_2.hex()}' WHERE key = 'head'")
    with Ledger.open(path, ident) as ledger:
        report = ledger.verify_new()
    assert not report.ok and report.first_bad_index == 2 and "gone" in report.reason


def test_append_many_is_all_or_nothing() -> None:
    ledger = Ledger.open(None, Identity.generate())
    with pytest.raises(LocalError):
        ledger.append_many([("mix", {"round": 1}, 1), ("mix", {"bad": object()}, 2)])
    assert len(ledger) == 1
    entries = ledger.append_many([("mix", {"round": r}, r) for r in range(5)])
    assert [e.index for e in entries] == [1, 2, 3, 4, 5] and ledger.append_many([]) == []
    assert entries[-1].entry_hash == ledger.head_hash and ledger.verify().ok


def test_entries_newest_first_by_kind_across_batches() -> None:
    ledger = Ledger.open(None, Identity.generate())
    ledger.append_many([(MIX if i % 3 else CHECKPOINT, {"round": i}, i) for i in range(1200)])
    assert [e.index for e in ledger.entries(reverse=True)] == list(range(1200, -1, -1))
    assert [e.body["round"] for e in ledger.entries(CHECKPOINT, reverse=True)] \
        == list(range(1197, -1, -3))
    assert [e.index for e in ledger.entries(MIX, start=1195, reverse=True)] \
        == [1200, 1199, 1197, 1196]


# ---------------------------------------------------------------------- files and full disks
def test_ledger_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "ledger.sqlite3"
    old = os.umask(0)
    try:
        with Ledger.open(path, ident) as ledger:
            ledger.append("mix", {}, timestamp_ms=1)
            for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)
    os.chmod(path, 0o644)  # a ledger from before: tightened when opened
    Ledger.open(path, ident).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_missing_ledger_is_refused_when_asked(tmp_path: Path) -> None:
    with pytest.raises(MissingStateError, match="no ledger"):
        Ledger.open(tmp_path / "ledger.sqlite3", Identity.generate(), create=False)
    assert not (tmp_path / "ledger.sqlite3").exists()


def test_a_full_disk_is_a_storage_error_and_the_ledger_stays_intact(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "ledger.sqlite3"
    with Ledger.open(path, ident) as ledger:
        pages = ledger._conn.execute("PRAGMA page_count").fetchone()[0]
        ledger._conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # as if the disk filled
        with pytest.raises(DiskFullError, match="disk is full"):
            for r in range(1000):
                ledger.append("mix", {"round": r, "pad": b"x" * 2000}, timestamp_ms=r)
        count = len(ledger)
    assert isinstance(DiskFullError("x"), StorageError)
    report = verify_ledger(path, ident.public_key)
    assert report.ok and report.entries == count
