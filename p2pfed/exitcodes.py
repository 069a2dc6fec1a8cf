"""Exit codes of the ``p2pfed`` command, in one place."""

from __future__ import annotations

from gossip.errors import (
    ConfigError,
    KeyFileError,
    LedgerIntegrityError,
    P2PFedError,
    RemoteError,
    StorageError,
)
from p2pfed.home import HomeInUseError, MissingStateError
from p2pfed.runtime.ports import PortInUseError

OK = 0
FAILURE = 1  # any other P2PFedError
USAGE = 2  # wrong command-line arguments (click's convention)
CONFIG = 3  # invalid configuration or topology file
KEY_FILE = 4  # missing, corrupt or unsafe identity key
LEDGER_BROKEN = 5  # ledger verification found a bad entry
STORAGE = 6  # ledger or blob store unreadable or unwritable (a full disk included)
REMOTE = 7  # a peer refused or misbehaved and the command could not finish
STATE_MISSING = 8  # a file the node's other state needs is gone (a member's ledger)
IN_USE = 9  # another daemon holds the home, or another program a listen port
INTERRUPTED = 130


def for_error(exc: P2PFedError) -> int:
    """The exit code for an error that ended a command."""
    table: tuple[tuple[type[P2PFedError], int], ...] = (
        (HomeInUseError, IN_USE),
        (PortInUseError, IN_USE),
        (ConfigError, CONFIG),
        (KeyFileError, KEY_FILE),
        (LedgerIntegrityError, LEDGER_BROKEN),
        (MissingStateError, STATE_MISSING),
        (StorageError, STORAGE),
        (RemoteError, REMOTE),
    )
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return FAILURE
