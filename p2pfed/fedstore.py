"""A node's federation state in its home, and the operations of the lifecycle CLI.

``<home>/federation/genesis.bin`` holds the signed genesis; membership records live in the
ledger (entry kind ``membership``); ``<home>/federation/bootstrap.txt`` lists the addresses an
invite gave.  Invite tokens are ``p2pfed1.`` followed by base64url of
``msgpack([genesis envelope, invite envelope, ticket seed])``: everything a newcomer needs.  The
ticket seed is the private half of the invite's one-time key: whoever holds the token can prove
it, and nobody who only saw the invite inside a gossiped join can.  Treat a token as a password.
A newcomer's join is kept in the ledger (``join-request``) until a member admits it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fcntl
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer, open_envelope, packb, unpackb
from gossip.errors import ConfigError, LocalError, MalformedMessageError, RemoteError
from gossip.identity import Identity, public_key_from_peer_id
from gossip.membership import (
    INVITE,
    Genesis,
    Invite,
    Join,
    MembershipView,
    make_genesis_envelope,
    make_invite,
    make_join,
    open_genesis,
    proof_message,
)
from gossip.records import MAX_USES, Policy
from p2pfed import kinds
from p2pfed.journal import JoinRequest, Membership, read, stored, write
from p2pfed.ledger import Ledger

log = logging.getLogger(__name__)

MEMBERSHIP_ENTRY = kinds.MEMBERSHIP
JOIN_REQUEST_ENTRY = kinds.JOIN_REQUEST

TOKEN_PREFIX = "p2pfed1."
FED_DIR = "federation"
GENESIS_FILE = "genesis.bin"
BOOTSTRAP_FILE = "bootstrap.txt"
BOOT_EPOCH_FILE = "boot-epoch"
MAX_TOKEN_CHARS = 200_000


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def next_boot_epoch(home: Path) -> int:
    """Increment and persist the boot epoch (keeps sequence numbers rising across restarts).

    Serialised by a lock file of its own: the daemon's start, ``invite`` and ``join`` all draw
    one, and ``invite`` runs beside the daemon (two at once must not draw the same epoch).
    """
    path = home / BOOT_EPOCH_FILE
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / f".{BOOT_EPOCH_FILE}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a rename: a moment
        try:
            current = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            current = 0
        except ValueError as exc:
            raise LocalError(f"{path} is corrupt; it should hold one integer") from exc
        _write_atomic(path, f"{current + 1}\n".encode())
        return current + 1
    finally:
        os.close(fd)


@dataclass
class FederationStore:
    home: Path

    @property
    def directory(self) -> Path:
        return self.home / FED_DIR

    def exists(self) -> bool:
        return (self.directory / GENESIS_FILE).exists()

    def genesis_envelope(self) -> bytes:
        path = self.directory / GENESIS_FILE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"{self.home} is not in a federation: run 'p2pfed federation create NAME' or "
                "'p2pfed join TOKEN'"
            ) from None

    def genesis(self) -> Genesis:
        try:
            return open_genesis(self.genesis_envelope())[0]
        except RemoteError as exc:
            raise LocalError(f"{self.directory / GENESIS_FILE} is corrupt: {exc}") from exc

    def bootstrap(self) -> list[str]:
        path = self.directory / BOOTSTRAP_FILE
        if not path.exists():
            return []
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def view(self, ledger: Ledger) -> MembershipView:
        view = MembershipView(self.genesis())
        for entry in read(ledger.entries(Membership.KIND), Membership):
            try:
                view.add_bytes(entry.record.record)
            except RemoteError as exc:
                log.warning("ignoring an invalid membership record in the ledger: %s", exc)
        return view

    def _store_genesis(self, data: bytes) -> None:
        if self.exists():
            raise LocalError(f"{self.home} already belongs to a federation")
        _write_atomic(self.directory / GENESIS_FILE, data)


def create_federation(
    home: Path, identity: Identity, ledger: Ledger, *, name: str, catalog: list[str],
    modules: list[str], addresses: list[str], round_period_ms: int, now_ms: int,
    policies: tuple[tuple[str, Policy], ...] = (),
) -> Genesis:
    """Found a federation with this node as founder and admin, and record its own join.
    ``policies``: signed into the genesis (the text model members must share, for one:
    :func:`p2pfed.model.agreement.genesis_policies`)."""
    store = FederationStore(home)
    try:
        specs = tuple(ComponentSpec.from_name(c) for c in sorted(set(catalog)))
        genesis = Genesis(name, (identity.public_key,), specs, round_period_ms, now_ms,
                          policies=policies)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    missing = set(modules) - genesis.component_names
    if missing:
        raise ConfigError(f"this node holds {sorted(missing)}, which are not in the catalog")
    seq = Sequencer(next_boot_epoch(home))
    store._store_genesis(make_genesis_envelope(identity, genesis, now_ms, seq.next()).to_bytes())
    join = make_join(identity, genesis.federation_id,
                     Join(b"", tuple(sorted(modules)), tuple(addresses), 0), now_ms, seq.next())
    MembershipView(genesis).add(join)
    write(ledger, Membership(join.to_bytes()), now_ms, durable=True)
    return genesis


def make_invite_token(
    home: Path, identity: Identity, *, invitee: str | None, modules: list[str],
    ttl_ms: int, bootstrap: list[str], now_ms: int, uses: int = 1,
) -> str:
    """A signed invite for one peer id (``invitee``) or, without one, for whoever holds the
    token, at most ``uses`` times (each use admits one more member)."""
    store = FederationStore(home)
    genesis = store.genesis()
    if identity.public_key not in genesis.admins:
        raise LocalError("only an admin of the federation can invite")
    unknown = set(modules) - genesis.component_names
    if unknown:
        raise ConfigError(f"modules not in the catalog: {sorted(unknown)}")
    try:
        invitee_key = public_key_from_peer_id(invitee) if invitee else b""
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not bootstrap:
        raise ConfigError("an invite needs at least one bootstrap address (--bootstrap)")
    if not 1 <= uses <= MAX_USES:
        raise ConfigError(f"--uses must be between 1 and {MAX_USES}")
    if invitee_key and uses != 1:
        raise ConfigError("an invite for one peer id admits that peer only: leave out --uses")
    if ttl_ms <= 0:
        raise ConfigError("the invite's lifetime must be positive")
    ticket = Identity.generate()
    invite = Invite(invitee_key, tuple(sorted(modules)), now_ms + ttl_ms, tuple(bootstrap),
                    secrets.token_bytes(16), ticket.public_key, uses)
    seq = Sequencer(next_boot_epoch(home))
    env = make_invite(identity, genesis.federation_id, invite, now_ms, seq.next())
    raw = packb([store.genesis_envelope(), env.to_bytes(), ticket.seed])
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class ParsedInvite:
    genesis: Genesis
    genesis_envelope: bytes
    invite: Invite
    invite_envelope: bytes
    ticket_seed: bytes
    #: set by :func:`join_federation` when it had nothing to do: why ("already a member of")
    already: str | None = None


class InviteError(ConfigError):
    """An invite token that cannot be used: damaged, forged, expired, or for another peer."""

    code = "bad-invite"


def parse_invite_token(token: str) -> ParsedInvite:
    """Decode and verify an invite token (signatures, admin, federation, ticket); not its
    expiry.  Whitespace anywhere in it (an e-mail client's line breaks) is ignored."""
    token = "".join(token.split())
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
        raise InviteError(f"not a p2pfed invite token (it should start with {TOKEN_PREFIX})")
    body = token[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        parts = unpackb(raw, max_bytes=len(raw))
    except (binascii.Error, ValueError, MalformedMessageError) as exc:
        raise InviteError(f"the invite token is damaged: {exc}") from exc
    if not isinstance(parts, list) or len(parts) != 3 or not all(
            isinstance(p, bytes) for p in parts):
        raise InviteError("the invite token is damaged (or made by an older p2pfed: ask for a "
                          "new one)")
    try:
        genesis, _ = open_genesis(parts[0])
        env = open_envelope(parts[1], federation_id=genesis.federation_id, now_ms=0,
                            max_skew_ms=1 << 62)
        if env.kind != INVITE or env.sender not in genesis.admins:
            raise InviteError("the invite is not signed by an admin of the federation")
        invite = Invite.from_body(env.body)
    except RemoteError as exc:
        raise InviteError(f"the invite token does not verify: {exc}") from exc
    if invite.ticket:
        try:
            ticket = Identity.from_seed(parts[2])
        except (ValueError, TypeError) as exc:
            raise InviteError("the invite token's ticket is damaged") from exc
        if ticket.public_key != invite.ticket:
            raise InviteError("the invite token's ticket does not match its invite")
    return ParsedInvite(genesis, parts[0], invite, parts[1], parts[2])


def pending_join(ledger: Ledger, view: MembershipView, me: bytes) -> Join | None:
    """Our join request in the ledger (the newest) while no membership record about us has
    overtaken it (an admission, or a leave since); None when there is none."""
    entry = ledger.last(JoinRequest.KIND)
    if entry is None:
        return None
    try:
        join = Join.from_body(view.open(stored(entry, JoinRequest).record.record).body)
    except RemoteError:
        return None
    return join if join.epoch > view.latest_epoch(me) else None


def usable_invite(token: str, identity: Identity, now_ms: int) -> ParsedInvite:
    """The invite ``token`` holds if ``identity`` may use it now (:class:`InviteError`
    otherwise): what a newcomer can check before it writes anything."""
    parsed = parse_invite_token(token)
    if parsed.invite.invitee and parsed.invite.invitee != identity.public_key:
        raise InviteError("this invite was issued to another peer id")
    if now_ms > parsed.invite.expires_ms:
        raise InviteError("this invite has expired; ask for a new one")
    return parsed


def join_federation(
    home: Path, identity: Identity, ledger: Ledger, token: str, *, modules: list[str],
    addresses: list[str], now_ms: int,
) -> ParsedInvite:
    """Join with an invite token: store the genesis, the bootstrap list and our join record."""
    parsed = usable_invite(token, identity, now_ms)
    inv = parsed.invite
    fid = parsed.genesis.federation_id
    epoch = 0
    store = FederationStore(home)
    rejoining = store.exists()
    if rejoining:
        if store.genesis().federation_id != fid:
            raise LocalError(f"{home} already belongs to another federation")
        view = store.view(ledger)
        if view.is_member(identity.public_key):
            return dataclasses.replace(parsed, already="already a member of")
        waiting = pending_join(ledger, view, identity.public_key)
        if waiting is not None and waiting.invite == parsed.invite_envelope:
            # (a request with another invite is replaced: say, the first one expired)
            return dataclasses.replace(
                parsed, already="already asked (start the daemon: a member admits it) to join")
        epoch = view.latest_epoch(identity.public_key) + 1
    seq = Sequencer(next_boot_epoch(home))
    proof = b""
    if inv.ticket:
        ticket = Identity.from_seed(parsed.ticket_seed)
        proof = ticket.sign(proof_message(fid, identity.public_key, parsed.invite_envelope))
    record = Join(parsed.invite_envelope, tuple(sorted(modules)), tuple(addresses), epoch, proof)
    join = make_join(identity, fid, record, now_ms, seq.next())
    try:
        MembershipView(parsed.genesis).check_join(record, identity.public_key)
    except RemoteError as exc:
        raise LocalError(f"the federation would refuse this join: {exc}") from exc
    if not rejoining:
        store._store_genesis(parsed.genesis_envelope)
    # a member admits it when the daemon first reaches one (see gossip.admission)
    write(ledger, JoinRequest(join.to_bytes()), now_ms, durable=True)
    _write_atomic(store.directory / BOOTSTRAP_FILE,
                  ("\n".join(inv.bootstrap) + "\n").encode())
    return parsed
