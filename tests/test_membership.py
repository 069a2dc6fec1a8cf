"""Membership: signed records validated against the genesis; any merge order, same view."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import membership
from gossip.catalog import ComponentSpec
from gossip.envelope import Envelope, packb, seal, unpackb
from gossip.errors import (
    ClockSkewError,
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
    TamperedMessageError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.identity import Identity
from gossip.membership import (
    Admission,
    Genesis,
    Invite,
    Join,
    Leave,
    MembershipView,
    make_admit,
    make_genesis_envelope,
    make_invite,
    make_join,
    make_leave,
    open_genesis,
    proof_message,
    view_from,
)

CATALOG = tuple(ComponentSpec.from_name(n) for n in ("backbone", "head.topic", "encoder.image"))
FOUNDER = Identity.from_seed(b"f" * 32)
ADMIN = Identity.from_seed(b"a" * 32)  # an admin who is not a founder
OTHERS = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 7)]
A, B, C, D, OUTSIDER, E = OTHERS
F1, F2, G1, G2 = (Identity.from_seed(bytes([0x40 + i]) * 32) for i in range(4))
GENESIS = Genesis("edu", (FOUNDER.public_key,), CATALOG, 5000, 1,
                  admins=(FOUNDER.public_key, ADMIN.public_key),
                  policies=(("max_rounds", 100), ("dp", True)))
FED = GENESIS.federation_id


TICKET = Identity.from_seed(b"t" * 32)  # the one-time key of the bearer invites below


def invite(by: Identity = FOUNDER, to: Identity | None = None, modules: tuple[str, ...] = (),
           expires: int = 10_000, fed: bytes = FED, at: int = 100, uses: int = 100,
           ticket: Identity | None = TICKET) -> bytes:
    """A bearer invite with a ticket (key-bound and ticketless with ``to``)."""
    inv = Invite(to.public_key if to else b"", modules, expires, ("/ip4/127.0.0.1/tcp/1",),
                 b"n" * 16, ticket.public_key if ticket and not to else b"", uses)
    return make_invite(by, fed, inv, at, 1).to_bytes()


def raw_join(who: Identity, inv: bytes, modules: tuple[str, ...] = ("backbone",), epoch: int = 0,
             at: int = 200, ticket: Identity | None = TICKET) -> Envelope:
    """The joiner's own record, with the proof of the ticket when the invite has one."""
    proof = b""
    if inv and ticket is not None:
        with contextlib.suppress(Exception):  # some tests hand in garbage as the invite
            if Invite.from_body(unpackb(inv)[2]).ticket:
                proof = ticket.sign(proof_message(FED, who.public_key, inv))
    return make_join(who, FED, Join(inv, modules, ("/ip4/127.0.0.1/tcp/2",), epoch, proof), at, 2)


def admit(record: Envelope, by: Identity = FOUNDER, at: int | None = None) -> Envelope:
    return make_admit(by, FED, record.to_bytes(), record.timestamp_ms if at is None else at, 5)


def join(who: Identity, inv: bytes, modules: tuple[str, ...] = ("backbone",), epoch: int = 0,
         at: int = 200, by: Identity = FOUNDER) -> Envelope:
    """A founder's own join (no invite), or an invited join admitted by ``by`` at ``at``."""
    record = raw_join(who, inv, modules, epoch, at)
    return admit(record, by, at) if inv else record


def join_of(record: Envelope) -> Join:
    if record.kind == "admit":
        return Join.from_body(unpackb(Admission.from_body(record.body).join)[2])
    return Join.from_body(record.body)


def leave(who: Identity, member: Identity | None = None, epoch: int = 0,
          at: int = 300) -> Envelope:
    target = (member or who).public_key
    return make_leave(who, FED, Leave(target, epoch, "bye"), at, 3)


