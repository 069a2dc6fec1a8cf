"""A full disk: the daemon refuses to start or stops cleanly, with one clear line, the ledger
verifies, and a restart after space is freed continues from the ledger.

Two ways to fill a disk: a size-limited tmpfs under the home (where this process may mount one;
otherwise a simulated small filesystem: free space and blob writes accounted against a size),
and a full-disk error injected into a daemon on a roomy disk (a blob write, or a ledger commit,
that fails with ENOSPC / "database or disk is full").  Every daemon is in-process on 127.0.0.1;
a last test fails the write of a neighbour's payload in the driver alone (memory transport).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import p2pfed.blobs
import p2pfed.home
import p2pfed.ledger
import p2pfed.ledger_verify
import p2pfed.runtime.daemon
import p2pfed.runtime.diskspace
from gossip.identity import load_identity
from p2pfed import exitcodes, kinds
from p2pfed.blobs import BlobStore
from p2pfed.cli import main
from p2pfed.config import Config
from p2pfed.ledger import read_entries, verify_ledger
from p2pfed.runtime.control import SOCKET_NAME, request
from p2pfed.runtime.daemon import Daemon
from p2pfed.runtime.diskspace import NoRoomError
from p2pfed.runtime.systemd import Notifier

pytestmark = pytest.mark.network

MiB = 1 << 20
WAIT_S = 30  # the most any one wait below may take (each ends on its condition long before)


# ---------------------------------------------------------------- homes and daemons
def make_home(root: Path, dim: int) -> Path:
    """A solo federation's home: one component of ``dim`` float32 parameters, fast rounds."""
    home = root / "home"
    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--interval", "0.05", "--timeout", "0.2"]) == 0
    config = Config.from_toml(home / "p2pfed.toml").with_overrides(components__dim=dim)
    (home / "p2pfed.toml").write_text(config.to_toml(), encoding="utf-8")
    assert main(["federation", "create", "solo", "--home", str(home)]) == 0
    return home


def new_daemon(home: Path) -> Daemon:
    return Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({}))


def run_until_it_stops(home: Path) -> NoRoomError:
    """Run a daemon until it stops by itself; it must stop for lack of room (never hang)."""
    async def scenario() -> None:
        with trio.fail_after(WAIT_S):
            await new_daemon(home).run()

    with pytest.raises(NoRoomError) as info:
        trio.run(scenario)
    return info.value


def run_past(home: Path, last_round: int) -> dict[str, Any]:
    """Run a daemon until its component is past ``last_round`` (it continued from the
    ledger); stop it there; its last status."""
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(new_daemon(home).run)
            with trio.fail_after(WAIT_S):
                while True:
                    st = await trio.to_thread.run_sync(request, home / SOCKET_NAME, "status")
                    seen.update(st)
                    if st["components"]["backbone"]["round"] > last_round + 1 \
                            and st["rounds_completed"] >= 2:
                        break
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    return seen


def last_mixed_round(home: Path) -> int:
    return max(int(e.body["round"]) for e in read_entries(home / "ledger.sqlite3")
               if e.kind == kinds.MIX)


def used_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def assert_whole(home: Path) -> None:
    """The ledger verifies against the node's key, and every blob an entry names is whole: no
    entry points at a blob that a full disk cut short; no temporary file is left."""
    ident = load_identity(home / "identity.key")
    report = verify_ledger(home / "ledger.sqlite3", ident.public_key)
    assert report.ok, report
    blobs = BlobStore(home / "blobs")
    for entry in read_entries(home / "ledger.sqlite3"):
        if entry.kind in (kinds.LOCAL_UPDATE, kinds.CHECKPOINT):
            blobs.get(entry.body["digest"])  # (re-checks the digest)
    assert not list((home / "blobs").rglob(".tmp-*"))


