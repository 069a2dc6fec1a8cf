"""Federation genesis and membership: a grow-only set of signed records (a CRDT).

* **genesis** — name, founders, admins, module catalog, round period, policies.  The federation
  id is the hash of its canonical encoding, so the genesis cannot change without changing the id.
* **invite** — signed by an admin: who may join (a key, or anyone holding the token), which
  modules they may hold, until when, and where to find the federation (bootstrap addresses).
* **join** — signed by the member: the invite it uses (none for founders), the modules it
  holds, its addresses and an epoch (a rejoin uses a higher epoch).
* **leave** — signed by the member itself, or by an admin for a revoked member.

Whether a record is valid depends only on the genesis and the record itself, never on which
other records arrived first, so views merged in any order are equal.  The members are derived
from the set: per member the highest-epoch join wins unless a leave has an equal or higher epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gossip.catalog import ComponentSpec
from gossip.envelope import Envelope, digest, open_envelope, packb, seal, unpackb
from gossip.errors import (
    MalformedMessageError,
    NotAMemberError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.identity import PUBLIC_KEY_BYTES, Identity, peer_id_from_public_key

GENESIS = "genesis"
INVITE = "invite"
JOIN = "join"
LEAVE = "leave"
MEMBERSHIP_KINDS = frozenset({GENESIS, INVITE, JOIN, LEAVE})
GENESIS_DOMAIN = b"p2pfed/v1/genesis\0"
#: membership records are long-lived: they are checked against the genesis, not the clock
NO_SKEW_LIMIT = 1 << 62
MAX_RECORDS = 100_000
MAX_ADDRESSES = 16
MAX_NAME_CHARS = 128

Policy = str | int | float | bool


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise MalformedMessageError(message)


def _strs(value: Any, what: str, limit: int = 256) -> tuple[str, ...]:
    _check(isinstance(value, list) and len(value) <= limit, f"{what} must be a list")
    _check(all(isinstance(x, str) and len(x) <= 512 for x in value), f"{what} must be strings")
    return tuple(value)


def _keys(value: Any, what: str) -> tuple[bytes, ...]:
    _check(isinstance(value, list) and len(value) <= 1024, f"{what} must be a list")
    _check(all(isinstance(x, bytes) and len(x) == PUBLIC_KEY_BYTES for x in value),
           f"{what} must be ed25519 public keys")
    return tuple(value)


@dataclass(frozen=True)
class Genesis:
    name: str
    founders: tuple[bytes, ...]
    catalog: tuple[ComponentSpec, ...]
    round_period_ms: int
    created_ms: int
    admins: tuple[bytes, ...] = ()
    policies: tuple[tuple[str, Policy], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "founders", tuple(sorted(set(self.founders))))
        object.__setattr__(self, "admins", tuple(sorted(set(self.admins or self.founders))))
        object.__setattr__(self, "catalog", tuple(sorted(self.catalog)))
        object.__setattr__(self, "policies", tuple(sorted(self.policies)))
        if not self.name or len(self.name) > MAX_NAME_CHARS:
            raise ValueError("federation name must be 1..128 characters")
        if not self.founders:
            raise ValueError("a federation needs at least one founder")
        if len({s.name for s in self.catalog}) != len(self.catalog):
            raise ValueError("component names in the catalog must be unique")
        if self.round_period_ms <= 0:
            raise ValueError("round period must be positive")

    def to_bytes(self) -> bytes:
        return packb([
            1, self.name, list(self.founders), list(self.admins),
            [s.to_record() for s in self.catalog], self.round_period_ms, self.created_ms,
            [[k, v] for k, v in self.policies],
        ])

    @classmethod
    def from_bytes(cls, data: bytes) -> Genesis:
        obj = unpackb(data)
        _check(isinstance(obj, list) and len(obj) == 8 and obj[0] == 1, "bad genesis record")
        _, name, founders, admins, catalog, period, created, policies = obj
        _check(isinstance(name, str), "genesis name must be a string")
        _check(isinstance(catalog, list) and len(catalog) <= 1024, "bad catalog")
        _check(isinstance(period, int) and isinstance(created, int), "bad genesis times")
        _check(isinstance(policies, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], str | int | float | bool) for p in policies), "bad policies")
        try:
            genesis = cls(name, _keys(founders, "founders"),
                          tuple(ComponentSpec.from_record(r) for r in catalog), period, created,
                          _keys(admins, "admins"), tuple((k, v) for k, v in policies))
        except ValueError as exc:
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
        _check(isinstance(expires, int) and isinstance(nonce, bytes) and len(nonce) <= 64,
               "bad invite fields")
        return cls(invitee, _strs(modules, "modules"), expires,
                   _strs(bootstrap, "bootstrap", MAX_ADDRESSES), nonce)


@dataclass(frozen=True)
class Join:
    invite: bytes  # the invite envelope; b"" for founders
    modules: tuple[str, ...]
    addresses: tuple[str, ...]
    epoch: int

    def to_body(self) -> bytes:
        return packb([self.invite, list(self.modules), list(self.addresses), self.epoch])

    @classmethod
    def from_body(cls, body: bytes) -> Join:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) == 4, "bad join")
        invite, modules, addresses, epoch = obj
        _check(isinstance(invite, bytes) and isinstance(epoch, int) and epoch >= 0,
               "bad join fields")
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
        _check(isinstance(epoch, int) and epoch >= 0 and isinstance(reason, str)
               and len(reason) <= 1024, "bad leave fields")
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
def _seal(identity: Identity, genesis_or_id: bytes, kind: str, body: bytes, now_ms: int,
          seq: int) -> Envelope:
    return seal(identity, kind=kind, federation_id=genesis_or_id, seq=seq, timestamp_ms=now_ms,
                body=body)


def make_genesis_envelope(identity: Identity, genesis: Genesis, now_ms: int,
                          seq: int) -> Envelope:
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
@dataclass
class _Parsed:
    env: Envelope
    raw: bytes
    record: Join | Leave


@dataclass
class MembershipView:
    """The set of valid membership records of one federation, and what follows from it."""

    genesis: Genesis
    _records: dict[bytes, _Parsed] = field(default_factory=dict)

    @property
    def federation_id(self) -> bytes:
        return self.genesis.federation_id

    def open(self, data: bytes) -> Envelope:
        """Verify a membership envelope's signature and federation (not its validity)."""
        return open_envelope(data, federation_id=self.federation_id, now_ms=0,
                             max_skew_ms=NO_SKEW_LIMIT)

    def add_bytes(self, data: bytes) -> bool:
        return self.add(self.open(data))

    def add(self, env: Envelope) -> bool:
        """Validate and add a verified record; True when it is new."""
        raw = env.to_bytes()
        key = digest(raw)
        if key in self._records:
            return False
        if env.federation_id != self.federation_id:
            raise WrongFederationError("record for another federation")
        record = self._validate(env)
        if len(self._records) >= MAX_RECORDS:
            raise UnauthorizedError("membership record limit reached")
        self._records[key] = _Parsed(env, raw, record)
        return True

    def _validate(self, env: Envelope) -> Join | Leave:
        sender = env.sender
        if env.kind == JOIN:
            join = Join.from_body(env.body)
            unknown = set(join.modules) - self.genesis.component_names
            if unknown:
                raise MalformedMessageError(f"modules not in the catalog: {sorted(unknown)}")
            if sender in self.genesis.founders and not join.invite:
                return join
            if not join.invite:
                raise NotAMemberError("a join by a non-founder needs an invite")
            self._check_invite(join, env)
            return join
        if env.kind == LEAVE:
            leave = Leave.from_body(env.body)
            if leave.member != sender and sender not in self.genesis.admins:
                raise UnauthorizedError("only the member itself or an admin may end membership")
            return leave
        raise MalformedMessageError(f"{env.kind!r} is not a membership record kind")

    def _check_invite(self, join: Join, env: Envelope) -> None:
        inv_env = open_envelope(join.invite, federation_id=self.federation_id, now_ms=0,
                                max_skew_ms=NO_SKEW_LIMIT)
        if inv_env.kind != INVITE:
            raise MalformedMessageError("the join's invite is not an invite record")
        if inv_env.sender not in self.genesis.admins:
            raise UnauthorizedError("the invite was not signed by an admin")
        invite = Invite.from_body(inv_env.body)
        if invite.invitee and invite.invitee != env.sender:
            raise UnauthorizedError("the invite was issued to someone else")
        if env.timestamp_ms > invite.expires_ms:
            raise UnauthorizedError("the invite had expired when the join was signed")
        if invite.modules and not set(join.modules) <= set(invite.modules):
            raise UnauthorizedError("the join holds modules the invite does not allow")

    def merge(self, other: MembershipView) -> None:
        """Add every record of ``other`` (re-validated; order does not matter)."""
        for parsed in other._records.values():
            self.add(parsed.env)

    def records(self) -> frozenset[bytes]:
        return frozenset(p.raw for p in self._records.values())

    def digest(self) -> bytes:
        return digest(packb(sorted(self._records)))

    def __len__(self) -> int:
        return len(self._records)

    # ---------------------------------------------------------------------- derived
    def members(self) -> dict[bytes, MemberInfo]:
        # per member the join with the highest epoch; ties go to the smaller record bytes
        best: dict[bytes, tuple[int, bytes, Join]] = {}
        left: dict[bytes, int] = {}
        for p in self._records.values():
            if isinstance(p.record, Join):
                cur = best.get(p.env.sender)
                cand = (-p.record.epoch, p.raw, p.record)
                if cur is None or cand[:2] < cur[:2]:
                    best[p.env.sender] = cand
            else:
                left[p.record.member] = max(left.get(p.record.member, -1), p.record.epoch)
        return {
            pk: MemberInfo(pk, frozenset(join.modules), join.addresses, -neg_epoch,
                           pk in self.genesis.admins)
            for pk, (neg_epoch, _raw, join) in sorted(best.items())
            if -neg_epoch > left.get(pk, -1)
        }

    def is_member(self, public_key: bytes) -> bool:
        return public_key in self.members()

    def holders(self, component: str) -> list[bytes]:
        return sorted(pk for pk, m in self.members().items() if component in m.modules)

    def latest_epoch(self, public_key: bytes) -> int:
        """The highest epoch used by ``public_key`` in a join or leave (-1 when none)."""
        epochs = [p.record.epoch for p in self._records.values()
                  if (isinstance(p.record, Join) and p.env.sender == public_key)
                  or (isinstance(p.record, Leave) and p.record.member == public_key)]
        return max(epochs, default=-1)


def view_from(genesis: Genesis, records: Iterable[bytes]) -> MembershipView:
    view = MembershipView(genesis)
    for raw in records:
        view.add_bytes(raw)
    return view
