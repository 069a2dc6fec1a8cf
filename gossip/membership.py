"""Federation genesis and membership: a grow-only set of signed records (a CRDT).

* **genesis** — name, founders, admins, module catalog, round period, policies.  The federation
  id is the hash of its canonical encoding, so the genesis cannot change without changing the id.
* **invite** — signed by an admin: who may join (a key, or anyone holding the token), which
  modules they may hold, until when, and where to find the federation (bootstrap addresses).
* **join** — signed by the member: the invite it uses (none for founders), the modules it
  holds, its addresses and an epoch (a rejoin uses a higher epoch).
* **leave** — signed by the member itself, or by an admin for a member it revokes.

Whether a join is valid depends only on the genesis and the record itself, never on which other
records arrived first.  A self-signed leave must end a membership that exists: until a join by
its member is in the view it is held back (not in :meth:`MembershipView.records`, not counted in
the digest) and it enters the view as soon as that join arrives, so outsiders cannot fill the
set with leaves while views merged in any order still end up equal.

The members are derived from the set alone (:meth:`MembershipView.members`):

* per member, the join with the highest epoch wins (ties: the smaller envelope bytes);
* a leave at epoch ``e`` removes the member unless a join has an epoch above ``e`` (a join and a
  leave at the same epoch: the leave wins);
* an admin's revocation also voids every join whose invite was signed before the revocation, so
  a revoked member cannot come back with its old invite, only with a fresh one.

Known limit: an invite's expiry is checked against the join's own signed timestamp (there is no
trusted clock), so the holder of an expired invite can backdate a join.  Key-bound invites limit
this to the invitee, who was allowed to join anyway; keep bearer invites short-lived and few.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gossip.catalog import ComponentSpec
from gossip.envelope import (
    DEFAULT_MAX_SKEW_MS,
    Envelope,
    digest,
    open_envelope,
    packb,
    seal,
    unpackb,
)
from gossip.errors import (
    ClockSkewError,
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.identity import PUBLIC_KEY_BYTES, Identity, peer_id_from_public_key

log = logging.getLogger(__name__)

GENESIS = "genesis"
INVITE = "invite"
JOIN = "join"
LEAVE = "leave"
MEMBERSHIP_KINDS = frozenset({GENESIS, INVITE, JOIN, LEAVE})
GENESIS_DOMAIN = b"p2pfed/v1/genesis\0"
#: membership records are long-lived: they are checked against the genesis, not the clock
NO_SKEW_LIMIT = 1 << 62
#: a live record (``add(..., now_ms=...)``) may be at most this far in the future
MAX_FUTURE_MS = DEFAULT_MAX_SKEW_MS
MAX_RECORDS = 100_000
MAX_PENDING_LEAVES = 1024
MAX_ADDRESSES = 16
MAX_NAME_CHARS = 128
MAX_POLICIES = 256

Policy = str | int | float | bool


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise MalformedMessageError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strs(value: Any, what: str, limit: int = 256) -> tuple[str, ...]:
    _check(isinstance(value, list) and len(value) <= limit, f"{what} must be a list")
    _check(all(isinstance(x, str) and len(x) <= 512 for x in value), f"{what} must be strings")
    return tuple(value)


def _keys(value: Any, what: str) -> tuple[bytes, ...]:
    _check(isinstance(value, list) and len(value) <= 1024, f"{what} must be a list")
    _check(all(isinstance(x, bytes) and len(x) == PUBLIC_KEY_BYTES for x in value),
           f"{what} must be ed25519 public keys")
    return tuple(value)


def _policy_ok(key: Any, value: Any) -> bool:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_NAME_CHARS:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 1024
    return isinstance(value, int)  # bool is an int


# ------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Genesis:
    """The founding record.  Fields are normalised (sorted, de-duplicated) on construction."""

    name: str
    founders: tuple[bytes, ...]
    catalog: tuple[ComponentSpec, ...]
    round_period_ms: int
    created_ms: int
    admins: tuple[bytes, ...] = ()  # () = the founders
    policies: tuple[tuple[str, Policy], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "founders", tuple(sorted(set(self.founders))))
        object.__setattr__(self, "admins", tuple(sorted(set(self.admins or self.founders))))
        object.__setattr__(self, "catalog", tuple(sorted(self.catalog, key=lambda s: s.name)))
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_CHARS:
            raise ValueError(f"federation name must be 1..{MAX_NAME_CHARS} characters")
        if not self.founders:
            raise ValueError("a federation needs at least one founder")
        if not all(isinstance(k, bytes) and len(k) == PUBLIC_KEY_BYTES
                   for k in self.founders + self.admins):
            raise ValueError("founders and admins must be ed25519 public keys")
        if len({s.name for s in self.catalog}) != len(self.catalog):
            raise ValueError("component names in the catalog must be unique")
        if not _is_int(self.round_period_ms) or self.round_period_ms <= 0:
            raise ValueError("round period must be a positive integer")
        if not _is_int(self.created_ms) or self.created_ms < 0:
            raise ValueError("creation time must be a non-negative integer")
        if len(self.policies) > MAX_POLICIES or not all(
                isinstance(p, tuple) and len(p) == 2 and _policy_ok(*p) for p in self.policies):
            raise ValueError("policies must be (name, str | int | float | bool) pairs")
        if len({k for k, _ in self.policies}) != len(self.policies):
            raise ValueError("policy names must be unique")
        object.__setattr__(self, "policies", tuple(sorted(self.policies, key=lambda p: p[0])))

    def to_bytes(self) -> bytes:
        return packb([
            1, self.name, list(self.founders), list(self.admins),
            [s.to_record() for s in self.catalog], self.round_period_ms, self.created_ms,
            [[k, v] for k, v in self.policies],
        ])

    @classmethod
    def from_bytes(cls, data: bytes) -> Genesis:
        """Decode and validate; only the canonical encoding is accepted."""
        obj = unpackb(data)
        _check(isinstance(obj, list) and len(obj) == 8 and obj[0] == 1, "bad genesis record")
        _, name, founders, admins, catalog, period, created, policies = obj
        _check(isinstance(catalog, list) and len(catalog) <= 1024, "bad catalog")
        _check(isinstance(policies, list) and len(policies) <= MAX_POLICIES
               and all(isinstance(p, list) and len(p) == 2 for p in policies), "bad policies")
        specs = tuple(ComponentSpec.from_record(r) for r in catalog)
        try:
            genesis = cls(name, _keys(founders, "founders"), specs, period, created,
                          _keys(admins, "admins"), tuple((k, v) for k, v in policies))
        except (ValueError, TypeError) as exc:
            raise MalformedMessageError(f"bad genesis: {exc}") from exc
        _check(genesis.to_bytes() == data, "genesis is not in canonical form")
        return genesis

    @property
    def federation_id(self) -> bytes:
        return digest(GENESIS_DOMAIN + self.to_bytes())

    def spec(self, component: str) -> ComponentSpec | None:
        return next((s for s in self.catalog if s.name == component), None)

    @property
    def component_names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.catalog)

    def policy(self, key: str, default: Policy | None = None) -> Policy | None:
        return next((v for k, v in self.policies if k == key), default)


@dataclass(frozen=True)
class Invite:
    invitee: bytes  # b"" for a bearer invite anyone holding the token may use
    modules: tuple[str, ...]  # () = any module of the catalog
    expires_ms: int
    bootstrap: tuple[str, ...]
    nonce: bytes

    def to_body(self) -> bytes:
        return packb([self.invitee, list(self.modules), self.expires_ms, list(self.bootstrap),
                      self.nonce])

    @classmethod
    def from_body(cls, body: bytes) -> Invite:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) == 5, "bad invite")
        invitee, modules, expires, bootstrap, nonce = obj
        _check(isinstance(invitee, bytes) and len(invitee) in (0, PUBLIC_KEY_BYTES), "bad invitee")
        _check(_is_int(expires) and isinstance(nonce, bytes) and len(nonce) <= 64,
               "bad invite fields")
        return cls(invitee, _strs(modules, "modules"), expires,
                   _strs(bootstrap, "bootstrap", MAX_ADDRESSES), nonce)


@dataclass(frozen=True)
class Join:
    invite: bytes  # the invite envelope; b"" for founders
    modules: tuple[str, ...]
    addresses: tuple[str, ...]  # multiaddrs
    epoch: int

    def to_body(self) -> bytes:
        return packb([self.invite, list(self.modules), list(self.addresses), self.epoch])

    @classmethod
    def from_body(cls, body: bytes) -> Join:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) == 4, "bad join")
        invite, modules, addresses, epoch = obj
        _check(isinstance(invite, bytes) and _is_int(epoch) and epoch >= 0, "bad join fields")
        return cls(invite, _strs(modules, "modules"), _strs(addresses, "addresses", MAX_ADDRESSES),
                   epoch)


@dataclass(frozen=True)
class Leave:
    member: bytes  # whose membership ends (the signer, or a member an admin revokes)
    epoch: int
    reason: str

    def to_body(self) -> bytes:
        return packb([self.member, self.epoch, self.reason])

    @classmethod
    def from_body(cls, body: bytes) -> Leave:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) == 3, "bad leave")
        member, epoch, reason = obj
        _check(isinstance(member, bytes) and len(member) == PUBLIC_KEY_BYTES, "bad leave member")
        _check(_is_int(epoch) and epoch >= 0 and isinstance(reason, str) and len(reason) <= 1024,
               "bad leave fields")
        return cls(member, epoch, reason)


@dataclass(frozen=True)
class MemberInfo:
    public_key: bytes
    modules: frozenset[str]
    addresses: tuple[str, ...]
    epoch: int
    admin: bool

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)


# ------------------------------------------------------------------------------ record making
def _seal(identity: Identity, federation_id: bytes, kind: str, body: bytes, now_ms: int,
          seq: int) -> Envelope:
    return seal(identity, kind=kind, federation_id=federation_id, seq=seq, timestamp_ms=now_ms,
                body=body)


def make_genesis_envelope(identity: Identity, genesis: Genesis, now_ms: int,
                          seq: int) -> Envelope:
    """The genesis signed by a founder; its federation id is the genesis' own."""
    return _seal(identity, genesis.federation_id, GENESIS, genesis.to_bytes(), now_ms, seq)


