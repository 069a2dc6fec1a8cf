"""The signed membership records of a federation, and how each is made and checked alone.

* **genesis** — name, founders, admins, module catalog, round period, policies.  The federation
  id is the hash of its canonical encoding, so the genesis cannot change without changing the id.
* **invite** — signed by an admin: who may join (a key, or whoever holds the token), which
  modules they may hold, until when, how many members may join with it (``uses``), where to find
  the federation (bootstrap addresses), and a one-time *ticket* public key whose private half
  travels only inside the token.
* **join** — signed by the joiner: the invite it uses (none for founders), a *proof* (the
  ticket key's signature over the federation, the joiner's key and the invite, so an invite seen
  inside a gossiped join is worth nothing to anyone else), the modules it holds, its addresses
  and an epoch (a rejoin uses a higher epoch).
* **admit** — signed by a member (the *sponsor*) that received the join live: the join, and the
  sponsor's own time, against which the invite's expiry and its uses are counted (the joiner can
  backdate its join, not the admission).
* **leave** — signed by the member itself, or by an admin for a member it revokes.

:mod:`gossip.membership` derives the members from a set of these records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gossip.catalog import ComponentSpec
from gossip.envelope import Envelope, digest, open_envelope, packb, seal, unpackb
from gossip.errors import MalformedMessageError, UnauthorizedError, WrongFederationError
from gossip.identity import PUBLIC_KEY_BYTES, Identity, peer_id_from_public_key, verify_signature

GENESIS = "genesis"
INVITE = "invite"
JOIN = "join"
ADMIT = "admit"
LEAVE = "leave"
MEMBERSHIP_KINDS = frozenset({GENESIS, INVITE, JOIN, ADMIT, LEAVE})
GENESIS_DOMAIN = b"p2pfed/v1/genesis\0"
PROOF_DOMAIN = b"p2pfed/v1/invite-proof\0"
#: membership records are long-lived: they are checked against the genesis, not the clock
NO_SKEW_LIMIT = 1 << 62
MAX_ADDRESSES = 16
MAX_NAME_CHARS = 128
MAX_POLICIES = 256
#: the most members one invite may admit
MAX_USES = 10_000
SIGNATURE_BYTES = 64

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
    invitee: bytes  # b"" for a bearer invite: whoever holds the token (and its ticket) may use it
    modules: tuple[str, ...]  # () = any module of the catalog
    expires_ms: int
    bootstrap: tuple[str, ...]
    nonce: bytes
    #: one-time public key; the token carries its private half, and a join must be signed by it
    ticket: bytes = b""
    #: how many distinct members may join with this invite (first admitted first served)
    uses: int = 1

    def to_body(self) -> bytes:
        fields: list[Any] = [self.invitee, list(self.modules), self.expires_ms,
                             list(self.bootstrap), self.nonce]
        if self.ticket or self.uses != 1:
            fields += [self.ticket, self.uses]
        return packb(fields)

    @classmethod
    def from_body(cls, body: bytes) -> Invite:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) in (5, 7), "bad invite")
        invitee, modules, expires, bootstrap, nonce = obj[:5]
        ticket, uses = obj[5:] if len(obj) == 7 else (b"", 1)
        _check(isinstance(invitee, bytes) and len(invitee) in (0, PUBLIC_KEY_BYTES), "bad invitee")
        _check(_is_int(expires) and isinstance(nonce, bytes) and len(nonce) <= 64,
               "bad invite fields")
        _check(isinstance(ticket, bytes) and len(ticket) in (0, PUBLIC_KEY_BYTES), "bad ticket")
        _check(_is_int(uses) and 1 <= uses <= MAX_USES, f"uses must be 1..{MAX_USES}")
        _check(bool(invitee or ticket), "a bearer invite needs a ticket key")
        return cls(invitee, _strs(modules, "modules"), expires,
                   _strs(bootstrap, "bootstrap", MAX_ADDRESSES), nonce, ticket, uses)


@dataclass(frozen=True)
class Join:
    invite: bytes  # the invite envelope; b"" for founders
    modules: tuple[str, ...]
    addresses: tuple[str, ...]  # multiaddrs
    epoch: int
    #: the invite's ticket key signing :func:`proof_message` (b"" for founders and for
    #: key-bound invites without a ticket)
    proof: bytes = b""

    def to_body(self) -> bytes:
        fields: list[Any] = [self.invite, list(self.modules), list(self.addresses), self.epoch]
        if self.proof:
            fields.append(self.proof)
        return packb(fields)

    @classmethod
    def from_body(cls, body: bytes) -> Join:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) in (4, 5), "bad join")
        invite, modules, addresses, epoch = obj[:4]
        proof = obj[4] if len(obj) == 5 else b""
        _check(isinstance(invite, bytes) and _is_int(epoch) and epoch >= 0, "bad join fields")
        _check(isinstance(proof, bytes) and len(proof) in (0, SIGNATURE_BYTES)
               and (len(obj) == 4 or bool(proof)), "bad join proof")
        return cls(invite, _strs(modules, "modules"), _strs(addresses, "addresses", MAX_ADDRESSES),
                   epoch, proof)


def proof_message(federation_id: bytes, joiner: bytes, invite_envelope: bytes) -> bytes:
    """What the invite's ticket key signs: this federation, this joiner, this invite."""
    return PROOF_DOMAIN + federation_id + joiner + digest(invite_envelope)