# ------------------------------------------------------------------------------ genesis
def test_genesis_round_trip_and_id_stability() -> None:
    again = Genesis.from_bytes(GENESIS.to_bytes())
    assert again == GENESIS and again.federation_id == FED
    shuffled = Genesis("edu", (FOUNDER.public_key, FOUNDER.public_key), tuple(reversed(CATALOG)),
                       5000, 1, admins=(ADMIN.public_key, FOUNDER.public_key),
                       policies=(("dp", True), ("max_rounds", 100)))
    assert shuffled.to_bytes() == GENESIS.to_bytes() and shuffled.federation_id == FED
    assert [s.name for s in GENESIS.catalog] == sorted(s.name for s in CATALOG)
    assert GENESIS.policy("max_rounds") == 100 and GENESIS.policy("nope", 7) == 7
    assert Genesis("edu2", GENESIS.founders, CATALOG, 5000, 1).federation_id != FED
    # the admins default to the founders
    assert Genesis("x", (A.public_key, B.public_key), (), 10, 0).admins == tuple(
        sorted((A.public_key, B.public_key)))
    # pinned: a change here changes every federation id (a wire-format change)
    plain = Genesis("pinned", (b"\x01" * 32,), (ComponentSpec.from_name("backbone"),), 1000, 0)
    assert plain.federation_id.hex() == PINNED_ID