def make_invite(identity: Identity, federation_id: bytes, invite: Invite, now_ms: int,
                seq: int) -> Envelope:
    return _seal(identity, federation_id, INVITE, invite.to_body(), now_ms, seq)


def make_join(identity: Identity, federation_id: bytes, join: Join, now_ms: int,
              seq: int) -> Envelope:
    return _seal(identity, federation_id, JOIN, join.to_body(), now_ms, seq)


def make_leave(identity: Identity, federation_id: bytes, leave: Leave, now_ms: int,
               seq: int) -> Envelope:
    return _seal(identity, federation_id, LEAVE, leave.to_body(), now_ms, seq)


def open_genesis(data: bytes) -> tuple[Genesis, Envelope]:
    """Verify a genesis envelope: signed by a founder, for its own federation id."""
    env = open_envelope(data, federation_id=None, now_ms=0, max_skew_ms=NO_SKEW_LIMIT)
    _check(env.kind == GENESIS, "not a genesis record")
    genesis = Genesis.from_bytes(env.body)
    if env.federation_id != genesis.federation_id:
        raise WrongFederationError("genesis envelope names another federation id")
    if env.sender not in genesis.founders:
        raise UnauthorizedError("genesis must be signed by a founder")
    return genesis, env


# ------------------------------------------------------------------------------ the view
@dataclass(frozen=True)
class _Parsed:
    env: Envelope
    raw: bytes
    record: Join | Leave
    invite_ms: int | None = None  # a join's invite signing time (None: a founder's join)


