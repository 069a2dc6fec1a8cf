"""The one exception hierarchy of p2pfed.

Two boundaries matter, as in h11's ``LocalProtocolError``/``RemoteProtocolError``:

* :class:`LocalError` — something on this node is wrong (bad configuration, an unreadable or
  unsafe key file, a corrupt ledger, a budget that would be exceeded).  Usually fatal to the
  command that hit it, and reported to the operator.
* :class:`RemoteError` — a peer sent something we refuse (malformed, oversized, forged, tampered,
  replayed, out of time, for another federation, from a non-member, a bad tensor payload).  It is
  handled per peer — dropped, counted, logged — and never stops the daemon.

Every class carries a short, stable ``code`` used in logs, metrics and JSON output.
"""

from __future__ import annotations


class P2PFedError(Exception):
    """Base of every error p2pfed raises on purpose."""

    code = "error"


class LocalError(P2PFedError):
    """A problem on this node: configuration, files, storage, misuse of an API."""

    code = "local"


class ConfigError(LocalError):
    """A configuration or topology file is invalid."""

    code = "config"


class KeyFileError(LocalError):
    """The identity key file is missing, corrupt or unsafe."""

    code = "key-file"


class KeyPermissionError(KeyFileError):
    """The identity key file is readable or writable by group or others."""

    code = "key-permissions"


class StorageError(LocalError):
    """The ledger, blob store or checkpoint store is unreadable, corrupt or inconsistent."""

    code = "storage"


class LedgerIntegrityError(StorageError):
    """The hash chain of the ledger is broken; ``index`` names the first bad entry."""

    code = "ledger-integrity"

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"ledger entry {index}: {reason}")
        self.index = index
        self.reason = reason


class RemoteError(P2PFedError):
    """A peer sent something we refuse.  Handled per peer, never fatal."""

    code = "remote"

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class MalformedMessageError(RemoteError):
    """The bytes do not decode to a well-formed record."""

    code = "malformed"


class OversizedMessageError(RemoteError):
    """The message or payload exceeds a hard size cap (checked before decoding)."""

    code = "oversized"


class ForgedSignatureError(RemoteError):
    """The signature does not verify for the claimed sender."""

    code = "forged"


class TamperedMessageError(RemoteError):
    """The signed header is authentic but the body does not match its signed digest."""

    code = "tampered"


class ReplayedMessageError(RemoteError):
    """The (sender, sequence) pair was already seen or is older than the replay window."""

    code = "replayed"


class ClockSkewError(RemoteError):
    """The message timestamp is too far from our clock."""

    code = "clock-skew"


class WrongFederationError(RemoteError):
    """The message belongs to another federation."""

    code = "wrong-federation"


class NotAMemberError(RemoteError):
    """The sender is not a member of the federation (or not a holder of the component)."""

    code = "not-a-member"


class UnauthorizedError(RemoteError):
    """The sender is a member but not allowed to issue this record (e.g. an invite)."""

    code = "unauthorized"


class BadPayloadError(RemoteError):
    """A tensor payload has the wrong digest, shape, dtype or non-finite values."""

    code = "bad-payload"


class PeerUnreachableError(RemoteError):
    """A peer could not be reached (link down, peer gone, stream reset)."""

    code = "unreachable"


class NotAdminError(UnauthorizedError):
    """A record only an admin of the federation may sign (a task-catalogue record) was signed
    by another key."""

    code = "not-admin"
