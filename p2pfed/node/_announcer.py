"""This node's announcements: sealed once per round, and sent again to a neighbour that missed
the current one.

A neighbour misses an announcement when the send to it failed (it was restarting, or a link
was down) or when it became a neighbour after the announcement went out (it just joined).
Without a second send it would wait out a whole round timeout for this node's update.  The
driver reports failed sends (:meth:`Announcer.failed`); when the neighbour is heard from again
(any authenticated message) it gets the current announcement, sealed afresh (a new sequence
number and time: the same bytes again would be refused as a replay).  Nothing is re-sent to a
neighbour that got it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gossip.envelope import Sequencer, seal
from gossip.identity import Identity
from p2pfed.node._records import ANNOUNCE, Action, Announce, Announcement


class Announcer:
    """Seals announcements and keeps, per component, who missed the current one."""

    def __init__(self, identity: Identity, federation_id: bytes, sequencer: Sequencer) -> None:
        self._identity = identity
        self._federation_id = federation_id
        self._seq = sequencer
        self._current: dict[str, tuple[Announcement, bytes]] = {}
        self._missed: dict[str, set[str]] = {}

    def _seal(self, ann: Announcement, now_ms: int) -> bytes:
        return seal(self._identity, kind=ANNOUNCE, federation_id=self._federation_id,
                    seq=self._seq.next(), timestamp_ms=now_ms, body=ann.to_body()).to_bytes()

    def announce(self, ann: Announcement, neighbours: tuple[str, ...],
                 now_ms: int) -> list[Action]:
        """Announce ``ann`` to ``neighbours`` (it becomes its component's current one)."""
        data = self._seal(ann, now_ms)
        self._current[ann.component] = (ann, data)
        self._missed[ann.component] = set()
        return [Announce(neighbours, data)] if neighbours else []

    def failed(self, peer: str, data: bytes) -> None:
        """The driver could not deliver ``data`` to ``peer``."""
        for component, (_ann, sent) in self._current.items():
            if sent == data:
                self._missed[component].add(peer)

    def joined(self, new: Mapping[str, Iterable[str]]) -> None:
        """Per component, peers that became neighbours after its announcement went out."""
        for component, peers in new.items():
            if component in self._current:
                self._missed[component].update(peers)

    def resend(self, peer: str, now_ms: int) -> list[Action]:
        """``peer`` is heard from: the current announcements it missed, sealed afresh."""
        out: list[Action] = []
        for component, peers in sorted(self._missed.items()):
            if peer in peers:
                peers.discard(peer)
                out.append(Announce((peer,), self._seal(self._current[component][0], now_ms)))
        return out