PINNED_ID = "fec0c22fc283c4ab04f29b1fb8a483845d178e11c44a467df9fa9e3150c10a54"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"founders": ()},
        {"founders": (b"short",)},
        {"catalog": (CATALOG[0], CATALOG[0])},
        {"round_period_ms": 0},
        {"round_period_ms": True},
        {"created_ms": -1},
        {"name": ""},
        {"policies": (("a", 1), ("a", "x"))},
        {"policies": (("a", float("nan")),)},
        {"policies": (("", 1),)},
    ],
)
def test_genesis_constructor_refuses(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "edu", "founders": (FOUNDER.public_key,),
                               "catalog": CATALOG, "round_period_ms": 5000, "created_ms": 1}
    with pytest.raises(ValueError):
        Genesis(**(args | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        packb([1, "edu"]),
        packb([2, "edu", [FOUNDER.public_key], [], [], 5000, 1, []]),
        packb([1, "edu", [FOUNDER.public_key], [FOUNDER.public_key], [], 5000, 1,
               [["a", 1], ["a", "x"]]]),
        packb([1, "edu", [FOUNDER.public_key], [FOUNDER.public_key], [], True, 1, []]),
        packb([1, 7, [FOUNDER.public_key], [FOUNDER.public_key], [], 5000, 1, []]),
        packb([1, "edu", [b"k"], [], [], 5000, 1, []]),
        packb([1, "edu", [FOUNDER.public_key], [FOUNDER.public_key], [["x"]], 5000, 1, []]),
        # not canonical: founders out of order
        packb([1, "edu", sorted([A.public_key, B.public_key], reverse=True),
               sorted([A.public_key, B.public_key]), [], 5000, 1, []]),
    ],
)
def test_genesis_from_bytes_refuses(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        Genesis.from_bytes(data)


def test_genesis_envelope() -> None:
    env = make_genesis_envelope(FOUNDER, GENESIS, 1, 1)
    assert env.federation_id == FED and env.kind == "genesis"
    genesis, opened = open_genesis(env.to_bytes())
    assert genesis == GENESIS and opened.sender == FOUNDER.public_key
    with pytest.raises(UnauthorizedError):
        open_genesis(make_genesis_envelope(ADMIN, GENESIS, 1, 1).to_bytes())  # admin, not founder
    other_fed = seal(FOUNDER, kind="genesis", federation_id=b"z" * 32, seq=1, timestamp_ms=1,
                     body=GENESIS.to_bytes())
    with pytest.raises(WrongFederationError):
        open_genesis(other_fed.to_bytes())
    with pytest.raises(MalformedMessageError):
        open_genesis(join(FOUNDER, b"").to_bytes())
    view = MembershipView(GENESIS)
    assert not view.add(env) and len(view) == 0  # known genesis: nothing to add
    fake = seal(FOUNDER, kind="genesis", federation_id=FED, seq=1, timestamp_ms=1,
                body=Genesis("evil", GENESIS.founders, CATALOG, 1, 1).to_bytes())
    with pytest.raises(MalformedMessageError):
        view.add(fake)


# ------------------------------------------------------------------------------ joins
def test_founder_and_invited_members() -> None:
    view = MembershipView(GENESIS)
    assert view.add(join(FOUNDER, b"", ("backbone", "head.topic")))
    assert view.add(join(A, invite(to=A), ("head.topic",)))
    assert not view.add(join(A, invite(to=A), ("head.topic",)))  # duplicate
    assert view.add(join(B, invite(by=ADMIN, modules=("encoder.image",)), ("encoder.image",)))
    members = view.members()
    assert set(members) == {FOUNDER.public_key, A.public_key, B.public_key}
    assert members[FOUNDER.public_key].admin and not members[A.public_key].admin
    assert members[A.public_key].peer_id == A.peer_id
    assert members[A.public_key].addresses == ("/ip4/127.0.0.1/tcp/2",)
    assert view.holders("head.topic") == sorted([FOUNDER.public_key, A.public_key])
    assert view.holders("backbone") == [FOUNDER.public_key]
    assert view.holders("prompt.none") == []
    assert view.is_member(B.public_key) and not view.is_member(C.public_key)
    assert view.admins == GENESIS.admins and view.is_admin(ADMIN.public_key)
    assert not view.is_admin(A.public_key)
    members.clear()  # a copy: the view is unaffected
    assert len(view.members()) == 3


def _wrap_join_as_invite() -> Envelope:
    return join(A, join(B, invite()).to_bytes())


def _tampered_inner_invite() -> Envelope:
    inner = make_invite(FOUNDER, FED, Invite(b"", (), 10_000, (), b"n", TICKET.public_key), 100, 1)
    bad = dataclasses.replace(inner, body=Invite(b"", (), 10**12, (), b"n",
                                                 TICKET.public_key).to_body())
    return join(A, bad.to_bytes())


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (lambda: join(A, b""), NotAMemberError),
        (lambda: join(A, invite(by=B)), UnauthorizedError),
        (lambda: join(A, invite(expires=150)), UnauthorizedError),
        (lambda: join(A, invite(to=B)), UnauthorizedError),
        (lambda: join(A, invite(fed=b"x" * 32)), WrongFederationError),
        (lambda: join(A, invite(modules=("head.topic",)), ("backbone",)), UnauthorizedError),
        (lambda: join(A, invite(), ("head.unknown",)), MalformedMessageError),
        (lambda: join(A, invite(modules=("head.unknown",)), ("head.unknown",)),
         MalformedMessageError),
        (lambda: join(A, invite(modules=("head.unknown", "backbone"))), MalformedMessageError),
        (lambda: join(A, b"garbage"), MalformedMessageError),
        (_wrap_join_as_invite, MalformedMessageError),
        (_tampered_inner_invite, TamperedMessageError),
        (lambda: leave(A, member=FOUNDER), UnauthorizedError),
        (lambda: make_join(A, b"y" * 32, Join(b"", (), (), 0), 1, 1), WrongFederationError),
        (lambda: make_invite(FOUNDER, FED, Invite(b"", (), 1, (), b""), 1, 1),
         MalformedMessageError),
        (lambda: seal(FOUNDER, kind="chat", federation_id=FED, seq=1, timestamp_ms=1, body=b""),
         MalformedMessageError),
        (lambda: seal(A, kind="join", federation_id=FED, seq=1, timestamp_ms=1,
                      body=packb([b"", [], [], True])), MalformedMessageError),
    ],
)
def test_invalid_records_are_refused(record: Callable[[], Envelope],
                                     error: type[RemoteError]) -> None:
    view = MembershipView(GENESIS)
    with pytest.raises(error):
        view.add(record())
    assert len(view) == 0 and not view.pending()


