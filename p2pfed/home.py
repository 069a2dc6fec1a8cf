"""Where a node keeps its state: ``--home``, else ``$P2PFED_HOME``, else ~/.local/share/p2pfed.

Also the storage errors every file of the home shares: a full disk (``ENOSPC``, or SQLite's
"database or disk is full") becomes :class:`DiskFullError`, and private files and folders get
owner-only modes whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from gossip.errors import ConfigError, LocalError, StorageError

ENV_VAR = "P2PFED_HOME"
KEY_FILE = "identity.key"
LEDGER_FILE = "ledger.sqlite3"
CONFIG_FILE = "p2pfed.toml"
BLOBS_DIR = "blobs"
#: what may be recomputed at any time (the text model's identity); deleting it costs time only
CACHE_DIR = "cache"
#: held (``flock``) by whatever writes the home: the daemon for its life, ``join`` for a moment
LOCK_FILE = "daemon.lock"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(StorageError):
    """A write failed because the disk (or the user's quota) is full."""

    code = "disk-full"


class MissingStateError(StorageError):
    """A file the node's other state depends on is gone (e.g. the ledger of a member)."""

    code = "state-missing"


class HomeInUseError(LocalError):
    """Another process (a daemon, most likely) holds the home's lock."""

    code = "home-in-use"


def default_home() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data) if data else Path.home() / ".local" / "share"
    return base / "p2pfed"


def resolve_home(home: Path | None) -> Path:
    """The home folder (it may not exist yet); ConfigError when the path is not a folder."""
    root = (home if home is not None else default_home()).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"the home {root} is a file, not a folder (see --home)")
    return root


@contextlib.contextmanager
def locked_home(home: Path, command: str = "run") -> Iterator[None]:
    """Hold ``home``'s lock for the block; :class:`HomeInUseError` at once if another process
    holds it (the lock file names its pid and the ``p2pfed`` command it runs).

    ``flock`` is released by the kernel when the holder exits, however it exits, so a crashed
    daemon never leaves a stale lock; the file itself stays.
    """
    path = home / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    except OSError as exc:
        raise storage_error(exc, f"cannot open {path}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HomeInUseError(_in_use_message(home, os.pread(fd, 64, 0))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


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


def _in_use_message(home: Path, held: bytes) -> str:
    pid, _, command = held.decode("ascii", "replace").strip().partition(" ")
    pid = f" (pid {pid})" if pid.isdigit() else ""
    if command in ("", "run"):
        return (f"a daemon is already running on {home}{pid}; stop it first "
                "('systemctl stop p2pfed', or Ctrl-C where it runs)")
    return f"'p2pfed {command}' is using {home}{pid}; try again when it is done"


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

