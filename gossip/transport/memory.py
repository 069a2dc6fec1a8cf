"""In-process transport: every node of a simulation in one trio run, over memory channels.

Links can fail and peers can leave, so churn and partitions are testable; inboxes are bounded
(a flooded peer drops messages, it never grows without limit).  With trio's
``MockClock(autojump_threshold=0)`` latency and timeouts cost no real time.

A peer policy and a record validator act as on the network: a stranger's fetch is refused,
broadcasts go only between peers that count each other as members and are delivered only where
the receiver's validator accepts them; control messages of strangers are delivered (in memory
there is no stream budget to exhaust).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import trio

from gossip.errors import OversizedMessageError, PeerUnreachableError
from gossip.transport.base import Payload, PayloadServer, PeerPolicy, RecordValidator

log = logging.getLogger(__name__)


@dataclass
class NetworkStats:
    messages: int = 0
    message_bytes: int = 0
    fetches: int = 0
    fetch_bytes: int = 0
    dropped: int = 0
    #: (server, client) pairs of every successful fetch, for tests of who exchanged what
    fetch_pairs: Counter[tuple[str, str]] = field(default_factory=Counter)


class MemoryNetwork:
    """A switchboard connecting :class:`MemoryTransport` endpoints."""

    def __init__(self, *, latency_s: float = 0.0, inbox_size: int = 4096) -> None:
        self.latency_s = latency_s
        self.inbox_size = inbox_size
        self.stats = NetworkStats()
        self._endpoints: dict[str, MemoryTransport] = {}
        self._failed: set[frozenset[str]] = set()

    def attach(self, peer_id: str) -> MemoryTransport:
        if peer_id in self._endpoints:
            raise ValueError(f"{peer_id} is already attached")
        endpoint = MemoryTransport(self, peer_id)
        self._endpoints[peer_id] = endpoint
        return endpoint

    def detach(self, peer_id: str) -> None:
        endpoint = self._endpoints.pop(peer_id, None)
        if endpoint is not None:
            endpoint.close()

    def fail_link(self, a: str, b: str) -> None:
        self._failed.add(frozenset((a, b)))

    def restore_link(self, a: str, b: str) -> None:
        self._failed.discard(frozenset((a, b)))

    def _route(self, src: str, dst: str) -> MemoryTransport:
        target = self._endpoints.get(dst)
        if target is None or frozenset((src, dst)) in self._failed:
            raise PeerUnreachableError(f"{dst} is unreachable from {src}", peer=dst)
        return target


class MemoryTransport:
    """One node's endpoint on a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, peer_id: str) -> None:
        self._network = network
        self._peer_id = peer_id
        self._send, self._recv = trio.open_memory_channel[tuple[str, bytes]](network.inbox_size)
        self._server: PayloadServer | None = None
        self._is_member: PeerPolicy | None = None
        self._validate: RecordValidator | None = None
        self.wanted: dict[str, tuple[str, ...]] = {}
        #: misbehaviour reported by the node, per peer (for tests)
        self.misbehaviour: Counter[str] = Counter()

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def incoming(self) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        return self._recv

    def set_payload_server(self, server: PayloadServer) -> None:
        self._server = server

    def set_peer_policy(self, is_member: PeerPolicy | None) -> None:
        self._is_member = is_member

    def set_record_validator(self, validate: RecordValidator | None) -> None:
        self._validate = validate

    def membership_changed(self) -> None:
        """Nothing to apply: the policy is asked on every exchange."""

    def misbehaved(self, peer: str, reason: str) -> None:
        """Counted only: in memory there is no connection to cut."""
        self.misbehaviour[peer] += 1

    def _knows(self, peer: str) -> bool:
        return self._is_member is None or self._is_member(peer)

    def _accepts(self, origin: str, data: bytes) -> bool:
        return self._validate is None or self._validate(origin, data)

    def close(self) -> None:
        self._send.close()

    def _deliver(self, src: str, data: bytes) -> None:
        try:
            self._send.send_nowait((src, data))
        except trio.WouldBlock:
            self._network.stats.dropped += 1
            log.debug("inbox of %s full: dropped a message from %s", self._peer_id, src)
        except trio.ClosedResourceError:
            self._network.stats.dropped += 1

    async def send(self, peer: str, data: bytes) -> None:
        target = self._network._route(self._peer_id, peer)
        if self._network.latency_s:
            await trio.sleep(self._network.latency_s)
            target = self._network._route(self._peer_id, peer)
        else:
            await trio.lowlevel.checkpoint()
        self._network.stats.messages += 1
        self._network.stats.message_bytes += len(data)
        target._deliver(self._peer_id, data)

    def set_wanted_peers(self, peers: dict[str, tuple[str, ...]]) -> None:
        """In memory every attached peer is reachable; remembered for tests."""
        self.wanted = dict(peers)

    async def broadcast(self, data: bytes) -> None:
        """Deliver to every other attached endpoint over a working link (members only)."""
        await trio.lowlevel.checkpoint()
        for peer, target in list(self._network._endpoints.items()):
            if peer != self._peer_id and frozenset((self._peer_id, peer)) not in \
                    self._network._failed and self._knows(peer):
                if not (target._knows(self._peer_id) and target._accepts(self._peer_id, data)):
                    continue
                self._network.stats.messages += 1
                self._network.stats.message_bytes += len(data)
                target._deliver(self._peer_id, data)

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> Payload:
        target = self._network._route(self._peer_id, peer)
        if self._network.latency_s:
            await trio.sleep(2 * self._network.latency_s)
            target = self._network._route(self._peer_id, peer)
        else:
            await trio.lowlevel.checkpoint()
        if not target._knows(self._peer_id):
            raise PeerUnreachableError(f"{peer} refused a fetch: not a member", peer=peer)
        server = target._server
        data = server(key) if server is not None else None
        if data is None:
            raise PeerUnreachableError(f"{peer} does not have {key.hex()[:12]}", peer=peer)
        if len(data) > max_bytes:
            raise OversizedMessageError(
                f"payload of {len(data)} bytes exceeds the cap of {max_bytes}", peer=peer
            )
        stats = self._network.stats
        stats.fetches += 1
        stats.fetch_bytes += len(data)
        stats.fetch_pairs[(peer, self._peer_id)] += 1
        return data