def test_expiry_is_checked_at_the_admission_time() -> None:
    view = MembershipView(GENESIS)
    assert view.add(join(A, invite(expires=500), at=500))
    with pytest.raises(UnauthorizedError):
        view.add(join(B, invite(expires=500), at=501))
    # a join backdated to before the expiry is refused when it is admitted after it
    backdated = raw_join(C, invite(expires=500), at=100)
    with pytest.raises(UnauthorizedError):
        view.add(admit(backdated, at=501))
    assert set(view.members()) == {A.public_key}


def test_hand_built_envelopes_are_reverified() -> None:
    real = join(A, invite())
    tampered = dataclasses.replace(real, body=Join(b"", ("backbone",), (), 0).to_body())
    impostor = dataclasses.replace(real, sender=B.public_key)
    view = MembershipView(GENESIS)
    with pytest.raises(TamperedMessageError):
        view.add(tampered)
    assert view.add(impostor)  # the signed header wins: this is A's real join
    assert set(view.members()) == {A.public_key}


def test_records_from_the_future_are_refused_live() -> None:
    view = MembershipView(GENESIS)
    late = join(A, invite(expires=10**7), at=1_000_000)
    with pytest.raises(ClockSkewError):
        view.add(late, now_ms=1_000_000 - membership.MAX_FUTURE_MS - 1)
    with pytest.raises(ClockSkewError):
        view.add_bytes(late.to_bytes(), now_ms=0)
    assert view.add(late, now_ms=1_000_000 - membership.MAX_FUTURE_MS)
    assert view.add(join(B, invite(), at=5), now_ms=10**9)  # old records are fine


# ------------------------------------------------------------------------------ leaves, epochs
def test_leave_and_rejoin() -> None:
    view = MembershipView(GENESIS)
    view.add(join(A, invite()))
    assert view.add(leave(A, epoch=0))
    assert not view.is_member(A.public_key) and view.latest_epoch(A.public_key) == 0
    view.add(join(A, invite(), ("head.topic",), epoch=1))
    assert view.members()[A.public_key].modules == {"head.topic"}
    assert view.latest_epoch(A.public_key) == 1
    view.add(join(A, invite(), ("encoder.image",), epoch=3))
    view.add(leave(A, epoch=2))  # an older leave does not end the newer join
    assert view.members()[A.public_key].epoch == 3
    assert view.latest_epoch(C.public_key) == -1


def test_ties() -> None:
    one, two = join(A, invite(), ("backbone",)), join(A, invite(), ("head.topic",), at=201)
    view = view_from(GENESIS, [one.to_bytes(), two.to_bytes()])
    winner = min(one, two, key=lambda e: e.to_bytes())
    assert view.members()[A.public_key].modules == set(join_of(winner).modules)
    view.add(leave(A, epoch=0))  # join and leave at the same epoch: the leave wins
    assert not view.is_member(A.public_key)


def test_a_leave_before_its_join_waits() -> None:
    view = MembershipView(GENESIS)
    early = leave(A, epoch=0)
    assert not view.add(early)  # held back: not in the view yet
    assert not view.add(early)
    assert view.pending() == {early.to_bytes()} and not view.records() and len(view) == 0
    empty_digest = view.digest()
    assert view.add(join(A, invite()))
    assert view.records() == {early.to_bytes(), join(A, invite()).to_bytes()}
    assert not view.pending() and not view.is_member(A.public_key)
    assert view.digest() != empty_digest
    # a founder's or an admin's leave needs no join to be accepted
    assert view.add(leave(FOUNDER))
    assert view.add(leave(ADMIN, member=C, epoch=4))


def test_outsiders_cannot_flood_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "MAX_PENDING", 2)
    view = MembershipView(GENESIS)
    view.add(leave(B))
    view.add(leave(C))
    with pytest.raises(NotAMemberError):
        view.add(leave(D))
    assert len(view) == 0 and len(view.pending()) == 2


