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


class Transport(Protocol):
    """A node's view of the network."""

    @property
    def peer_id(self) -> str: ...

    @property
    def incoming(self) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        """(sender peer id, message bytes) as they arrive; bounded, oldest kept."""
        ...

    def set_payload_server(self, server: PayloadServer) -> None: ...

    async def send(self, peer: str, data: bytes) -> None:
        """Deliver a small control message; raises PeerUnreachableError."""
        ...

    def set_wanted_peers(self, peers: dict[str, tuple[str, ...]]) -> None:
        """Keep connections (reconnecting with backoff) to these peers at these addresses."""
        ...

    async def broadcast(self, data: bytes) -> None:
        """Publish a small signed record to every member (GossipSub on the network)."""
        ...

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> bytes:
        """Fetch a payload by key; raises PeerUnreachableError or OversizedMessageError."""
        ...
