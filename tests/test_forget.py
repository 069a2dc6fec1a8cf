"""Forget requests: who may ask, malformed records, and one winner per target in any order."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.catalog import ComponentSpec
from gossip.envelope import Envelope, packb, seal, signing_message
from gossip.errors import (
    ForgedSignatureError,
    LocalError,
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
    TamperedMessageError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.forget import (
    FORGET,
    MAX_REASON_CHARS,
    MAX_ROUND,
    Forget,
    ForgetBook,
    ForgetMode,
    book_from,
    make_forget,
    open_forget,
)
from gossip.identity import Identity
from gossip.membership import (
    Genesis,
    Invite,
    Join,
    Leave,
    MembershipView,
    make_admit,
    make_invite,
    make_join,
    make_leave,
)

CATALOG = (ComponentSpec.from_name("backbone"),)
FOUNDER = Identity.from_seed(b"f" * 32)
ADMIN = Identity.from_seed(b"a" * 32)  # an admin who never joins
IDLE = Identity.from_seed(b"i" * 32)  # a founder who never joins, and signs a leave
A, B, C, D, OUTSIDER = (Identity.from_seed(bytes([i]) * 32) for i in range(1, 6))
GENESIS = Genesis("edu", (FOUNDER.public_key, IDLE.public_key), CATALOG, 5000, 1,
                  admins=(FOUNDER.public_key, ADMIN.public_key))
FED = GENESIS.federation_id
EXACT, FAST = ForgetMode.EXACT, ForgetMode.FAST


def _view() -> MembershipView:
    """FOUNDER, A and B are members; C joined and left; D and IDLE left without joining."""
    view = MembershipView(GENESIS)
    assert view.add(make_join(FOUNDER, FED, Join(b"", ("backbone",), (), 0), 200, 1))
    for who in (A, B, C):
        invite = make_invite(FOUNDER, FED, Invite(who.public_key, (), 10_000, (), b"n"), 100,
                             1).to_bytes()
        join = make_join(who, FED, Join(invite, ("backbone",), (), 0), 200, 1)
        assert view.add(make_admit(FOUNDER, FED, join.to_bytes(), 200, 1))
    assert view.add(make_leave(C, FED, Leave(C.public_key, 0, "bye"), 300, 2))
    assert view.add(make_leave(ADMIN, FED, Leave(D.public_key, 0, "revoked"), 300, 1))
    assert view.add(make_leave(IDLE, FED, Leave(IDLE.public_key, 0, "never mind"), 300, 1))
    assert set(view.members()) == {FOUNDER.public_key, A.public_key, B.public_key}
    return view


VIEW = _view()


def forget(by: Identity, target: Identity | None = None, mode: ForgetMode = EXACT,
           round_: int = 3, reason: str = "gdpr", fed: bytes = FED, seq: int = 10) -> Envelope:
    record = Forget((target or by).public_key, mode, round_, reason)
    return make_forget(by, fed, record, 1000, seq)


# ------------------------------------------------------------------------------ the record
def test_record_round_trip_and_envelope() -> None:
    record = Forget(A.public_key, FAST, 7, "left the school")
    assert Forget.from_body(record.to_body()) == record
    env = make_forget(B, FED, record, 1234, 5)
    assert env.kind == FORGET and env.sender == B.public_key and env.federation_id == FED
    again, opened = open_forget(env.to_bytes(), FED)
    assert again == record and opened == env
    assert Forget(A.public_key, "fast", 0).mode is FAST  # type: ignore[arg-type]
    assert Forget(A.public_key, EXACT, MAX_ROUND, "x" * MAX_REASON_CHARS).reason == "x" * 256


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": b"short"},
        {"mode": "slow"},
        {"requested_round": -1},
        {"requested_round": True},
        {"requested_round": MAX_ROUND + 1},
        {"reason": "x" * (MAX_REASON_CHARS + 1)},
        {"reason": 5},
    ],
)
def test_record_constructor_refuses(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"target": A.public_key, "mode": EXACT, "requested_round": 1}
    with pytest.raises(ValueError):
        Forget(**(args | kwargs))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ who may ask
def test_a_member_may_ask_to_forget_itself() -> None:
    book = ForgetBook(FED)
    env = forget(A, mode=FAST, round_=4, reason="moving away")
    assert book.add(env, VIEW)
    request = book.get(A.public_key)
    assert request is not None
    assert request.requester == A.public_key and request.target == A.public_key
    assert request.forget == Forget(A.public_key, FAST, 4, "moving away")
    assert request.envelope == env and request.raw == env.to_bytes()
    assert book.requests() == [request] and book.records() == {env.to_bytes()}
    assert len(book) == 1 and book.get(B.public_key) is None


def test_a_member_that_left_may_still_ask() -> None:
    book = ForgetBook(FED)
    assert book.add(forget(C), VIEW)
    assert book.get(C.public_key) is not None


def test_an_admin_may_ask_to_forget_another_member() -> None:
    book = ForgetBook(FED)
    assert book.add(forget(ADMIN, B), VIEW)  # ADMIN has never joined: the genesis names it
    assert book.add(forget(FOUNDER, C), VIEW)  # a member that left
    by_admin = book.get(B.public_key)
    assert by_admin is not None and by_admin.requester == ADMIN.public_key
    assert [r.target for r in book.requests()] == sorted([B.public_key, C.public_key])


def test_a_member_may_not_ask_for_someone_else() -> None:
    book = ForgetBook(FED)
    with pytest.raises(UnauthorizedError) as info:
        book.add(forget(A, B), VIEW)
    assert "only the member itself or an admin may ask to forget" in str(info.value)
    assert B.peer_id in str(info.value) and info.value.peer == A.peer_id
    assert info.value.code == "unauthorized"
    assert len(book) == 0 and not book.records()


@pytest.mark.parametrize(
    ("by", "target", "error"),
    [
        (OUTSIDER, OUTSIDER, NotAMemberError),  # never joined: nothing of it to forget
        (OUTSIDER, A, UnauthorizedError),
        (ADMIN, OUTSIDER, NotAMemberError),
        (ADMIN, D, NotAMemberError),  # a leave names D, but D never joined
        (D, D, NotAMemberError),
        (ADMIN, ADMIN, NotAMemberError),  # an admin that never joined
        (IDLE, IDLE, NotAMemberError),  # a founder's own leave is not a join
        (ADMIN, IDLE, NotAMemberError),
    ],
)
def test_keys_that_never_joined(by: Identity, target: Identity,
                                error: type[RemoteError]) -> None:
    book = ForgetBook(FED)
    with pytest.raises(error) as info:
        book.add(forget(by, target), VIEW)
    assert target.peer_id in str(info.value)
    assert len(book) == 0


# ------------------------------------------------------------------------------ envelopes
def test_forged_and_tampered_envelopes_are_refused() -> None:
    book = ForgetBook(FED)
    real = forget(B, A)  # would be refused anyway: check the signature comes first
    forged = dataclasses.replace(real, signature=A.sign(signing_message(FORGET, real.header)))
    with pytest.raises(ForgedSignatureError):
        book.add(forged, VIEW)  # A's signature on a header naming B as sender
    with pytest.raises(ForgedSignatureError):
        book.add_bytes(forged.to_bytes(), VIEW)
    own = forget(A)
    tampered = dataclasses.replace(own, body=Forget(A.public_key, FAST, 0).to_body())
    with pytest.raises(TamperedMessageError):
        book.add(tampered, VIEW)
    impostor = dataclasses.replace(own, sender=ADMIN.public_key)  # the signed header wins
    assert book.add(impostor, VIEW)
    held = book.get(A.public_key)
    assert held is not None and held.requester == A.public_key and len(book) == 1


def test_wrong_federation_is_refused() -> None:
    book = ForgetBook(FED)
    with pytest.raises(WrongFederationError):
        book.add(forget(A, fed=b"o" * 32), VIEW)
    other = MembershipView(Genesis("other", GENESIS.founders, CATALOG, 5000, 1))
    with pytest.raises(LocalError):
        book.add(forget(A), other)
    with pytest.raises(LocalError):
        ForgetBook(other.federation_id).add(forget(A), VIEW)
    assert len(book) == 0


def test_a_replayed_envelope_changes_nothing() -> None:
    book = ForgetBook(FED)
    env = forget(A)
    assert book.add(env, VIEW)
    before = (book.requests(), book.records())
    assert not book.add(env, VIEW)
    assert not book.add_bytes(env.to_bytes(), VIEW)
    assert (book.requests(), book.records()) == before


def test_later_requests_for_the_same_target_lose_unless_earlier() -> None:
    book = ForgetBook(FED)
    first = forget(A, round_=5)
    assert book.add(first, VIEW)
    assert not book.add(forget(ADMIN, A, FAST, round_=6), VIEW)  # a later round loses
    assert not book.add(forget(A, round_=5, seq=10), VIEW)  # the same bytes again
    held = book.get(A.public_key)
    assert held is not None and held.raw == first.to_bytes()
    earlier = forget(ADMIN, A, FAST, round_=2)
    assert book.add(earlier, VIEW)  # an earlier round wins, whenever it arrives
    assert book.records() == {earlier.to_bytes()}
    assert not book.add(first, VIEW)
    with pytest.raises(UnauthorizedError):  # still validated, even for a target already held
        book.add(forget(B, A, round_=0), VIEW)
    assert book.records() == {earlier.to_bytes()}


# ------------------------------------------------------------------------------ malformed
def _body(body: bytes, kind: str = FORGET) -> Envelope:
    return seal(A, kind=kind, federation_id=FED, seq=1, timestamp_ms=1, body=body)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",
        packb({"target": A.public_key}),
        packb([A.public_key, "exact", 1]),
        packb([A.public_key, "exact", 1, "", "extra"]),
        packb(["A", "exact", 1, ""]),
        packb([A.public_key[:31], "exact", 1, ""]),
        packb([A.public_key, "slow", 1, ""]),
        packb([A.public_key, "EXACT", 1, ""]),
        packb([A.public_key, 1, 1, ""]),
        packb([A.public_key, ["exact"], 1, ""]),
        packb([A.public_key, "exact", -1, ""]),
        packb([A.public_key, "exact", True, ""]),
        packb([A.public_key, "exact", "1", ""]),
        packb([A.public_key, "exact", 1.0, ""]),
        packb([A.public_key, "exact", MAX_ROUND + 1, ""]),
        packb([A.public_key, "exact", 1, "x" * (MAX_REASON_CHARS + 1)]),
        packb([A.public_key, "exact", 1, b"bytes"]),
        packb([A.public_key, "exact", 1, None]),
    ],
)
def test_malformed_bodies_are_refused(body: bytes) -> None:
    book = ForgetBook(FED)
    with pytest.raises(MalformedMessageError):
        book.add(_body(body), VIEW)
    with pytest.raises(MalformedMessageError):
        Forget.from_body(body)
    assert len(book) == 0


def test_other_record_kinds_are_refused() -> None:
    body = Forget(A.public_key, EXACT, 1).to_body()
    book = ForgetBook(FED)
    with pytest.raises(MalformedMessageError):
        book.add(_body(body, kind="leave"), VIEW)  # the domain tag is part of the signature
    with pytest.raises(MalformedMessageError):
        book.add_bytes(make_join(A, FED, Join(b"", (), (), 0), 1, 1).to_bytes(), VIEW)
    assert book.add(_body(body), VIEW)


# ------------------------------------------------------------------------------ convergence
# Valid and invalid requests, several per target, that hypothesis picks from and permutes.
POOL = [
    forget(A, round_=5),
    forget(A, round_=3, reason="one"),
    forget(A, round_=3, reason="two"),  # ties on the round with the previous two
    forget(ADMIN, A, FAST, round_=3),
    forget(FOUNDER, A, round_=4),
    forget(B, round_=0),
    forget(ADMIN, B, FAST, round_=0, seq=11),
    forget(C, mode=FAST, round_=9),
]
VALID = len(POOL)
POOL += [
    forget(B, A, round_=0),  # invalid: not an admin
    forget(OUTSIDER, round_=0),  # invalid: never a member
    forget(ADMIN, D, round_=0),  # invalid: never joined
]


def _winner(target: Identity, indices: list[int]) -> bytes | None:
    """The rule, stated directly: the smallest (round, envelope digest) among valid requests."""
    valid = [POOL[i] for i in indices if i < VALID
             and Forget.from_body(POOL[i].body).target == target.public_key]
    if not valid:
        return None
    best = min(valid, key=lambda e: (Forget.from_body(e.body).requested_round,
                                     hashlib.sha256(e.to_bytes()).digest()))
    return best.to_bytes()


def _build(indices: list[int]) -> ForgetBook:
    book = ForgetBook(FED)
    for i in indices:
        with contextlib.suppress(RemoteError):
            book.add(POOL[i], VIEW)
    return book


def test_reference_book_is_what_the_rule_says() -> None:
    everything = list(range(len(POOL)))
    book = _build(everything)
    assert len(book) == 3
    assert book.records() == {_winner(t, everything) for t in (A, B, C)}
    a = book.get(A.public_key)
    assert a is not None and a.forget.requested_round == 3
    for bad in POOL[VALID:]:
        with pytest.raises(RemoteError):
            book.add(bad, VIEW)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_order_and_any_merge_give_the_same_book(data: st.DataObject) -> None:
    n = len(POOL)
    chosen = data.draw(st.lists(st.integers(0, n - 1), unique=True), label="requests in order")
    reference = _build(sorted(chosen))
    sequential = _build(chosen)
    assert sequential.requests() == reference.requests()
    assert sequential.records() == reference.records()
    assert {r.raw for r in reference.requests()} == {
        w for t in (A, B, C) if (w := _winner(t, chosen)) is not None}
    parts = data.draw(st.integers(1, 4), label="books")
    owner = data.draw(st.lists(st.integers(0, parts - 1), min_size=len(chosen),
                               max_size=len(chosen)), label="owners")
    books = [_build([i for i, o in zip(chosen, owner, strict=True) if o == p])
             for p in range(parts)]
    order = data.draw(st.permutations(range(parts)), label="merge order")
    merged = books[order[0]]
    for p in [*order[1:], order[-1]]:  # merging a book twice changes nothing
        for raw in sorted(books[p].records()):
            merged.add_bytes(raw, VIEW)
    assert merged.requests() == reference.requests()
    assert merged.records() == reference.records()


def test_records_round_trip_into_a_fresh_book() -> None:
    book = _build(list(range(len(POOL))))
    fresh = ForgetBook(FED)
    for raw in book.records():
        assert fresh.add_bytes(raw, VIEW)
    assert fresh.requests() == book.requests() and fresh.records() == book.records()
    assert book_from(FED, sorted(book.records(), reverse=True), VIEW).requests() == book.requests()
    with pytest.raises(MalformedMessageError):
        book_from(FED, [b"\xc1"], VIEW)
