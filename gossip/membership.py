"""Federation membership: a grow-only set of signed records (a CRDT) and the members it implies.

The records themselves (genesis, invite, join, admit, leave) and how each is checked alone live
in :mod:`gossip.records`.  Whether a record may enter the view depends only on the genesis and
the record itself, plus, for records that need one, an *anchor* already in the view:

* a self-signed leave needs a join by its member;
* an admission needs its sponsor to be a founder, an admin, or a key admitted before.

Records of the federation's task catalogue (``task-add``, ``task-retire``, ``task-data``,
signed by an admin) need no anchor but the genesis: they are kept in a
:class:`~gossip.taskcat.TaskBook`, travel with the membership records (:meth:`records`) and
give :meth:`MembershipView.task_catalogue`; they do not bear on who the members are, only on
what they hold (a new task's head: :meth:`MembershipView.holdings`).

A record without its anchor is held back (not in :meth:`MembershipView.records`, not counted in
the digest) and enters the view as soon as the anchor arrives, so outsiders cannot fill the set
while views merged in any order still end up equal.

An invited member enters only through an **admission**: a member that received the join live
signs it with its own time.  The members are derived from the set alone
(:meth:`MembershipView.members`):

* admissions are taken in order of their sponsor's time (ties: the smaller envelope bytes); one
  counts when its sponsor is a founder or an admin, or was itself admitted no later, and was not
  revoked by then; the invite had not expired at that time; and the invite still has a use left
  (``uses`` distinct members: first admitted, first served; the same member rejoining with the
  same invite uses no second slot).  This order is a property of the set, so every view agrees
  on who won a single-use invite, whatever order the records arrived in;
* per member, the join with the highest epoch wins (ties: the smaller record bytes);
* a leave at epoch ``e`` removes the member unless a join has an epoch above ``e`` (a join and a
  leave at the same epoch: the leave wins);
* an admin's revocation also voids every join whose invite was signed before the revocation, so
  a revoked member cannot come back with its old invite, only with a fresh one.

Trust: the joiner cannot backdate its admission, but a member can (it signs the time).  A member
is trusted to stamp admissions honestly; it cannot admit anyone without a valid invite and the
proof of its ticket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gossip.envelope import DEFAULT_MAX_SKEW_MS, Envelope, digest, open_envelope, packb
from gossip.errors import (
    ClockSkewError,
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.records import (
    ADMIT,
    GENESIS,
    GENESIS_DOMAIN,
    INVITE,
    JOIN,
    LEAVE,
    MAX_ADDRESSES,
    MAX_NAME_CHARS,
    MAX_POLICIES,
    MEMBERSHIP_KINDS,
    NO_SKEW_LIMIT,
    Admission,
    CheckedInvite,
    Genesis,
    Invite,
    Join,
    Leave,
    MemberInfo,
    Policy,
    _check,
    check_invite,
    make_admit,
    make_genesis_envelope,
    make_invite,
    make_join,
    make_leave,
    open_genesis,
    proof_message,
)
from gossip.taskcat import TASK_KINDS, TaskBook, TaskCatalogue, creations, held_with, holdings

__all__ = [
    "ADMIT", "GENESIS", "GENESIS_DOMAIN", "INVITE", "JOIN", "LEAVE", "MAX_ADDRESSES",
    "MAX_FUTURE_MS", "MAX_NAME_CHARS", "MAX_PENDING", "MAX_POLICIES", "MAX_RECORDS",
    "MEMBERSHIP_KINDS", "NO_SKEW_LIMIT", "Admission", "Genesis", "Invite", "Join", "Leave",
    "MemberInfo", "MembershipView", "Policy", "make_admit", "make_genesis_envelope",
    "make_invite", "make_join", "make_leave", "open_genesis", "proof_message", "view_from",
]

log = logging.getLogger(__name__)

#: a live record (``add(..., now_ms=...)``) may be at most this far in the future
MAX_FUTURE_MS = DEFAULT_MAX_SKEW_MS
MAX_RECORDS = 100_000
#: records held back for their anchor (leaves before their join, admissions before their
#: sponsor's)
MAX_PENDING = 1024
#: the most records :meth:`MembershipView.credentials` gives (a chain of sponsors), and their
#: bytes together (they open every bundle, which must fit one envelope)
MAX_CREDENTIALS = 16
MAX_CREDENTIAL_BYTES = 24 * 1024
#: an admitted join: its modules and addresses, well under an envelope
MAX_JOIN_BYTES = 16 * 1024


@dataclass(frozen=True)
class _Parsed:
    env: Envelope  # the record's own envelope (the admission's, for an invited join)
    raw: bytes
    record: Join | Leave
    member: bytes  # whose membership the record is about
    invite_ms: int | None = None  # when the invite was signed (None: a founder's join)
    invite_id: bytes = b""
    uses: int = 0
    sponsor: bytes = b""  # who admitted the join (b"": a founder's own join)
    admitted_ms: int = 0


class MembershipView:
    """The set of valid membership records of one federation, and what follows from it."""

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.federation_id = genesis.federation_id
        self._records: dict[bytes, _Parsed] = {}  # digest(raw) -> record
        self._pending: dict[bytes, _Parsed] = {}  # records waiting for their anchor
        self._joined: set[bytes] = set()  # keys with at least one join in the view
        self._members: dict[bytes, MemberInfo] | None = None
        self._counted: list[_Parsed] | None = None
        self._credentials: dict[bytes, list[bytes]] = {}
        self._digest: bytes | None = None
        self._tasks = TaskBook(genesis)

    @property
    def _trusted(self) -> frozenset[bytes]:
        """Keys that may sponsor without being admitted: the founders and the admins."""
        return frozenset(self.genesis.founders) | frozenset(self.genesis.admins)

    # ---------------------------------------------------------------------- adding
    def open(self, data: bytes) -> Envelope:
        """Verify a membership envelope's signature and federation (not its validity)."""
        return open_envelope(data, federation_id=self.federation_id, now_ms=0,
                             max_skew_ms=NO_SKEW_LIMIT)

    def add_bytes(self, data: bytes, *, now_ms: int | None = None) -> bool:
        if self.knows(data):  # known: no signature to check again
            return False
        return self._add(self.open(data), data, now_ms)

    def knows(self, raw: bytes) -> bool:
        """Is this record (envelope bytes) in the view or held back already?"""
        key = digest(raw)
        return key in self._records or key in self._pending or self._tasks.knows(key)

    def add(self, envelope: Envelope, *, now_ms: int | None = None) -> bool:
        """Validate and add a record; True when it is new to the view.

        The envelope is re-verified from its bytes, so a hand-built one cannot slip in.
        ``now_ms``, given for records arriving live, refuses timestamps more than
        :data:`MAX_FUTURE_MS` ahead (:class:`ClockSkewError`); leave it out when re-reading
        stored records.  A record whose anchor is not in the view yet is held back and returns
        False; it joins the view when the anchor arrives.
        """
        raw = envelope.to_bytes()
        return self._add(self.open(raw), raw, now_ms)

    def _add(self, env: Envelope, raw: bytes, now_ms: int | None) -> bool:
        key = digest(raw)
        if key in self._records or key in self._pending:
            return False
        if env.federation_id != self.federation_id:
            raise WrongFederationError("record for another federation")
        if now_ms is not None and env.timestamp_ms > now_ms + MAX_FUTURE_MS:
            raise ClockSkewError(f"record signed {env.timestamp_ms - now_ms} ms in the future")
        if env.kind == GENESIS:
            self._check_genesis(env)
            return False
        if env.kind in TASK_KINDS:
            added = self._tasks.add(env, raw)
            if added:
                self._digest = None
            return added
        parsed = self._validate(env, raw)
        if len(self._records) >= MAX_RECORDS:
            raise UnauthorizedError("membership record limit reached")
        if not self._anchored(parsed):
            if len(self._pending) >= MAX_PENDING:
                raise NotAMemberError("a record by or about a key that has not joined")
            self._pending[key] = parsed
            return False
        self._insert(key, parsed)
        return True

    def _insert(self, key: bytes, parsed: _Parsed) -> None:
        ready = [(key, parsed)]
        while ready:  # a join may anchor pending records, which may anchor more
            key, parsed = ready.pop()
            self._records[key] = parsed
            if isinstance(parsed.record, Join) and parsed.member not in self._joined:
                self._joined.add(parsed.member)
                found = [k for k, p in self._pending.items() if self._anchored(p)]
                ready += [(k, self._pending.pop(k)) for k in found]
        self._forget_derived()
        self._digest = None

    def _forget_derived(self) -> None:
        self._members = None
        self._counted = None
        self._credentials = {}

    def _anchored(self, parsed: _Parsed) -> bool:
        """May the record enter the view now (see the module doc)?"""
        genesis = self.genesis
        if isinstance(parsed.record, Leave):
            return (parsed.env.sender in genesis.admins or parsed.member in genesis.founders
                    or parsed.member in self._joined)
        if parsed.sponsor:
            return parsed.sponsor in self._trusted or parsed.sponsor in self._joined
        return True

    def _check_genesis(self, env: Envelope) -> None:
        _check(env.body == self.genesis.to_bytes(), "a different genesis for this federation")
        if env.sender not in self.genesis.founders:
            raise UnauthorizedError("genesis must be signed by a founder")

    def _validate(self, env: Envelope, raw: bytes) -> _Parsed:
        sender = env.sender
        if env.kind == JOIN:
            join = Join.from_body(env.body)
            self._check_modules(join.modules, "the join holds")
            if join.invite:
                raise NotAMemberError("an invited join enters only inside an admission by a "
                                      "member (send it to a member as a join request)")
            if sender not in self.genesis.founders:
                raise NotAMemberError("a join by a non-founder needs an invite")
            return _Parsed(env, raw, join, sender)
        if env.kind == ADMIT:
            return self._validate_admission(env, raw)
        if env.kind == LEAVE:
            leave = Leave.from_body(env.body)
            if leave.member != sender and sender not in self.genesis.admins:
                raise UnauthorizedError("only the member itself or an admin may end membership")
            return _Parsed(env, raw, leave, leave.member)
        if env.kind == INVITE:
            raise MalformedMessageError("an invite is not a view record; it travels in a join")
        raise MalformedMessageError(f"{env.kind!r} is not a membership record kind")

    def _validate_admission(self, env: Envelope, raw: bytes) -> _Parsed:
        admitted = Admission.from_body(env.body).join
        _check(len(admitted) <= MAX_JOIN_BYTES, f"a join is at most {MAX_JOIN_BYTES} bytes")
        join_env = self.open(admitted)
        _check(join_env.kind == JOIN, "an admission must hold a join record")
        join = Join.from_body(join_env.body)
        _check(bool(join.invite), "founders join without an admission")
        self._check_modules(join.modules, "the join holds")
        invite = self.check_join(join, join_env.sender)
        if env.timestamp_ms > invite.expires_ms:
            raise UnauthorizedError("the invite had expired when the join was admitted")
        return _Parsed(env, raw, join, join_env.sender, invite.signed_ms, invite.invite_id,
                       invite.uses, env.sender, env.timestamp_ms)

    def check_join(self, join: Join, joiner: bytes) -> CheckedInvite:
        """Check an invited join on its own: its invite, and the proof of the invite's ticket."""
        return check_invite(self.genesis, join, joiner)

    def _check_modules(self, modules: Iterable[str], what: str) -> None:
        unknown = set(modules) - self.genesis.component_names
        if unknown:
            raise MalformedMessageError(f"{what} modules not in the catalog: {sorted(unknown)}")

    def merge(self, other: MembershipView) -> None:
        """Add every record of ``other``, re-verified and re-validated (order does not matter).

        Records that fail are skipped and logged; views of another genesis are refused.
        """
        if other.genesis != self.genesis:
            raise WrongFederationError("cannot merge views of different federations")
        for raw in sorted(other.records()) + sorted(other.pending()):
            try:
                self.add_bytes(raw)
            except RemoteError as exc:
                log.warning("merge: skipping an invalid membership record: %s (%s)", exc,
                            exc.code)

    # ---------------------------------------------------------------------- the set
    def records(self) -> frozenset[bytes]:
        """The envelope bytes of every record in the view, the task catalogue's included (for
        anti-entropy sync)."""
        return frozenset(p.raw for p in self._records.values()) | self._tasks.records()

    def task_records(self) -> frozenset[bytes]:
        """The task catalogue's records (every member re-sends them: see FederatedNode)."""
        return self._tasks.records()

    def task_catalogue(self) -> TaskCatalogue:
        """The task catalogue the view's catalogue records imply (:mod:`gossip.taskcat`)."""
        return self._tasks.catalogue()

    def records_about(self, public_key: bytes) -> list[bytes]:
        """The records a member carries for itself: its joins, admissions, leaves, and the
        admissions it signed (sorted)."""
        return sorted(p.raw for p in self._records.values()
                      if public_key in (p.member, p.sponsor))

    def pending(self) -> frozenset[bytes]:
        """Records held back until their anchor arrives (not part of the view)."""
        return frozenset(p.raw for p in self._pending.values())

    def digest(self) -> bytes:
        """A digest of the record set: equal views have equal digests."""
        if self._digest is None:
            self._digest = digest(packb(sorted([*self._records, *self._tasks.keys()])))
        return self._digest

    def __len__(self) -> int:
        return len(self._records)

    # ---------------------------------------------------------------------- derived
    def members(self) -> dict[bytes, MemberInfo]:
        """The current members, computed from the record set only (see the module doc)."""
        if self._members is None:
            self._members = self._derive()
        return dict(self._members)

    def _revocations(self) -> tuple[dict[bytes, int], dict[bytes, list[tuple[int, int]]],
                                    dict[bytes, list[tuple[int, int]]]]:
        """Per member: the highest epoch it left at; the admins' revocations and every leave
        as (epoch, signed at)."""
        left: dict[bytes, int] = {}
        revoked: dict[bytes, list[tuple[int, int]]] = {}
        ended: dict[bytes, list[tuple[int, int]]] = {}
        for p in self._records.values():
            if isinstance(p.record, Leave):
                left[p.member] = max(left.get(p.member, -1), p.record.epoch)
                ended.setdefault(p.member, []).append((p.record.epoch, p.env.timestamp_ms))
                if p.env.sender != p.member:
                    revoked.setdefault(p.member, []).append((p.record.epoch, p.env.timestamp_ms))
        return left, revoked, ended

    def _admitted(self) -> list[_Parsed]:
        """The joins that count: founders' own, and admissions taken in their sponsors' time
        order (a sponsor admitted no later and not gone since, an invite with a use left)."""
        if self._counted is not None:
            return self._counted
        ended = self._revocations()[2]
        out = [p for p in self._records.values() if isinstance(p.record, Join) and not p.sponsor]
        trusted = self._trusted
        counted: dict[bytes, list[tuple[int, int]]] = {}  # member -> [(admitted at, epoch)]
        used: dict[bytes, set[bytes]] = {}  # invite id -> members it admitted
        admissions = [p for p in self._records.values() if p.sponsor]
        for p in sorted(admissions, key=lambda p: (p.admitted_ms, p.raw)):
            if p.sponsor not in trusted and not _active(counted.get(p.sponsor, []),
                                                        ended.get(p.sponsor, []), p.admitted_ms):
                continue
            slots = used.setdefault(p.invite_id, set())
            if p.member not in slots:
                if len(slots) >= p.uses:
                    continue
                slots.add(p.member)
            assert isinstance(p.record, Join)
            counted.setdefault(p.member, []).append((p.admitted_ms, p.record.epoch))
            out.append(p)
        self._counted = out
        return out

    def _derive(self) -> dict[bytes, MemberInfo]:
        left, revoked, _ = self._revocations()
        best: dict[bytes, tuple[int, bytes, Join]] = {}  # member -> (-epoch, raw, join)
        for p in self._admitted():
            assert isinstance(p.record, Join)
            pk, epoch, since = p.member, p.record.epoch, p.invite_ms
            if any(since is None or since <= at or epoch <= e for e, at in revoked.get(pk, ())):
                continue  # an invite from before a revocation cannot bring the member back
            cur = best.get(pk)
            if cur is None or (-epoch, p.raw) < cur[:2]:
                best[pk] = (-epoch, p.raw, p.record)
        out: dict[bytes, MemberInfo] = {}
        for pk in sorted(best):
            join = best[pk][2]
            if join.epoch > left.get(pk, -1):
                out[pk] = MemberInfo(pk, frozenset(join.modules), join.addresses, join.epoch,
                                     pk in self.genesis.admins)
        return out

    def is_member(self, public_key: bytes) -> bool:
        return public_key in self.members()

    def credentials(self, public_key: bytes) -> list[bytes]:
        """The records that show ``public_key`` is a member to a view that knows only the
        genesis: its current join (or admission), then its sponsor's first admission, and so on
        up to a founder or an admin (sponsors first; at most :data:`MAX_CREDENTIALS`)."""
        cached = self._credentials.get(public_key)
        if cached is not None:
            return list(cached)
        members = self.members()
        if public_key not in members:
            return []
        trusted = self._trusted
        first: dict[bytes, _Parsed] = {}
        best: _Parsed | None = None
        for p in self._admitted():
            first.setdefault(p.member, p)
            if p.member == public_key and isinstance(p.record, Join) and \
                    p.record.epoch == members[public_key].epoch and \
                    (best is None or p.raw < best.raw):
                best = p
        chain: list[bytes] = []
        step, size = best, 0
        while step is not None and len(chain) < MAX_CREDENTIALS:
            size += len(step.raw)
            if size > MAX_CREDENTIAL_BYTES:
                break  # a chain this long of joins this large: let the view's sync carry it
            chain.append(step.raw)
            if not step.sponsor or step.sponsor in trusted:
                break
            step = first.get(step.sponsor)
        self._credentials[public_key] = chain[::-1]
        return chain[::-1]

    def has_joined(self, public_key: bytes) -> bool:
        """True when a join by ``public_key`` is in the view (it is or may have been a member)."""
        return public_key in self._joined

    def ever_joined(self) -> frozenset[bytes]:
        """Every key with a join in the view."""
        return frozenset(self._joined)

    def would_admit(self, admission: Envelope) -> bool:
        """Would ``admission`` (not in the view) make its joiner a member now?  Every rule of
        the derivation applies (uses, revocations, epochs, the sponsor's standing); raises a
        :class:`~gossip.errors.RemoteError` when the admission is invalid on its own."""
        raw = admission.to_bytes()
        parsed = self._validate(self.open(raw), raw)
        key = digest(raw)
        if key in self._records:
            return parsed.member in self.members()
        self._records[key] = parsed
        self._forget_derived()
        try:
            return parsed.member in self._derive()
        finally:
            del self._records[key]
            self._forget_derived()

    @property
    def admins(self) -> tuple[bytes, ...]:
        """The admins named by the genesis (whether or not they have joined)."""
        return self.genesis.admins

    def is_admin(self, public_key: bytes) -> bool:
        return public_key in self.genesis.admins

    def holdings(self, public_key: bytes) -> frozenset[str]:
        """What a member holds: its record's modules and what the task catalogue creates for
        them (:func:`gossip.taskcat.holdings`); nothing for a non-member."""
        member = self.members().get(public_key)
        return frozenset() if member is None else holdings(
            self.task_catalogue(), member.modules, self.genesis.component_names)

    def holders(self, component: str) -> list[bytes]:
        """The members holding ``component`` (:meth:`holdings`), sorted."""
        created = creations(self.task_catalogue(), self.genesis.component_names)
        return sorted(pk for pk, m in self.members().items() if component in m.modules
                      or component in held_with(created, m.modules))

    def leaves_of(self, public_key: bytes) -> list[tuple[int, int, bytes]]:
        """The leave records about ``public_key``: (epoch, signed at, signer) each; the
        signer is the member itself, or an admin who revoked it."""
        return sorted((p.record.epoch, p.env.timestamp_ms, p.env.sender)
                      for p in self._records.values()
                      if isinstance(p.record, Leave) and p.member == public_key)

    def latest_epoch(self, public_key: bytes) -> int:
        """The highest epoch used by ``public_key`` in a join or leave (-1 when none)."""
        return max((p.record.epoch for p in self._records.values() if p.member == public_key),
                   default=-1)


def _active(admitted: list[tuple[int, int]], ended: list[tuple[int, int]], at: int) -> bool:
    """Was a sponsor a member at ``at``: admitted by then, and every leave it had by then
    (its own or a revocation) followed by an admission at a higher epoch, also by then."""
    joined = [(t, epoch) for t, epoch in admitted if t <= at]
    if not joined:
        return False
    return all(any(epoch > left for _, epoch in joined) for left, t in ended if t <= at)


def view_from(genesis: Genesis, records: Iterable[bytes]) -> MembershipView:
    """A view holding ``records`` (each verified and validated; invalid ones raise)."""
    view = MembershipView(genesis)
    for raw in records:
        view.add_bytes(raw)
    return view
