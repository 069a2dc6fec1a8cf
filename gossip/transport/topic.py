"""The libp2p transport's one GossipSub topic: small signed records for every member.

:class:`RecordTopic` builds the members-only router and pubsub of
:mod:`gossip.transport.pubsub_guard` (strict signing, GossipSub v1.2/v1.1/v1.0), validates
every record before GossipSub delivers or relays it (64 KiB at most, then the record validator
through the :class:`~gossip.transport.guard.PeerGuard`), hands accepted records to the inbox,
and publishes this node's own.  A stranger forwarding a record, or a peer sending an oversized
one, is struck.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12

from gossip.errors import OversizedMessageError, PeerUnreachableError
from gossip.transport.guard import PeerGuard
from gossip.transport.limits import Limits, TransportStats
from gossip.transport.pubsub_guard import MembersOnlyGossipSub, MembersOnlyPubsub
from gossip.transport.wire import MAX_CONTROL_BYTES

__all__ = ["RecordTopic"]

log = logging.getLogger(__name__)


class RecordTopic:
    """GossipSub on ``topic`` for one host: members only, every record validated.

    ``deliver(origin, data)`` queues an accepted record (False when the inbox is full).
    ``pubsub`` is set while the host runs, None otherwise.
    """

    def __init__(self, topic: str, local_peer: str, guard: PeerGuard, limits: Limits,
                 stats: TransportStats, deliver: Callable[[str, bytes], bool]) -> None:
        self.topic = topic
        self.local_peer = local_peer
        self.limits = limits
        self.stats = stats
        self.pubsub: MembersOnlyPubsub | None = None
        self._guard = guard
        self._deliver = deliver

    def new_pubsub(self, host: Any) -> tuple[MembersOnlyPubsub, MembersOnlyGossipSub]:
        """Members-only pubsub and GossipSub router for ``host``, the validator installed."""
        router = MembersOnlyGossipSub(
            is_member=self._is_member_id,
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
            max_messages_per_topic_per_second=self.limits.max_records_per_second,
            # all members may share one address (a lab, or loopback): no IP diversity rule
            eclipse_protection_enabled=False,
        )
        pubsub = MembersOnlyPubsub(host, router, strict_signing=True,
                                   allowed_topics=[self.topic],
                                   on_stranger_record=self._stranger_record)
        pubsub.set_topic_validator(self.topic, self._validate_record, False)
        return pubsub, router

    async def publish(self, data: bytes) -> None:
        """Publish a small record on the topic (signed by the host key)."""
        if len(data) > MAX_CONTROL_BYTES:
            raise OversizedMessageError(
                f"record of {len(data)} bytes exceeds the cap of {MAX_CONTROL_BYTES}"
            )
        pubsub = self.pubsub
        if pubsub is None:
            raise PeerUnreachableError("cannot broadcast: the host is not running")
        try:
            await pubsub.publish(self.topic, data)
        except Exception as exc:
            raise PeerUnreachableError(f"publish failed: {exc!r}") from exc
        self.stats.broadcasts_sent += 1

    async def receive(self, subscription: Any) -> None:
        """Deliver the records of ``subscription`` (other members'), forever."""
        while True:
            msg = await subscription.get()
            try:
                origin = str(ID(msg.from_id))
            except Exception:  # strict signing makes this unreachable; be safe
                self.stats.rejected += 1
                continue
            if origin != self.local_peer and self._deliver(origin, bytes(msg.data)):
                self.stats.broadcasts_received += 1

    def sync_members(self) -> None:
        """Each dial round: new members get a pubsub stream, former ones lose theirs."""
        if self.pubsub is not None and self._guard.has_policy:
            self.pubsub.sync_members()

    def _is_member_id(self, peer: ID) -> bool:
        return self._guard.is_member(str(peer))

    def _validate_record(self, forwarder: ID, msg: Any) -> bool:
        """GossipSub's topic validator: nothing it refuses is delivered or relayed."""
        data = bytes(msg.data)
        if len(data) > MAX_CONTROL_BYTES:
            self.stats.records_rejected += 1
            self._guard.strike(str(forwarder), "sent an oversized record")
            return False
        if str(forwarder) == self.local_peer:
            return True  # this node's own publication
        try:
            origin = str(ID(msg.from_id))
        except Exception:  # strict signing makes this unreachable; be safe
            self.stats.records_rejected += 1
            return False
        return self._guard.accept_record(str(forwarder), origin, data)

    def _stranger_record(self, forwarder: ID) -> None:
        self.stats.records_rejected += 1
        self._guard.strike(str(forwarder), "forwarded a record, not being a member")