class MembershipView:
    """The set of valid membership records of one federation, and what follows from it."""

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.federation_id = genesis.federation_id
        self._records: dict[bytes, _Parsed] = {}  # digest(raw) -> record
        self._pending: dict[bytes, _Parsed] = {}  # self-leaves waiting for their join
        self._joined: set[bytes] = set()  # keys with at least one join in the view
        self._members: dict[bytes, MemberInfo] | None = None
        self._digest: bytes | None = None

    # ---------------------------------------------------------------------- adding
    def open(self, data: bytes) -> Envelope:
        """Verify a membership envelope's signature and federation (not its validity)."""
        return open_envelope(data, federation_id=self.federation_id, now_ms=0,
                             max_skew_ms=NO_SKEW_LIMIT)

    def add_bytes(self, data: bytes, *, now_ms: int | None = None) -> bool:
        return self._add(self.open(data), data, now_ms)

    def add(self, envelope: Envelope, *, now_ms: int | None = None) -> bool:
        """Validate and add a record; True when it is new to the view.

        The envelope is re-verified from its bytes, so a hand-built one cannot slip in.
        ``now_ms``, given for records arriving live, refuses timestamps more than
        :data:`MAX_FUTURE_MS` ahead (:class:`ClockSkewError`); leave it out when re-reading
        stored records.  A self-signed leave whose member has no join here yet is held back and
        returns False; it joins the view when that join arrives.
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
        parsed = self._validate(env, raw)
        if len(self._records) >= MAX_RECORDS:
            raise UnauthorizedError("membership record limit reached")
        if isinstance(parsed.record, Leave) and not self._anchored(env.sender, parsed.record):
            if len(self._pending) >= MAX_PENDING_LEAVES:
                raise NotAMemberError("a leave by a key that has not joined")
            self._pending[key] = parsed
            return False
        self._insert(key, parsed)
        if isinstance(parsed.record, Join) and self._pending:
            ready = [k for k, p in self._pending.items()
                     if isinstance(p.record, Leave) and p.record.member == env.sender]
            for k in ready:
                self._insert(k, self._pending.pop(k))
        return True

    def _insert(self, key: bytes, parsed: _Parsed) -> None:
        self._records[key] = parsed
        if isinstance(parsed.record, Join):
            self._joined.add(parsed.env.sender)
        self._members = None
        self._digest = None

    def _anchored(self, signer: bytes, leave: Leave) -> bool:
        """A leave may enter the view: an admin's, a founder's, or one ending a known join."""
        return (signer in self.genesis.admins or leave.member in self.genesis.founders
                or leave.member in self._joined)

    def _check_genesis(self, env: Envelope) -> None:
        _check(env.body == self.genesis.to_bytes(), "a different genesis for this federation")
        if env.sender not in self.genesis.founders:
            raise UnauthorizedError("genesis must be signed by a founder")

    def _validate(self, env: Envelope, raw: bytes) -> _Parsed:
        sender = env.sender
        if env.kind == JOIN:
            join = Join.from_body(env.body)
            self._check_modules(join.modules, "the join holds")
            if not join.invite:
                if sender not in self.genesis.founders:
                    raise NotAMemberError("a join by a non-founder needs an invite")
                return _Parsed(env, raw, join)
            return _Parsed(env, raw, join, self._check_invite(join, env))
        if env.kind == LEAVE:
            leave = Leave.from_body(env.body)
            if leave.member != sender and sender not in self.genesis.admins:
                raise UnauthorizedError("only the member itself or an admin may end membership")
            return _Parsed(env, raw, leave)
        if env.kind == INVITE:
            raise MalformedMessageError("an invite is not a view record; it travels in a join")
        raise MalformedMessageError(f"{env.kind!r} is not a membership record kind")

    def _check_modules(self, modules: Iterable[str], what: str) -> None:
        unknown = set(modules) - self.genesis.component_names
        if unknown:
            raise MalformedMessageError(f"{what} modules not in the catalog: {sorted(unknown)}")

    def _check_invite(self, join: Join, env: Envelope) -> int:
        """Check the invite a join carries; returns the invite's signing time."""
        inv_env = self.open(join.invite)
        if inv_env.kind != INVITE:
            raise MalformedMessageError("the join's invite is not an invite record")
        if inv_env.sender not in self.genesis.admins:
            raise UnauthorizedError("the invite was not signed by an admin")
        invite = Invite.from_body(inv_env.body)
        self._check_modules(invite.modules, "the invite allows")
        if invite.invitee and invite.invitee != env.sender:
            raise UnauthorizedError("the invite was issued to someone else")
        if env.timestamp_ms > invite.expires_ms:
            raise UnauthorizedError("the invite had expired when the join was signed")
        if invite.modules and not set(join.modules) <= set(invite.modules):
            raise UnauthorizedError("the join holds modules the invite does not allow")
        return inv_env.timestamp_ms

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
        """The envelope bytes of every record in the view (for anti-entropy sync)."""
        return frozenset(p.raw for p in self._records.values())

    def pending(self) -> frozenset[bytes]:
        """Leaves held back until their member's join arrives (not part of the view)."""
        return frozenset(p.raw for p in self._pending.values())

    def digest(self) -> bytes:
        """A digest of the record set: equal views have equal digests."""
        if self._digest is None:
            self._digest = digest(packb(sorted(self._records)))
        return self._digest

    def __len__(self) -> int:
        return len(self._records)

    # ---------------------------------------------------------------------- derived
    def members(self) -> dict[bytes, MemberInfo]:
        """The current members, computed from the record set only (see the module doc)."""
        if self._members is None:
            self._members = self._derive()
        return dict(self._members)

    def _derive(self) -> dict[bytes, MemberInfo]:
        left: dict[bytes, int] = {}
        revoked: dict[bytes, list[tuple[int, int]]] = {}  # member -> [(epoch, signed at)]
        for p in self._records.values():
            if isinstance(p.record, Leave):
                member = p.record.member
                left[member] = max(left.get(member, -1), p.record.epoch)
                if p.env.sender != member:
                    revoked.setdefault(member, []).append((p.record.epoch, p.env.timestamp_ms))
        best: dict[bytes, tuple[int, bytes, Join]] = {}  # member -> (-epoch, raw, join)
        for p in self._records.values():
            if not isinstance(p.record, Join):
                continue
            pk, epoch, since = p.env.sender, p.record.epoch, p.invite_ms
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

    @property
    def admins(self) -> tuple[bytes, ...]:
        """The admins named by the genesis (whether or not they have joined)."""
        return self.genesis.admins

    def is_admin(self, public_key: bytes) -> bool:
        return public_key in self.genesis.admins

    def holders(self, component: str) -> list[bytes]:
        """The members holding ``component``, sorted."""
        return sorted(pk for pk, m in self.members().items() if component in m.modules)

    def latest_epoch(self, public_key: bytes) -> int:
        """The highest epoch used by ``public_key`` in a join or leave (-1 when none)."""
        epochs = [p.record.epoch for p in self._records.values()
                  if (isinstance(p.record, Join) and p.env.sender == public_key)
                  or (isinstance(p.record, Leave) and p.record.member == public_key)]
        return max(epochs, default=-1)


def view_from(genesis: Genesis, records: Iterable[bytes]) -> MembershipView:
    """A view holding ``records`` (each verified and validated; invalid ones raise)."""
    view = MembershipView(genesis)
    for raw in records:
        view.add_bytes(raw)
    return view
