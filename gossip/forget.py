"""Signed "forget" requests: the first step of federated unlearning.

A :class:`Forget` record asks every node to remove the influence of one member's data (the
*target*) from the federation's model, either *exactly* (roll back and replay without it) or
*fast* (re-mix stored updates without it).  The requester is the envelope's sender.  Who may ask:

* the target itself, if it is or has been a member (a join by it is in the membership view; a
  member that has left may still ask);
* an admin of the federation (per the genesis), for any key that is or has been a member.

A :class:`ForgetBook` holds at most one accepted request per target.  When several valid
requests name the same target, the one with the smallest ``(requested_round, digest of its
envelope bytes)`` wins, so books that saw the same requests in any order, or merged each other's
:meth:`ForgetBook.records` in any order, hold the same requests.  Whether a request is valid
depends only on the record, the genesis and the joins in the view, and a membership view only
grows, so a request valid once stays valid; a request refused because its target's join has not
arrived yet can be offered again after the next membership sync.

Replays need no sequence window here: the book is a set, and an envelope already held (or one
that loses to the request held for its target) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gossip.envelope import Envelope, digest, open_envelope, packb, seal, unpackb
from gossip.errors import (
    LocalError,
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
    UnauthorizedError,
)
from gossip.identity import PUBLIC_KEY_BYTES, Identity, peer_id_from_public_key
from gossip.membership import NO_SKEW_LIMIT, MembershipView

FORGET = "forget"
MAX_REASON_CHARS = 256
#: rounds are stored in SQLite integers (signed 64-bit)
MAX_ROUND = (1 << 63) - 1


class ForgetMode(StrEnum):
    EXACT = "exact"  # roll back and re-run without the target: as if it never took part
    FAST = "fast"  # re-mix stored updates without the target and calibrate briefly


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise MalformedMessageError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Forget:
    """A request to forget ``target``'s data.  Invalid fields raise ``ValueError``."""

    target: bytes  # the ed25519 public key of the member whose data must be forgotten
    mode: ForgetMode
    requested_round: int  # the round at which the request was made
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.target, bytes) or len(self.target) != PUBLIC_KEY_BYTES:
            raise ValueError("the target must be an ed25519 public key")
        object.__setattr__(self, "mode", ForgetMode(self.mode))
        if not _is_int(self.requested_round) or not 0 <= self.requested_round <= MAX_ROUND:
            raise ValueError(f"the requested round must be an integer in 0..{MAX_ROUND}")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON_CHARS:
            raise ValueError(f"the reason must be a string of at most {MAX_REASON_CHARS} chars")

    def to_body(self) -> bytes:
        return packb([self.target, self.mode.value, self.requested_round, self.reason])

    @classmethod
    def from_body(cls, body: bytes) -> Forget:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) == 4, "bad forget record")
        target, mode, requested_round, reason = obj
        _check(isinstance(target, bytes) and len(target) == PUBLIC_KEY_BYTES, "bad forget target")
        _check(isinstance(mode, str) and mode in {m.value for m in ForgetMode},
               f"unknown forget mode {mode!r}")
        try:
            return cls(target, ForgetMode(mode), requested_round, reason)
        except ValueError as exc:
            raise MalformedMessageError(f"bad forget record: {exc}") from exc


def make_forget(identity: Identity, federation_id: bytes, forget: Forget, now_ms: int,
                seq: int) -> Envelope:
    """``forget`` signed by ``identity`` (the requester) for ``federation_id``."""
    return seal(identity, kind=FORGET, federation_id=federation_id, seq=seq, timestamp_ms=now_ms,
                body=forget.to_body())


def open_forget(data: bytes, federation_id: bytes) -> tuple[Forget, Envelope]:
    """Verify a forget envelope (signature, federation, kind) and decode its record.

    Forget requests are long-lived (stored and re-gossiped), so their timestamp is not checked
    against the clock.  Who may ask is checked by :meth:`ForgetBook.add`.
    """
    env = open_envelope(data, federation_id=federation_id, now_ms=0, max_skew_ms=NO_SKEW_LIMIT)
    _check(env.kind == FORGET, f"{env.kind!r} is not a forget record")
    return Forget.from_body(env.body), env


