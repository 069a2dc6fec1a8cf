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
* the admission would count in the member's view: the invite has a use left (first admitted,
  first served), the join is newer than the joiner's last leave, and no revocation voids it.

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
    member already.  Raises a :class:`~gossip.errors.RemoteError` when the request is refused:
    nothing is signed that the federation would not count.
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
    if not Join.from_body(join_env.body).invite:
        raise NotAMemberError("a join without an invite cannot be admitted")
    admission = make_admit(sponsor, view.federation_id, request.body, now_ms, seq)
    if not view.would_admit(admission):  # checks the invite, its proof, expiry, uses, ...
        raise UnauthorizedError("the invite has been used up, or this join is older than the "
                                "member's last leave or revocation")
    return admission
