"""The running libp2p host's links to peers: dials, outbound streams, the peerstore, hang-ups.

:class:`PeerLinks` wraps the few host calls the transport makes per peer, each bounded in time
and with py-libp2p's assorted errors (exception groups among them) turned into
:class:`~gossip.errors.PeerUnreachableError`.  Outbound streams are limited per peer, so a burst
waits its turn rather than running into the peer's cap of inbound streams.  ``trio.Cancelled``
always propagates.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from gossip.errors import PeerUnreachableError
from gossip.transport.limits import Limits
from gossip.transport.wire import Stream

__all__ = ["DISCONNECT_S", "PeerLinks", "peer_id_of"]

log = logging.getLogger(__name__)

#: Best-effort time given to closing a peer's connections.
DISCONNECT_S = 5.0


def peer_id_of(peer: str) -> ID:
    """py-libp2p's ID of ``peer`` (base58); PeerUnreachableError when it is not one."""
    try:
        return ID.from_base58(peer)
    except Exception as exc:  # base58 and multihash raise assorted errors
        raise PeerUnreachableError(f"not a peer id: {peer!r}", peer=peer) from exc


class PeerLinks:
    """Per-peer calls into ``host``, which is set while the host runs (None otherwise)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.host: Any = None
        self._outbound: dict[str, trio.CapacityLimiter] = {}

    @asynccontextmanager
    async def stream(self, peer: str, protocol: TProtocol) -> AsyncIterator[Stream]:
        """A new stream to ``peer`` (dialing if needed): closed on success, reset on error.

        At most ``outbound_streams_per_peer`` at once, so a burst waits its turn rather than
        running into the peer's cap of inbound streams.
        """
        host = self.host
        if host is None:
            raise PeerUnreachableError("the host is not running", peer=peer)
        turns = self._outbound.setdefault(
            peer, trio.CapacityLimiter(self.limits.outbound_streams_per_peer))
        try:
            async with turns:
                stream = Stream(await host.new_stream(peer_id_of(peer), [protocol]))
                ok = False
                try:
                    yield stream
                    ok = True
                finally:
                    await (stream.close() if ok else stream.reset())
        finally:
            if turns.borrowed_tokens == 0 and turns.statistics().tasks_waiting == 0:
                self._outbound.pop(peer, None)

    async def connect(self, peer: str, addrs: tuple[str, ...], timeout_s: float) -> None:
        """Dial ``peer`` at ``addrs`` within ``timeout_s``.  Raises PeerUnreachableError."""
        host = self.host
        if host is None:
            raise PeerUnreachableError("the host is not running", peer=peer)
        try:
            info = PeerInfo(peer_id_of(peer), [multiaddr.Multiaddr(a) for a in addrs])
            # the swarm refuses to redial a peer for 60 s after a failure ("negative
            # cache"); the backoff here decides when to try again
            host.get_network().unblock_peer(info.peer_id)
            with trio.fail_after(timeout_s):
                await host.connect(info)
        except PeerUnreachableError:
            raise
        except Exception as exc:  # dial errors arrive as exception groups, among others
            raise PeerUnreachableError(f"cannot connect to {peer}: {exc!r}", peer=peer) from exc

    def remember(self, peer: str, addrs: tuple[str, ...]) -> None:
        """Put a wanted peer's addresses in the peerstore, so a stream to it can dial."""
        if self.host is None or not addrs:
            return
        try:
            maddrs = [multiaddr.Multiaddr(a) for a in addrs]
            self.host.get_peerstore().add_addrs(peer_id_of(peer), maddrs, 0)  # 0: permanent
        except Exception as exc:  # bad address or peer id, from an invite or a record
            log.warning("ignoring the addresses of %s: %r", peer, exc)

    async def disconnect(self, peer: str) -> None:
        """Close ``peer``'s connections, best effort, within ``DISCONNECT_S``."""
        host = self.host
        if host is None:
            return
        with trio.move_on_after(DISCONNECT_S):
            try:
                await host.disconnect(peer_id_of(peer))
            except Exception as exc:  # the connection may be closing already
                log.debug("disconnecting %s failed: %r", peer, exc)
