"""The bulk channel's messages, keys, records and tickets, without I/O (time is an input).

A payload fetch over the bulk channel has two legs (see :mod:`gossip.transport.bulk` for the
I/O and ``docs/security.md`` for the threat model):

1. On the libp2p connection (Noise-authenticated to both peer ids), protocol ``/p2pfed/bulk/1``,
   members only: the client sends :data:`REQUEST` (digest, largest size it accepts, 32 random
   bytes); the server answers :data:`ANSWER` (status, size, bulk TCP port, 32 random bytes, a
   32-byte one-time ticket).  Only the two peers know both random values.
2. On a plain TCP connection to the server's bulk port (at the address of the libp2p
   connection): the client sends :data:`HELLO` (ticket, HMAC proof); the server redeems the
   ticket (once, before it expires; bound to the peer and the digest), checks the proof and
   streams the payload in AES-256-GCM records of :data:`RECORD_BYTES` (the last one shorter).

Keys: HKDF-SHA256 over client random, server random, ticket, both peer ids (length-prefixed)
and the digest, info ``p2pfed/v1/bulk``: 32 bytes of record key, 32 bytes of proof key.  The
record nonce is the record index; the associated data binds the ticket, the index, a last-record
flag and the total size, so a reordered, dropped, truncated or altered record fails its tag.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gossip.errors import PeerUnreachableError

RANDOM_BYTES = TICKET_BYTES = 32
#: digest, largest size accepted, client random
REQUEST = struct.Struct(">32sQ32s")
#: status, size, bulk port, server random, ticket
ANSWER = struct.Struct(">BQH32s32s")
#: ticket, HMAC-SHA256 proof that the client holds the keys
HELLO = struct.Struct(">32s32s")
STATUS_OK, STATUS_NOT_FOUND, STATUS_TOO_LARGE, STATUS_BUSY = 0, 1, 2, 3
#: plaintext bytes per record (the last record holds the rest; an empty payload, one empty record)
RECORD_BYTES = 1 << 20
TAG_BYTES = 16
KDF_INFO = b"p2pfed/v1/bulk"
PROOF_DOMAIN = b"p2pfed/v1/bulk/hello"
RECORD_DOMAIN = b"p2pfed/v1/bulk/record"
_RECORD_AD = struct.Struct(">32sQ?Q")


class BulkUnavailableError(PeerUnreachableError):
    """The bulk channel cannot be used with this peer now; the libp2p stream still can.

    Raised before a byte of the payload arrived: the peer does not speak the protocol, has no
    ticket to spare, its port cannot be reached, or it closed the connection after the hello.
    """

    code = "bulk-unavailable"


@dataclass(frozen=True)
class BulkKeys:
    """The keys of one transfer: AES-256-GCM for the records, HMAC for the client's hello."""

    record: AESGCM
    proof_key: bytes

    def proof(self, ticket: bytes) -> bytes:
        return hmac.new(self.proof_key, PROOF_DOMAIN + ticket, hashlib.sha256).digest()

    def proof_ok(self, ticket: bytes, proof: bytes) -> bool:
        return hmac.compare_digest(self.proof(ticket), proof)


def derive_keys(client_rand: bytes, server_rand: bytes, ticket: bytes, *, client: str,
                server: str, digest: bytes) -> BulkKeys:
    """The keys both ends derive from the exchange on the libp2p stream."""
    if len(client_rand) != RANDOM_BYTES or len(server_rand) != RANDOM_BYTES \
            or len(ticket) != TICKET_BYTES or len(digest) != 32:
        raise ValueError("bulk key material of the wrong length")
    ikm = b"".join((client_rand, server_rand, ticket, _prefixed(client), _prefixed(server),
                    digest))
    okm = HKDF(algorithm=SHA256(), length=64, salt=None, info=KDF_INFO).derive(ikm)
    return BulkKeys(AESGCM(okm[:32]), okm[32:])


def _prefixed(peer: str) -> bytes:
    raw = peer.encode()
    return struct.pack(">H", len(raw)) + raw


def record_count(size: int) -> int:
    """Records of a payload of ``size`` bytes (at least one)."""
    return max(1, -(-size // RECORD_BYTES))


def record_span(index: int, size: int) -> tuple[int, int]:
    """(start, end) of record ``index``'s plaintext in the payload."""
    start = index * RECORD_BYTES
    return start, min(size, start + RECORD_BYTES)


def record_nonce(index: int) -> bytes:
    return b"\0\0\0\0" + index.to_bytes(8, "big")


def record_ad(ticket: bytes, index: int, size: int) -> bytes:
    """Associated data of record ``index``: ticket, index, last-record flag, total size."""
    return RECORD_DOMAIN + _RECORD_AD.pack(ticket, index, index == record_count(size) - 1, size)


@dataclass(frozen=True)
class Ticket:
    """What the server promised one peer: one transfer of ``digest`` (``size`` bytes)."""

    peer: str
    digest: bytes
    size: int
    keys: BulkKeys
    expires: float
    #: the payload, kept from the answer to the transfer (None: looked up again then)
    data: bytes | None = None


class TicketTable:
    """Outstanding tickets: single use, expiring, capped per peer and in total.

    The payloads they keep add up to at most ``held_bytes``; see :meth:`can_hold`.
    """

    def __init__(self, *, ttl_s: float, per_peer: int, total: int, held_bytes: int = 0) -> None:
        self.ttl_s, self.per_peer, self.total = ttl_s, per_peer, total
        self.held_bytes = held_bytes
        self._tickets: OrderedDict[bytes, Ticket] = OrderedDict()
        self._held = 0

    def __len__(self) -> int:
        return len(self._tickets)

    @property
    def held(self) -> int:
        """Bytes of payload the outstanding tickets keep."""
        return self._held

    def can_hold(self, size: int, now: float) -> bool:
        """Whether a new ticket may keep a payload of ``size`` bytes."""
        self.expire(now)
        return self._held + size <= self.held_bytes

    def issue(self, ticket_id: bytes, ticket: Ticket, now: float) -> bool:
        """Remember ``ticket``; False (nothing kept) when a cap is reached."""
        self.expire(now)
        if self._held + _held(ticket) > self.held_bytes:
            return False
        if len(self._tickets) >= self.total or ticket_id in self._tickets:
            return False
        if sum(t.peer == ticket.peer for t in self._tickets.values()) >= self.per_peer:
            return False
        self._tickets[ticket_id] = ticket
        self._held += _held(ticket)
        return True

    def redeem(self, ticket_id: bytes, now: float) -> Ticket | None:
        """The ticket, removed (it is good once); None when unknown or expired."""
        self.expire(now)
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is not None:
            self._held -= _held(ticket)
        return ticket

    def expire(self, now: float) -> None:
        """Forget the tickets (and their payloads) past their time."""
        # issued in order with one ttl: the oldest expire first
        while self._tickets:
            ticket_id, ticket = next(iter(self._tickets.items()))
            if ticket.expires > now:
                return
            del self._tickets[ticket_id]
            self._held -= _held(ticket)


def _held(ticket: Ticket) -> int:
    return 0 if ticket.data is None else len(ticket.data)
