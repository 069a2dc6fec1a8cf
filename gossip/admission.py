"""Admission: how a newcomer holding an invite token becomes a member, decided by one member.

The newcomer signs its join (with the proof of the invite's ticket, see :mod:`gossip.records`)
and sends it, wrapped in a fresh *join request* envelope, to the bootstrap members its invite
names.  A member that receives the request live checks it against its own view and clock and,
if it holds, signs an **admission** with its own time and adds it to the federation's records;
the newcomer is a member from then on in every view that holds the admission.

What the member checks (:func:`admit`), before it signs anything:

* the request is the sender's own join (nobody joins on someone else's behalf);
* the invite is the federation's, signed by an admin, for this key or proven by its ticket;
* the invite has not expired by the member's clock (the joiner cannot backdate this);
* the invite has a use left in the member's view (first admitted, first served).

A newcomer that is already a member gets no second admission (its retry is answered with the
view).  Everything here is pure: the caller passes the view, the time and a sequence number.
"""

from __future__ import annotations

from gossip.envelope import Envelope, seal
from gossip.errors import MalformedMessageError, NotAMemberError, UnauthorizedError
from gossip.identity import Identity
from gossip.membership import JOIN, MembershipView
from gossip.records import Join, make_admit

JOIN_REQUEST = "join-request"


def make_join_request(identity: Identity, federation_id: bytes, join: bytes, now_ms: int,
                      seq: int) -> Envelope:
    """A fresh envelope around the newcomer's long-lived join record (bytes)."""
    return seal(identity, kind=JOIN_REQUEST, federation_id=federation_id, seq=seq,
                timestamp_ms=now_ms, body=join)


def admit(view: MembershipView, sponsor: Identity, request: Envelope, now_ms: int,
          seq: int) -> Envelope | None:
    """The admission to add for a join request received live, or None when its sender is a
    member already.  Raises a :class:`~gossip.errors.RemoteError` when the request is refused.
    """
    if not view.is_member(sponsor.public_key):
        raise NotAMemberError("this node is not a member: it cannot admit anyone")
    if request.kind != JOIN_REQUEST:
        raise MalformedMessageError(f"not a join request: {request.kind!r}")
    join_env = view.open(request.body)
    if join_env.kind != JOIN or join_env.sender != request.sender:
        raise UnauthorizedError("a join request must carry the sender's own join")
    if view.is_member(join_env.sender):
        return None
    join = Join.from_body(join_env.body)
    if not join.invite:
        raise NotAMemberError("a join without an invite cannot be admitted")
    invite = view.check_join(join, join_env.sender)
    unknown = set(join.modules) - view.genesis.component_names
    if unknown:
        raise MalformedMessageError(f"the join holds modules not in the catalog: "
                                    f"{sorted(unknown)}")
    if now_ms > invite.expires_ms:
        raise UnauthorizedError("the invite has expired")
    if view.invite_used_up(join, join_env.sender):
        raise UnauthorizedError("the invite has been used already")
    return make_admit(sponsor, view.federation_id, request.body, now_ms, seq)