def assert_one_clear_line(caplog: pytest.LogCaptureFixture, home: Path, *,
                          need: bool = True) -> str:
    """One error line, naming the home and the space free (and ``need``: needed), and what to
    do; no traceback logged."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert line.startswith(f"home {home}: the disk is ")
    wanted = r", one more round needs about \d+\.\d MiB" if need else ""
    assert re.search(rf"\(\d+\.\d [MG]iB free{wanted}\)", line), line
    assert "start the daemon again" in line
    assert all(r.exc_info is None for r in caplog.records)
    return line


# ---------------------------------------------------------------- a small filesystem
class SmallDisk:
    """A filesystem of ``size`` bytes under ``root``: a tmpfs when this process can mount one,
    else simulated (free space is ``size`` less the files under ``root``, and a blob write
    past it fails with ENOSPC)."""

    def __init__(self, root: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.size = root, size
        root.mkdir()
        self.mounted = _mount(root, size)
        if not self.mounted:
            free = self.free
            monkeypatch.setattr(p2pfed.runtime.daemon, "free_bytes", lambda _path: free())
            monkeypatch.setattr(p2pfed.runtime.diskspace, "free_bytes", lambda _path: free())
            monkeypatch.setattr(p2pfed.blobs, "os", FillingDisk(free))

    def free(self) -> int:
        if self.mounted:
            return shutil.disk_usage(self.root).free
        return max(0, self.size - used_bytes(self.root))

    def grow(self, size: int) -> None:
        self.size = size
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.root)], check=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.root)], check=False)


def _mount(path: Path, size: int) -> bool:
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                               str(path)], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and os.path.ismount(path)


class FillingDisk:
    """``os`` as :mod:`p2pfed.blobs` sees it on a disk with ``room()`` bytes free: a write past
    it fails with ENOSPC, as on a real disk (the store removes its temporary file)."""

    def __init__(self, room: Callable[[], int]) -> None:
        self.room = room
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        return _LimitedFile(os.fdopen(fd, *args, **kwargs), self)


class _LimitedFile:
    def __init__(self, f: Any, disk: FillingDisk) -> None:
        self.f, self.disk = f, disk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _LimitedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: Any) -> int:
        if memoryview(data).nbytes > self.disk.room():
            self.disk.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written: int = self.f.write(data)
        return written


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", 12 * MiB, monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


def test_a_daemon_fills_a_small_disk_stops_refuses_to_start_and_resumes_once_it_grows(
        small_disk: SmallDisk, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    home = make_home(small_disk.root, dim=128 * 1024)  # a 512 KiB state: ~7.5 MiB a round
    # rounds run until the next one would not fit; then it stops by itself
    stopped = run_until_it_stops(home)
    line = assert_one_clear_line(caplog, home)
    assert str(stopped) == line and "no new round starts, the daemon stops" in line
    assert exitcodes.for_error(stopped) == exitcodes.STORAGE
    assert_whole(home)
    before = last_mixed_round(home)
    assert before >= 2  # (it ran rounds before the disk filled)
    # while the disk stays full, it refuses to start (before it listens, so before READY)
    caplog.clear()
    refused = run_until_it_stops(home)
    assert str(refused).startswith(f"home {home}: the disk is nearly full (")
    assert "refusing to start" in str(refused)
    assert not [r for r in caplog.records if "listening on" in r.getMessage()]
    assert verify_ledger(home / "ledger.sqlite3").ok and last_mixed_round(home) == before
    # space freed: it starts, resumes from its checkpoint and runs rounds past the old ones
    small_disk.grow(small_disk.size + 16 * MiB)
    caplog.clear()
    status = run_past(home, before)
    assert status["ledger_ok"] is True
    assert any("resumed from checkpoints" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_whole(home)
    assert last_mixed_round(home) > before


# ---------------------------------------------------------------- an injected full disk
class LedgerRoom:
    """Ledger connections opened while ``pages`` is set may grow the database by that many
    pages only (SQLite then fails: "database or disk is full")."""

    def __init__(self) -> None:
        self.pages: int | None = None

    def connect(self, path: Path, mode: str) -> sqlite3.Connection:
        conn = p2pfed.ledger_verify.connect(path, mode)
        if mode == "rw" and self.pages is not None:
            count = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {count + self.pages}")
        return conn


@pytest.mark.parametrize("where", ["blob", "ledger"])
def test_a_write_that_fails_for_lack_of_space_stops_the_daemon_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        where: str) -> None:
    caplog.set_level(logging.INFO)
    home = make_home(tmp_path, dim=4096)
    blobs_may_hold = [used_bytes(home / "blobs") + 100 * 1024]
    disk = FillingDisk(lambda: blobs_may_hold[0] - used_bytes(home / "blobs"))
    if where == "blob":  # a few rounds' payloads (16 KiB each) fit, then a blob write fails
        monkeypatch.setattr(p2pfed.blobs, "os", disk)
    else:  # the ledger may grow by two pages, then a commit fails
        ledger_room = LedgerRoom()
        ledger_room.pages = 2
        monkeypatch.setattr(p2pfed.ledger, "connect", ledger_room.connect)

    stopped = run_until_it_stops(home)
    line = assert_one_clear_line(caplog, home)
    assert str(stopped) == line
    assert f"home {home}: the disk is full" in line and "rounds stopped" in line
    assert disk.failures == (1 if where == "blob" else 0)  # it stopped at the first failure
    # the node's memory may be a write ahead of its ledger: not checkpointed
    assert any(r.getMessage().startswith("not checkpointing") for r in caplog.records)
    assert_whole(home)
    before = last_mixed_round(home)

    # the space is freed: a restart continues from the ledger
    if where == "blob":
        blobs_may_hold[0] = 1 << 40
    else:
        ledger_room.pages = None
    caplog.clear()
    status = run_past(home, before)
    assert status["ledger_ok"] is True
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_whole(home)
    assert last_mixed_round(home) > before


# ---------------------------------------------------------------- a neighbour's payload
async def test_a_full_disk_while_keeping_a_neighbours_payload_stops_the_daemon_cleanly(
        tmp_path: Path, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """The write fails in the task that fetched a peer's payload: the daemon is told to stop
    (one line, no traceback), the error never tears its nursery down."""
    from gossip.transport.memory import MemoryNetwork
    from p2pfed.runtime.driver import NodeDriver
    from tests.test_daemon import StubNode

    class FullNode(StubNode):
        def payload_received(self, *_args: object) -> list[object]:
            raise p2pfed.home.DiskFullError("cannot write blob file x: the disk is full")

    net = MemoryNetwork(latency_s=0.1)
    peer = net.attach("peer")
    peer.set_payload_server(lambda key: b"payload-" + key)
    driver = NodeDriver(FullNode("me"), net.attach("me"))  # type: ignore[arg-type]
    daemon = Daemon(tmp_path, Config(), Notifier({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon._drive, driver)
        await peer.send("me", b"announcement")
        with trio.fail_after(WAIT_S):
            await daemon._stop.wait()
    line = assert_one_clear_line(caplog, tmp_path, need=False)  # (no node loaded here)
    assert "the disk is full" in line and daemon._torn  # (no checkpoint of a torn state)
