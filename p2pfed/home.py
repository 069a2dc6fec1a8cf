"""Where a node keeps its state: ``--home``, else ``$P2PFED_HOME``, else ~/.local/share/p2pfed."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "P2PFED_HOME"
KEY_FILE = "identity.key"
LEDGER_FILE = "ledger.sqlite3"
CONFIG_FILE = "p2pfed.toml"
BLOBS_DIR = "blobs"


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