def test_revocation_needs_a_fresh_invite() -> None:
    view = MembershipView(GENESIS)
    view.add(join(FOUNDER, b""))
    view.add(join(A, invite(at=100), epoch=0))
    view.add(leave(ADMIN, member=A, epoch=0, at=300))
    assert not view.is_member(A.public_key)
    view.add(join(A, invite(at=100), epoch=5, at=250))  # old invite, backdated, higher epoch
    assert not view.is_member(A.public_key)
    view.add(join(A, invite(to=A, at=400), epoch=1, at=450))  # a fresh invite
    assert view.members()[A.public_key].epoch == 1
    view.add(leave(FOUNDER, member=FOUNDER, epoch=0))
    assert not view.is_member(FOUNDER.public_key)
    view.add(join(FOUNDER, b"", epoch=1))  # a founder's own leave: it may come back
    assert view.is_member(FOUNDER.public_key)
    view.add(leave(ADMIN, member=FOUNDER, epoch=1, at=500))
    view.add(join(FOUNDER, b"", epoch=2))  # revoked: the genesis alone is not enough
    assert not view.is_member(FOUNDER.public_key)


# ------------------------------------------------------------------------------ sets and merges
def test_records_digest_and_merge() -> None:
    one, two = MembershipView(GENESIS), MembershipView(GENESIS)
    one.add(join(FOUNDER, b""))
    two.add(join(A, invite()))
    two.add(leave(B))  # pending in two
    assert one.digest() != two.digest()
    one.merge(two)
    assert one.pending() == two.pending()
    two.merge(one)
    two.merge(two)
    assert one.records() == two.records() and one.digest() == two.digest()
    assert view_from(GENESIS, one.records()).digest() == one.digest()
    other = MembershipView(Genesis("else", GENESIS.founders, CATALOG, 5000, 1))
    with pytest.raises(WrongFederationError):
        one.merge(other)


# A fixed pool of records (valid and invalid) that hypothesis picks from and permutes.
def _pool() -> list[Envelope]:
    f = FOUNDER
    return [
        join(f, b"", ("backbone",)),
        join(f, b"", ("backbone", "head.topic"), at=2),  # tie with the previous join
        join(A, invite(to=A)), leave(A, epoch=0), join(A, invite(), ("head.topic",), epoch=1),
        join(B, invite(), epoch=0), join(B, invite(), ("encoder.image",), epoch=0, at=201),
        leave(B, epoch=0), join(B, invite(), epoch=1), leave(B, epoch=1),  # leave wins the tie
        join(C, invite(by=B)),  # invalid: not an admin
        join(C, invite()), leave(f, member=C, epoch=0, at=300),  # revoked
        join(C, invite(at=100), epoch=1, at=350),  # voided: invite older than the revocation
        join(C, invite(at=400), epoch=2, at=500),  # a fresh invite
        leave(OUTSIDER),  # stays pending forever
        join(OUTSIDER, invite(expires=1)),  # invalid: expired
        join(D, invite(to=A)), join(D, invite(fed=b"o" * 32)),  # invalid
        join(D, invite(modules=("head.unknown",)), ("head.unknown",)),  # invalid
        make_invite(f, FED, Invite(b"", (), 1, (), b""), 1, 1),  # invalid: not a view record
        make_genesis_envelope(f, GENESIS, 1, 1),  # nothing to add
        join(D, invite(by=ADMIN), ("encoder.image",)),
        leave(ADMIN, member=B, epoch=5),
        # a single-use invite claimed twice: the earlier admission wins, whatever the order
        join(F1, invite(uses=1, at=110), at=600), join(F2, invite(uses=1, at=110), at=550),
        join(G1, invite(at=120), at=700, by=F2),  # sponsored by the winner: counts
        join(G2, invite(at=120), at=650, by=F1),  # sponsored by the loser: does not count
        join(E, invite(at=130), at=500, by=F2),  # sponsored before its sponsor was admitted
    ]


POOL = _pool()


def _build(indices: list[int]) -> MembershipView:
    view = MembershipView(GENESIS)
    for i in indices:
        with contextlib.suppress(RemoteError):
            view.add(POOL[i])
    return view


