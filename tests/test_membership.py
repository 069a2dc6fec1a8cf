"""Membership: signed records validated against the genesis; any merge order, same view."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.catalog import ComponentSpec
from gossip.envelope import Envelope
from gossip.errors import (
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.identity import Identity
from gossip.membership import (
    Genesis,
    Invite,
    Join,
    Leave,
    MembershipView,
    make_genesis_envelope,
    make_invite,
    make_join,
    make_leave,
    open_genesis,
)

CATALOG = tuple(ComponentSpec.from_name(n) for n in ("backbone", "head.topic", "encoder.image"))
FOUNDER = Identity.from_seed(b"f" * 32)
OTHERS = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 7)]
GENESIS = Genesis("edu", (FOUNDER.public_key,), CATALOG, 5000, 1)
FED = GENESIS.federation_id


def invite(by: Identity = FOUNDER, to: Identity | None = None, modules: tuple[str, ...] = (),
           expires: int = 10_000, fed: bytes = FED) -> bytes:
    inv = Invite(to.public_key if to else b"", modules, expires, ("/ip4/127.0.0.1/tcp/1",),
                 b"n" * 16)
    return make_invite(by, fed, inv, 100, 1).to_bytes()


def join(who: Identity, inv: bytes, modules: tuple[str, ...] = ("backbone",), epoch: int = 0,
         at: int = 200) -> Envelope:
    return make_join(who, FED, Join(inv, modules, ("/ip4/127.0.0.1/tcp/2",), epoch), at, 2)


def leave(who: Identity, member: Identity | None = None, epoch: int = 0) -> Envelope:
    target = (member or who).public_key
    return make_leave(who, FED, Leave(target, epoch, "bye"), 300, 3)


def test_genesis_round_trip_and_id() -> None:
    again = Genesis.from_bytes(GENESIS.to_bytes())
    assert again == GENESIS and again.federation_id == FED
    env = make_genesis_envelope(FOUNDER, GENESIS, 1, 1)
    assert open_genesis(env.to_bytes())[0] == GENESIS
    with pytest.raises(UnauthorizedError):
        open_genesis(make_genesis_envelope(OTHERS[0], GENESIS, 1, 1).to_bytes())
    renamed = Genesis("edu2", GENESIS.founders, CATALOG, 5000, 1)
    assert renamed.federation_id != FED


def test_founder_and_invited_members() -> None:
    view = MembershipView(GENESIS)
    assert view.add(join(FOUNDER, b"", ("backbone", "head.topic")))
    assert view.add(join(OTHERS[0], invite(to=OTHERS[0]), ("head.topic",)))
    assert not view.add(join(OTHERS[0], invite(to=OTHERS[0]), ("head.topic",)))  # duplicate
    members = view.members()
    assert set(members) == {FOUNDER.public_key, OTHERS[0].public_key}
    assert members[FOUNDER.public_key].admin and not members[OTHERS[0].public_key].admin
    assert view.holders("head.topic") == sorted([FOUNDER.public_key, OTHERS[0].public_key])
    assert view.holders("backbone") == [FOUNDER.public_key]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (lambda: join(OTHERS[0], b""), NotAMemberError),
        (lambda: join(OTHERS[0], invite(by=OTHERS[1])), UnauthorizedError),
        (lambda: join(OTHERS[0], invite(expires=150)), UnauthorizedError),
        (lambda: join(OTHERS[0], invite(to=OTHERS[1])), UnauthorizedError),
        (lambda: join(OTHERS[0], invite(fed=b"x" * 32)), WrongFederationError),
        (lambda: join(OTHERS[0], invite(modules=("head.topic",)), ("backbone",)),
         UnauthorizedError),
        (lambda: join(OTHERS[0], invite(), ("head.unknown",)), MalformedMessageError),
        (lambda: leave(OTHERS[0], member=FOUNDER), UnauthorizedError),
        (lambda: make_join(OTHERS[0], b"y" * 32, Join(b"", (), (), 0), 1, 1),
         WrongFederationError),
    ],
)
def test_invalid_records_are_refused(record: object, error: type[RemoteError]) -> None:
    view = MembershipView(GENESIS)
    with pytest.raises(error):
        view.add(record())  # type: ignore[operator]
    assert len(view) == 0


def test_leave_rejoin_and_revocation() -> None:
    view = MembershipView(GENESIS)
    a = OTHERS[0]
    view.add(join(a, invite()))
    view.add(leave(a, epoch=0))
    assert not view.is_member(a.public_key)
    view.add(join(a, invite(), epoch=1))
    assert view.is_member(a.public_key) and view.latest_epoch(a.public_key) == 1
    view.add(leave(FOUNDER, member=a, epoch=1))  # an admin revokes a
    assert not view.is_member(a.public_key)


def test_bytes_round_trip_through_open() -> None:
    view = MembershipView(GENESIS)
    env = join(OTHERS[2], invite())
    assert view.add_bytes(env.to_bytes())
    assert view.records() == {env.to_bytes()}


# A fixed pool of records (valid and invalid) that hypothesis picks from and permutes.
def _pool() -> list[Envelope]:
    a, b, c = OTHERS[0], OTHERS[1], OTHERS[2]
    return [
        join(FOUNDER, b"", ("backbone",)),
        join(a, invite(to=a)), join(a, invite(), ("head.topic",), epoch=2), leave(a, epoch=1),
        join(b, invite(), epoch=0), join(b, invite(), ("encoder.image",), epoch=0, at=201),
        leave(b, epoch=0), join(b, invite(), epoch=1),
        join(c, invite(by=b)), leave(FOUNDER, member=c, epoch=3), join(c, invite(), epoch=3),
        join(c, invite(expires=1)),
    ]


POOL = _pool()


def _build(order: list[int]) -> MembershipView:
    view = MembershipView(GENESIS)
    for i in order:
        with contextlib.suppress(RemoteError):
            view.add(POOL[i])
    return view


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(len(POOL))), st.integers(0, len(POOL)), st.booleans())
def test_merge_is_order_independent(order: list[int], split: int, left_first: bool) -> None:
    reference = _build(list(range(len(POOL))))
    one, two = _build(order[:split]), _build(order[split:])
    first, second = (one, two) if left_first else (two, one)
    first.merge(second)
    assert first.members() == reference.members()
    assert first.digest() == reference.digest()
    assert _build(order).members() == reference.members()


def test_reference_view_is_what_the_rules_say() -> None:
    members = _build(list(range(len(POOL)))).members()
    a, b, c = (o.public_key for o in OTHERS[:3])
    assert members[a].modules == {"head.topic"} and members[a].epoch == 2
    assert members[b].epoch == 1
    assert c not in members  # an invite from a non-admin, and a revocation at epoch 3 ties
