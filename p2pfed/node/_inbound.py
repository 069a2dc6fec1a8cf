"""Checks on what neighbours send: an announcement's place, a payload against its announcement.

Pure functions: they raise a :class:`~gossip.errors.RemoteError` naming the peer, or return
what was checked; the node decides what to do with it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from gossip.envelope import Envelope, digest
from gossip.errors import BadPayloadError, NotAMemberError
from p2pfed.codec import Buffer, decode_payload
from p2pfed.node._records import Announcement, Fetch
from p2pfed.node._state import ComponentRound

log = logging.getLogger(__name__)

def announcement_of(peer: str, env: Envelope, states: Mapping[str, ComponentRound]
                    ) -> tuple[Announcement, ComponentRound]:
    """The announcement ``env`` carries and the round state of its component, when ``peer``
    is a neighbouring holder of it."""
    ann = Announcement.from_body(env.body)
    st = states.get(ann.component)
    if st is None or peer not in st.neighbours:
        raise NotAMemberError(f"{peer} is not a neighbouring holder of {ann.component!r}",
                              peer=peer)
    return ann, st


def fetch_of(peer: str, ann: Announcement, max_bytes: int) -> Fetch:
    """The fetch of the payload ``ann`` announces (never more than ``max_bytes``)."""
    return Fetch(peer, ann.component, ann.round, ann.digest, min(ann.size, max_bytes))


def check_size(ann: Announcement, max_bytes: int) -> None:
    if ann.size > max_bytes:
        raise BadPayloadError(f"announced payload of {ann.size} bytes is over the cap")


def payload_state(peer: str, name: str, round_: int, dig: bytes, data: Buffer,
                  st: ComponentRound | None, max_bytes: int) -> torch.Tensor | None:
    """The state in a payload fetched for ``st``, once it is what its announcement said: the
    digest, the size, the component's layout and the round (None: it came after its round
    ended: late, not the sender's fault)."""
    rec = st.inbox.get((round_, peer)) if st is not None else None
    if st is not None and rec is None and round_ < st.round:
        log.debug("dropping a late payload for %s round %d from %s (now at round %d)",
                  name, round_, peer[-8:], st.round)
        return None
    if st is None or rec is None or rec.announcement.digest != dig:
        raise BadPayloadError(f"unsolicited payload for {name} round {round_}", peer=peer)
    if len(data) > rec.announcement.size:
        raise BadPayloadError("payload is larger than announced", peer=peer)
    if digest(data) != dig:
        raise BadPayloadError("payload does not match the announced digest", peer=peer)
    decoded = decode_payload(data, max_bytes=max_bytes, expected_component=name,
                             expected_layout=st.comp.layout, shared=True)  # (only read)
    if decoded.round != round_:
        raise BadPayloadError("payload is for another round", peer=peer)
    return decoded.flat