def test_reference_view_is_what_the_rules_say() -> None:
    view = _build(list(range(len(POOL))))
    members = view.members()
    assert set(members) == {FOUNDER.public_key, A.public_key, C.public_key, D.public_key,
                            F2.public_key, G1.public_key}
    winner = min(POOL[0], POOL[1], key=lambda e: e.to_bytes())
    assert members[FOUNDER.public_key].modules == set(join_of(winner).modules)
    assert members[A.public_key].modules == {"head.topic"} and members[A.public_key].epoch == 1
    assert members[C.public_key].epoch == 2
    assert members[D.public_key].modules == {"encoder.image"}
    assert view.pending() == {POOL[15].to_bytes()}
    assert len(view) == 21


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_any_order_and_any_merge_give_the_same_view(data: st.DataObject) -> None:
    n = len(POOL)
    chosen = data.draw(st.lists(st.integers(0, n - 1), unique=True), label="records in order")
    reference = _build(sorted(chosen))
    sequential = _build(chosen)
    assert sequential.members() == reference.members()
    assert sequential.digest() == reference.digest()
    assert sequential.pending() == reference.pending()
    parts = data.draw(st.integers(1, 4), label="views")
    owner = data.draw(st.lists(st.integers(0, parts - 1), min_size=len(chosen),
                               max_size=len(chosen)), label="owners")
    views = [_build([i for i, o in zip(chosen, owner, strict=True) if o == p])
             for p in range(parts)]
    order = data.draw(st.permutations(range(parts)), label="merge order")
    merged = views[order[0]]
    for p in order[1:]:
        merged.merge(views[p])
    merged.merge(views[order[-1]])  # merging again changes nothing
    assert merged.members() == reference.members()
    assert merged.digest() == reference.digest()
    assert merged.records() == reference.records()
    assert merged.pending() == reference.pending()


# ------------------------------------------------------------------------------ admission
def test_an_invite_seen_in_gossip_cannot_be_reused() -> None:
    view = MembershipView(GENESIS)
    view.add(join(FOUNDER, b""))
    inv = invite(uses=5)
    record = join(A, inv)
    assert view.add(record)
    # a stranger harvests the invite and A's proof from the gossiped admission
    harvested = join_of(record)
    stolen = make_join(OUTSIDER, FED, dataclasses.replace(harvested, addresses=()), 300, 1)
    no_proof = make_join(OUTSIDER, FED, Join(inv, ("backbone",), (), 0), 300, 1)
    for forged in (stolen, no_proof):
        with pytest.raises(UnauthorizedError, match="ticket"):
            view.add(admit(forged, at=300))
    # a wrong ticket key does not help either
    wrong = make_join(OUTSIDER, FED, Join(inv, ("backbone",), (), 0, OUTSIDER.sign(
        proof_message(FED, OUTSIDER.public_key, inv))), 300, 1)
    with pytest.raises(UnauthorizedError):
        view.add(admit(wrong, at=300))
    # nor does sending the invited join on its own, without an admission
    with pytest.raises(NotAMemberError):
        view.add(raw_join(OUTSIDER, inv))
    assert set(view.members()) == {FOUNDER.public_key, A.public_key}


def test_a_single_use_invite_admits_the_first_admitted_only() -> None:
    inv = invite(uses=1)
    first = join(A, inv, at=400)
    # the second holder backdates its own join; its admission is still later
    second = admit(raw_join(B, inv, at=100), at=500)
    for order in ((first, second), (second, first)):
        view = view_from(GENESIS, [r.to_bytes() for r in order])
        assert set(view.members()) == {A.public_key}
        assert not view.would_admit(admit(raw_join(B, inv, at=100), at=700))
    # the winner may rejoin with the same invite: that uses no second slot
    view.add(leave(A))
    view.add(join(A, inv, ("head.topic",), epoch=1, at=600))
    assert set(view.members()) == {A.public_key}
    # an invite for two: the first two admitted members
    two = invite(uses=2, at=101)
    records = [join(C, two, at=300), join(D, two, at=200), join(E, two, at=250)]
    assert set(view_from(GENESIS, [r.to_bytes() for r in records]).members()) == {
        D.public_key, E.public_key}


