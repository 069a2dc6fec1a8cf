"""Where a node keeps its state: ``--home``, else ``$P2PFED_HOME``, else ~/.local/share/p2pfed.

Also the storage errors every file of the home shares: a full disk (``ENOSPC``, or SQLite's
"database or disk is full") becomes :class:`DiskFullError`, and private files and folders get
owner-only modes whatever the umask.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path

from gossip.errors import StorageError

ENV_VAR = "P2PFED_HOME"
KEY_FILE = "identity.key"
LEDGER_FILE = "ledger.sqlite3"
CONFIG_FILE = "p2pfed.toml"
BLOBS_DIR = "blobs"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(StorageError):
    """A write failed because the disk (or the user's quota) is full."""

    code = "disk-full"


class MissingStateError(StorageError):
    """A file the node's other state depends on is gone (e.g. the ledger of a member)."""

    code = "state-missing"


def default_home() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data) if data else Path.home() / ".local" / "share"
    return base / "p2pfed"


def resolve_home(home: Path | None) -> Path:
    return (home if home is not None else default_home()).expanduser()


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError or a sqlite3 error) says the disk or quota is full."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or "database or disk is full" in str(exc))
    return False


def storage_error(exc: OSError | sqlite3.Error, what: str) -> StorageError:
    """The error to raise for ``exc``, hit while trying ``what`` ("cannot write x")."""
    if is_disk_full(exc):
        return DiskFullError(f"{what}: the disk is full ({exc}); free some space, then "
                             "try again")
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StorageError(f"{what}: {detail}")


def make_private(path: Path, mode: int) -> None:
    """Give ``path`` exactly ``mode`` when group or others have any access (no-op if absent)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077 or current & mode != mode:
        os.chmod(path, mode)

