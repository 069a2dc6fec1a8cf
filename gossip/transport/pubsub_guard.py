"""GossipSub that talks to members only.

py-libp2p's pubsub opens a stream to every peer that connects, tells it the topics this host
subscribes to and relays records to it.  Here, while a peer policy is set:

* :class:`MembersOnlyPubsub` opens no pubsub stream to a stranger, so a stranger learns no topic
  and is sent nothing; what a stranger sends is still read, but the records it forwards are
  dropped (and reported, to strike it) before even their signature is checked, and nothing
  else it says is heeded.
  :meth:`MembersOnlyPubsub.sync_members` applies a changed policy: it opens streams to peers
  that became members and drops the ones that stopped being members.
* :class:`MembersOnlyGossipSub` ignores the control messages (GRAFT, IHAVE, IWANT, PRUNE) of
  non-members, never picks them for the mesh, fanout or gossip, never queues records for them
  and sends them nothing, whatever path the router takes.

``is_member`` is asked with py-libp2p peer ids; without a policy it answers True for everyone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

log = logging.getLogger(__name__)

MemberCheck = Callable[[ID], bool]
_Pending = list[tuple[float, rpc_pb2.RPC]]


class _MembersOnlyQueue(defaultdict[ID, _Pending]):
    """GossipSub's queue of records for peers not identified yet: strangers get none."""

    def __init__(self, is_member: MemberCheck) -> None:
        super().__init__(list)
        self._is_member = is_member

    def __missing__(self, peer: ID) -> _Pending:
        if not self._is_member(peer):
            return []  # not stored: what is appended to it is dropped
        return super().__missing__(peer)


class MembersOnlyGossipSub(GossipSub):
    """A GossipSub router that neither sends to nor listens to non-members."""

    def __init__(self, *, is_member: MemberCheck, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.is_member = is_member
        self._pending_messages = _MembersOnlyQueue(is_member)

    async def handle_rpc(self, rpc: rpc_pb2.RPC, sender_peer_id: ID) -> None:
        if self.is_member(sender_peer_id):
            await super().handle_rpc(rpc, sender_peer_id)

    def send_rpc(self, peer_id: ID, rpc: rpc_pb2.RPC, priority: bool = False) -> None:
        if self.is_member(peer_id):
            super().send_rpc(peer_id, rpc, priority)

    def _get_peers_to_send(self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID,
                           msg_id: bytes | None = None) -> Iterable[ID]:
        peers = super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id)
        return [peer for peer in peers if self.is_member(peer)]

    def _get_in_topic_gossipsub_peers_from_minus(
        self, topic: str, num_to_select: int, minus: Iterable[ID], backoff_check: bool = False,
    ) -> list[ID]:
        minus = set(minus)
        everyone = super()._get_in_topic_gossipsub_peers_from_minus(
            topic, len(self.peer_protocol) + len(minus) + 1, minus, backoff_check)
        members = [peer for peer in everyone if self.is_member(peer)]
        return self.select_from_minus(num_to_select, members, ())

    async def on_peer_subscribed(self, peer_id: ID, topic: str) -> None:
        if self.is_member(peer_id):
            await super().on_peer_subscribed(peer_id, topic)


class MembersOnlyPubsub(Pubsub):
    """Pubsub that opens no stream to strangers (they learn no topic and get no record).

    Records a stranger forwards are dropped unchecked (not even their signature) and reported
    to ``on_stranger_record``.
    """

    def __init__(self, host: Any, router: MembersOnlyGossipSub, *,
                 on_stranger_record: Callable[[ID], None], **kwargs: Any) -> None:
        super().__init__(host, router, **kwargs)
        self.is_member = router.is_member
        self.on_stranger_record = on_stranger_record

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if self.is_member(msg_forwarder):
            await super().push_msg(msg_forwarder, msg)
        else:
            self.on_stranger_record(msg_forwarder)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        if self.is_member(peer_id):
            await super()._handle_new_peer(peer_id)
        else:
            log.debug("no pubsub stream to %s: not a member", peer_id)

    def sync_members(self) -> None:
        """Open streams to connected peers that became members; drop those that stopped."""
        if not self.manager.is_running:
            return
        for peer in list(self.peers):
            if not self.is_member(peer):
                stream = self.peers[peer]
                self._handle_dead_peer(peer)
                self.manager.run_task(_reset_quietly, stream)
        for peer in self.host.get_connected_peers():
            if peer not in self.peers and self.is_member(peer):
                self._schedule_peer_stream_retry(peer)


async def _reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception as exc:  # the connection may be gone already
        log.debug("resetting a pubsub stream failed: %r", exc)
