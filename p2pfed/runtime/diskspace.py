"""Room on the disk for one more round: what the daemon checks, and what it says when it stops.

The daemon refuses to start, and stops after a round, when the filesystem of its home has less
free space than one more round may write (:func:`round_bytes`).  A write that fails for lack of
space anyway (``ENOSPC``, ``EDQUOT``, SQLite's "database or disk is full": a
:class:`~p2pfed.home.DiskFullError`) stops it the same way.  Either way it logs one line naming
the home, the space free and the space a round needs (:func:`disk_full_message`), and exits
with the storage code.  Nothing is left half-written: a ledger append is one SQLite
transaction and a blob is written to a temporary file and renamed into place, so the ledger
verifies and a restart, once space is freed, resumes from it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from p2pfed.home import DiskFullError, is_disk_full

#: SQLite's write-ahead log grows to about this (its checkpoint threshold, 1000 pages of 4 KiB)
#: and keeps that size until the ledger is closed
WAL_BYTES = 1000 * 4096
#: what else a round writes: its ledger entries, once checkpointed into the database, and a
#: new blob folder
MARGIN_BYTES = 256 << 10


class NoRoomError(DiskFullError):
    """The disk cannot hold one more round: the message names the home and the space free
    and needed (:func:`disk_full_message`)."""


def round_bytes(state_bytes: Iterable[int], neighbours: int, wal_room: int) -> int:
    """The bytes one more round may write, for components of ``state_bytes`` each: its own
    payload, the state it started from (kept for fast unlearning), one payload per neighbour
    (kept for exact unlearning) and a checkpoint; plus what the ledger's write-ahead log may
    still grow (``wal_room``, :func:`wal_room`) and :data:`MARGIN_BYTES`."""
    return sum(state_bytes) * (neighbours + 3) + wal_room + MARGIN_BYTES


def wal_room(ledger_path: Path) -> int:
    """How much the write-ahead log of the ledger at ``ledger_path`` may still grow (all of
    :data:`WAL_BYTES` while the ledger is closed: closing removes the log)."""
    try:
        size = Path(f"{ledger_path}-wal").stat().st_size
    except FileNotFoundError:
        size = 0
    return max(0, WAL_BYTES - size)


def free_bytes(path: Path) -> int:
    """The bytes free (to this user) on the filesystem that holds ``path``."""
    return shutil.disk_usage(path).free


def disk_full_message(home: Path, need: int | None, outcome: str, *, failed: bool) -> str:
    """One line for the log and the exit: the home, the space free and needed, what happens.

    ``failed``: a write failed (the disk is full), else the check found too little room."""
    try:
        free = f"{size_text(free_bytes(home))} free"
    except OSError:
        free = "free space unknown"
    wanted = f", one more round needs about {size_text(need)}" if need else ""
    state = "full" if failed else "nearly full"
    return (f"home {home}: the disk is {state} ({free}{wanted}): {outcome}; the ledger is "
            "intact. Free some space on it, then start the daemon again")


def size_text(n: int) -> str:
    """``n`` bytes in MiB, or GiB from 1 GiB up."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def disk_full_cause(exc: BaseException) -> BaseException | None:
    """The full-disk error that ``exc`` is, or that every error in the group ``exc`` is (the
    first); None when anything else is in it."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc if isinstance(exc, DiskFullError) or is_disk_full(exc) else None
    causes = [disk_full_cause(e) for e in exc.exceptions]
    if not causes or any(c is None for c in causes):
        return None
    return causes[0]