@dataclass(frozen=True)
class ForgetRequest:
    """An accepted request: the record, the envelope that carried it and its bytes."""

    forget: Forget
    envelope: Envelope
    raw: bytes

    @property
    def target(self) -> bytes:
        return self.forget.target

    @property
    def requester(self) -> bytes:
        return self.envelope.sender

    @property
    def rank(self) -> tuple[int, bytes]:
        """The smaller rank wins among requests for the same target."""
        return self.forget.requested_round, digest(self.raw)


def _header(raw: bytes) -> Any:
    """The unverified header of envelope bytes: [kind, federation, sender, ...]."""
    return unpackb(unpackb(raw)[1])


def is_forget_record(raw: bytes) -> bool:
    """Does ``raw`` (envelope bytes, not yet verified) claim to be a forget record?"""
    try:
        return bool(_header(raw)[0] == FORGET)
    except (RemoteError, TypeError, IndexError, KeyError):
        return False


class ForgetBook:
    """The accepted forget requests of one federation, at most one per target (a CRDT)."""

    def __init__(self, federation_id: bytes) -> None:
        self.federation_id = federation_id
        self._by_target: dict[bytes, ForgetRequest] = {}

    def add_bytes(self, data: bytes, view: MembershipView) -> bool:
        """Like :meth:`add`, for envelope bytes (from gossip or storage)."""
        self._check_view(view)
        forget, env = open_forget(data, self.federation_id)
        return self._add(ForgetRequest(forget, env, data), view)

    def add(self, envelope: Envelope, view: MembershipView) -> bool:
        """Validate a request against ``view`` and keep it if it wins for its target.

        Returns True when the book changed: the request is now the one held for its target.
        An envelope already held, or one that loses to the request held for its target, returns
        False.  The envelope is re-verified from its bytes, so a hand-built one cannot slip in.
        Raises a :class:`~gossip.errors.RemoteError` when the request is forged, tampered, for
        another federation, malformed (:class:`MalformedMessageError`), asked by someone other
        than the target or an admin (:class:`UnauthorizedError`), or names a key that never
        joined (:class:`NotAMemberError`).
        """
        return self.add_bytes(envelope.to_bytes(), view)

    def _check_view(self, view: MembershipView) -> None:
        if view.federation_id != self.federation_id:
            raise LocalError("the membership view belongs to another federation than the book")

    def _add(self, request: ForgetRequest, view: MembershipView) -> bool:
        held = self._by_target.get(request.target)
        if held is not None and held.raw == request.raw:
            return False
        self._authorise(request, view)
        if held is not None and held.rank <= request.rank:
            return False
        self._by_target[request.target] = request
        return True

    @staticmethod
    def _authorise(request: ForgetRequest, view: MembershipView) -> None:
        target, requester = request.target, request.requester
        target_id = peer_id_from_public_key(target)
        if requester != target and not view.is_admin(requester):
            raise UnauthorizedError(
                f"only the member itself or an admin may ask to forget {target_id}",
                peer=peer_id_from_public_key(requester),
            )
        if not view.has_joined(target):
            raise NotAMemberError(
                f"{target_id} has never been a member of this federation; nothing to forget",
                peer=peer_id_from_public_key(requester),
            )

    # ---------------------------------------------------------------------- reading
    def get(self, target: bytes) -> ForgetRequest | None:
        return self._by_target.get(target)

    def requests(self) -> list[ForgetRequest]:
        """The accepted requests, sorted by target."""
        return [self._by_target[t] for t in sorted(self._by_target)]

    def records(self) -> frozenset[bytes]:
        """The envelope bytes of every accepted request (for gossip and the ledger)."""
        return frozenset(r.raw for r in self._by_target.values())

    def __len__(self) -> int:
        return len(self._by_target)


def book_from(federation_id: bytes, records: Iterable[bytes],
              view: MembershipView) -> ForgetBook:
    """A book holding ``records`` (each verified and validated; invalid ones raise)."""
    book = ForgetBook(federation_id)
    for raw in records:
        book.add_bytes(raw, view)
    return book