def test_a_key_bound_invite_needs_no_ticket() -> None:
    view = MembershipView(GENESIS)
    assert view.add(join(A, invite(to=A)))
    with pytest.raises(UnauthorizedError):
        view.add(join(B, invite(to=A)))
    assert set(view.members()) == {A.public_key}


def test_who_may_admit() -> None:
    view = MembershipView(GENESIS)
    # an admission by a key that never joined waits for its sponsor's own admission
    by_stranger = join(B, invite(), at=400, by=A)
    assert not view.add(by_stranger)
    assert view.pending() == {by_stranger.to_bytes()} and not view.members()
    assert view.add(join(A, invite(), at=300))  # A admitted before it sponsored B: B counts
    assert set(view.members()) == {A.public_key, B.public_key} and not view.pending()
    # A cannot stamp an admission earlier than its own
    assert view.add(join(C, invite(), at=250, by=A))
    assert not view.is_member(C.public_key)
    # once an admin revokes A, A's later admissions are void, earlier ones stand
    view.add(leave(ADMIN, member=A, epoch=0, at=500))
    view.add(join(D, invite(), at=600, by=A))
    assert set(view.members()) == {B.public_key}
    # an admin admits without being a member itself
    assert view.add(join(E, invite(), at=700, by=ADMIN))
    assert view.is_member(E.public_key)
    with pytest.raises(MalformedMessageError):  # founders need no admission
        view.add(admit(join(FOUNDER, b"")))


def test_admissions_cannot_flood_the_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "MAX_PENDING", 2)
    view = MembershipView(GENESIS)
    for who in (B, C):
        view.add(join(who, invite(), by=OUTSIDER))
    with pytest.raises(NotAMemberError):
        view.add(join(D, invite(), by=OUTSIDER))
    assert len(view) == 0 and len(view.pending()) == 2


def test_a_reencoded_invite_is_no_new_invite() -> None:
    """The same signed invite in another msgpack encoding would be another id with fresh uses:
    only the canonical encoding opens."""
    inv = invite(uses=1)
    view = view_from(GENESIS, [join(A, inv).to_bytes()])
    version, header, body, signature = unpackb(inv)
    wider = b"\x94" + b"\xd0" + bytes([version]) + packb(header) + packb(body) + packb(signature)
    second = admit(raw_join(B, wider), at=300)
    with pytest.raises(MalformedMessageError, match="canonical"):
        view.add(second)
    assert set(view.members()) == {A.public_key}


def test_sponsorship_ends_with_a_leave_and_comes_back_with_a_rejoin() -> None:
    view = MembershipView(GENESIS)
    view.add(join(A, invite(), at=100))
    view.add(leave(ADMIN, member=A, epoch=0, at=200))  # revoked ...
    view.add(join(B, invite(at=300), at=350, by=A))  # ... so this admission is void
    assert not view.is_member(B.public_key)
    view.add(join(A, invite(to=A, at=400), epoch=1, at=450))  # readmitted with a fresh invite
    view.add(join(C, invite(at=300), at=500, by=A))  # counts again
    assert view.is_member(C.public_key) and not view.is_member(B.public_key)
    view.add(leave(A, epoch=1, at=600))  # its own leave ends its sponsorship too
    view.add(join(D, invite(at=300), at=700, by=A))
    assert not view.is_member(D.public_key) and view.is_member(C.public_key)


def test_would_admit_answers_every_rule() -> None:
    inv = invite(uses=1)
    view = view_from(GENESIS, [join(A, inv, at=200).to_bytes()])
    assert not view.would_admit(admit(raw_join(B, inv), at=300))  # used up
    assert view.would_admit(admit(raw_join(B, invite(at=101)), at=300))
    view.add(leave(A, epoch=0, at=400))
    assert not view.would_admit(admit(raw_join(A, inv), at=500))  # an old join (epoch 0)
    assert view.would_admit(admit(raw_join(A, inv, epoch=1), at=500))  # a rejoin
    assert len(view) == 2  # asking added nothing
    with pytest.raises(UnauthorizedError):  # invalid on its own: raised
        view.would_admit(admit(raw_join(B, invite(expires=450)), at=500))
