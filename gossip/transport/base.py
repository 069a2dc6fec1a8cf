"""What every transport offers the runtime: small control messages and payload fetches.

Two implementations stand behind it: :mod:`gossip.transport.memory` (in-process, for the
simulator and tests, driven by trio's clock) and :mod:`gossip.transport.libp2p` (the network).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

#: Answers a fetch by key (a payload digest); None when the key is unknown.
PayloadServer = Callable[[bytes], bytes | None]
#: Says whether a peer id belongs to a current member.  Called often (each inbound stream,
#: each GossipSub recipient): keep it a cheap lookup.
PeerPolicy = Callable[[str], bool]
#: Says whether a broadcast record may be accepted and relayed: (origin peer id, bytes).
RecordValidator = Callable[[str, bytes], bool]


#: a fetched payload: bytes, or a buffer the caller owns (a bytearray, an mmap's memoryview)
Payload = bytes | bytearray | memoryview

class Transport(Protocol):
    """A node's view of the network."""

    @property
    def peer_id(self) -> str: ...

    @property
    def incoming(self) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        """(sender peer id, message bytes) as they arrive; bounded, oldest kept."""
        ...

    def set_payload_server(self, server: PayloadServer) -> None: ...

    def set_peer_policy(self, is_member: PeerPolicy | None) -> None:
        """Treat peers for which ``is_member`` is False as strangers (None: everyone is a member).

        Strangers may send control messages within a small budget of their own (a joiner sends
        its join request that way), get no payloads and receive no broadcast records.
        """
        ...

    def set_record_validator(self, validate: RecordValidator | None) -> None:
        """Accept (deliver and relay) only the broadcast records ``validate`` accepts."""
        ...

    def membership_changed(self) -> None:
        """The policy's answers changed: apply them to open connections now."""
        ...

    def misbehaved(self, peer: str, reason: str) -> None:
        """Count input no honest peer sends against ``peer``; enough cut it off for a while."""
        ...

    async def send(self, peer: str, data: bytes) -> None:
        """Deliver a small control message; raises PeerUnreachableError."""
        ...

    def set_wanted_peers(self, peers: dict[str, tuple[str, ...]]) -> None:
        """Keep connections (reconnecting with backoff) to these peers at these addresses."""
        ...

    async def broadcast(self, data: bytes) -> None:
        """Publish a small signed record to every member (GossipSub on the network)."""
        ...

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> Payload:
        """Fetch a payload by key; raises PeerUnreachableError or OversizedMessageError.  The
        bytes may be a writable buffer of the caller's own (decoded in place, no copy)."""
        ...