@dataclass(frozen=True)
class Admission:
    """A sponsor's statement that it received ``join`` live (at the envelope's timestamp)."""

    join: bytes  # the join envelope

    def to_body(self) -> bytes:
        return packb([self.join])

    @classmethod
    def from_body(cls, body: bytes) -> Admission:
        obj = unpackb(body)
        _check(isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], bytes),
               "bad admission")
        return cls(obj[0])


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


def make_admit(identity: Identity, federation_id: bytes, join: bytes, now_ms: int,
               seq: int) -> Envelope:
    """The sponsor's admission of ``join`` (envelope bytes), stamped with the sponsor's time."""
    return _seal(identity, federation_id, ADMIT, Admission(join).to_body(), now_ms, seq)


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


@dataclass(frozen=True)
class CheckedInvite:
    """An invite found valid for one join: when it was signed, its id, how many it admits."""

    signed_ms: int
    invite_id: bytes  # digest of the invite envelope
    uses: int
    expires_ms: int


def check_invite(genesis: Genesis, join: Join, joiner: bytes) -> CheckedInvite:
    """Check the invite ``join`` carries, and its proof, against ``genesis`` (not its expiry:
    that is counted against the admission time, see :mod:`gossip.membership`)."""
    fid = genesis.federation_id
    inv_env = open_envelope(join.invite, federation_id=fid, now_ms=0, max_skew_ms=NO_SKEW_LIMIT)
    if inv_env.kind != INVITE:
        raise MalformedMessageError("the join's invite is not an invite record")
    if inv_env.sender not in genesis.admins:
        raise UnauthorizedError("the invite was not signed by an admin")
    invite = Invite.from_body(inv_env.body)
    unknown = set(invite.modules) - genesis.component_names
    if unknown:
        raise MalformedMessageError(f"the invite allows modules not in the catalog: "
                                    f"{sorted(unknown)}")
    if invite.invitee and invite.invitee != joiner:
        raise UnauthorizedError("the invite was issued to someone else")
    if invite.ticket and not verify_signature(
            invite.ticket, proof_message(fid, joiner, join.invite), join.proof):
        raise UnauthorizedError("the join does not prove possession of the invite's ticket "
                                "(an invite seen in someone else's join cannot be reused)")
    if invite.modules and not set(join.modules) <= set(invite.modules):
        raise UnauthorizedError("the join holds modules the invite does not allow")
    return CheckedInvite(inv_env.timestamp_ms, digest(join.invite), invite.uses,
                         invite.expires_ms)
