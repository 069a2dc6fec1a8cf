"""Admission in one process: real homes, real invite tokens, nodes over the memory transport.

Every case of the trust boundary's door: a correct single-use token (also when its first request
is lost), and a stranger with a harvested, expired, already-used or other-federation invite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from gossip.admission import make_join_request
from gossip.catalog import ComponentSpec
from gossip.envelope import open_envelope, packb, seal
from gossip.identity import Identity
from gossip.membership import Admission, Join, make_join
from gossip.transport.memory import MemoryNetwork
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.federated import RECORDS, FederatedNode
from p2pfed.fedstore import (
    FederationStore,
    create_federation,
    join_federation,
    make_invite_token,
)
from p2pfed.ledger import Ledger
from p2pfed.node import NodeConfig
from p2pfed.runtime.driver import NodeDriver, trio_clock_ms

CATALOG = ["backbone"]
HOUR_MS = 3_600_000


@dataclass
class Home:
    path: Path
    identity: Identity
    ledger: Ledger

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def node(self) -> FederatedNode:
        view = FederationStore(self.path).view(self.ledger)
        comp = FlatComponent.from_params(ComponentSpec.from_name("backbone"),
                                         {"w": torch.zeros(4, dtype=torch.float64)})
        return FederatedNode(self.identity, view.federation_id, {"backbone": comp}, self.ledger,
                             BlobStore(None), NodeConfig(round_timeout_ms=2000,
                                                         round_interval_ms=1000), view=view)


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[Callable[[str], Home]]:
    with ExitStack() as stack:
        def make(name: str) -> Home:
            identity = Identity.generate()
            ledger = stack.enter_context(Ledger.open(tmp_path / f"{name}.sqlite3", identity))
            return Home(tmp_path / name, identity, ledger)
        yield make


def found(home: Home, name: str = "school-net") -> None:
    create_federation(home.path, home.identity, home.ledger, name=name, catalog=CATALOG,
                      modules=CATALOG, addresses=[f"/memory/{home.peer_id}"],
                      round_period_ms=1000, now_ms=0)


def token_of(admin: Home, *, ttl_ms: int = HOUR_MS, uses: int = 1, invitee: str | None = None,
             ) -> str:
    return make_invite_token(admin.path, admin.identity, invitee=invitee, modules=[],
                             ttl_ms=ttl_ms, bootstrap=[f"/ip4/127.0.0.1/tcp/1/p2p/{admin.peer_id}"],
                             now_ms=0, uses=uses)


def accept(home: Home, token: str, now_ms: int = 0) -> None:
    join_federation(home.path, home.identity, home.ledger, token, modules=CATALOG,
                    addresses=[f"/memory/{home.peer_id}"], now_ms=now_ms)


class Federation:
    """Nodes and their drivers over one memory network, policies wired as in the daemon."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.net = MemoryNetwork(latency_s=0.01)
        self.nodes: dict[str, FederatedNode] = {}
        self.drivers: dict[str, NodeDriver] = {}

    async def start(self, home: Home, bootstrap: list[str] = ()) -> FederatedNode:  # type: ignore[assignment]
        node = home.node()
        transport = self.net.attach(node.peer_id)
        transport.set_peer_policy(node.serves)
        transport.set_record_validator(
            lambda origin, data: node.accepts_broadcast(origin, data, trio_clock_ms()))
        driver = NodeDriver(node, transport)
        await self.nursery.start(driver.run)
        if bootstrap:
            driver.call(node.introduce, list(bootstrap))
        self.nodes[node.peer_id], self.drivers[node.peer_id] = node, driver
        return node


def members(node: FederatedNode) -> set[str]:
    return set(node.members())


# ---------------------------------------------------------------------------------- the door
async def test_a_single_use_invite_admits_its_holder_after_a_lost_first_request(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, school = homes("founder"), homes("school")
    found(founder)
    accept(school, token_of(founder))
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        fed.net.fail_link(founder.peer_id, school.peer_id)  # the first request is lost
        s = await fed.start(school, [founder.peer_id])
        await trio.sleep(1)
        assert not s.is_member() and school.peer_id not in members(f)
        fed.net.restore_link(founder.peer_id, school.peer_id)
        await trio.sleep(10)  # the retry (2 s later) is admitted
        assert members(f) == members(s) == {founder.peer_id, school.peer_id}
        await trio.sleep(10)
        assert s.round_of("backbone") > 3  # and it takes part in rounds
        nursery.cancel_scope.cancel()
    admissions = [e for e in founder.ledger.entries("membership")
                  if open_envelope(e.body["record"], federation_id=None, now_ms=0,
                                   max_skew_ms=1 << 62).kind == "admit"]
    assert len(admissions) == 1  # retries did not admit it twice


async def test_a_used_invite_admits_no_second_institution(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, first, second = homes("founder"), homes("first"), homes("second")
    found(founder)
    token = token_of(founder)
    accept(first, token)
    accept(second, token)  # the same token, handed on (or stolen)
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        await fed.start(first, [founder.peer_id])
        await trio.sleep(5)
        s = await fed.start(second, [founder.peer_id])
        await trio.sleep(30)
        assert members(f) == {founder.peer_id, first.peer_id}
        assert not s.is_member()
        assert f.rejected.get("unauthorized", 0) >= 1
        nursery.cancel_scope.cancel()


async def test_an_invite_for_two_admits_two(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, a, b, c = homes("founder"), homes("a"), homes("b"), homes("c")
    found(founder)
    token = token_of(founder, uses=2)
    for home in (a, b, c):
        accept(home, token)
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        for home in (a, b):
            await fed.start(home, [founder.peer_id])
            await trio.sleep(3)
        await fed.start(c, [founder.peer_id])
        await trio.sleep(20)
        assert members(f) == {founder.peer_id, a.peer_id, b.peer_id}
        nursery.cancel_scope.cancel()


async def test_an_expired_invite_is_refused_by_the_members_clock(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, late = homes("founder"), homes("late")
    found(founder)
    accept(late, token_of(founder, ttl_ms=2_000), now_ms=0)  # its join is signed in time
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        await trio.sleep(5)  # ... but it reaches a member after the invite expired
        s = await fed.start(late, [founder.peer_id])
        await trio.sleep(20)
        assert members(f) == {founder.peer_id} and not s.is_member()
        assert f.rejected.get("unauthorized", 0) >= 1
        nursery.cancel_scope.cancel()


async def test_an_invite_of_another_federation_is_refused(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, other_founder, stranger = homes("founder"), homes("other"), homes("stranger")
    found(founder)
    found(other_founder, "other-net")
    accept(stranger, token_of(other_founder))
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        await fed.start(stranger, [founder.peer_id])  # knocks on the wrong door
        await trio.sleep(20)
        assert members(f) == {founder.peer_id}
        assert f.rejected.get("wrong-federation", 0) >= 1
        nursery.cancel_scope.cancel()


async def test_a_stranger_with_a_harvested_invite_gets_nothing(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, school = homes("founder"), homes("school")
    found(founder)
    accept(school, token_of(founder, uses=5))
    stranger = Identity.generate()
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        await fed.start(school, [founder.peer_id])
        await trio.sleep(5)
        observed = sorted(f.view.records())  # everything gossip could show a stranger
        fid = f.federation_id
        now = trio_clock_ms()
        # 1. its own join, carrying the invite and proof copied from the school's admission
        admission = f.view.credentials(school.identity.public_key)[-1]
        inner = f.view.open(Admission.from_body(f.view.open(admission).body).join)
        copied = Join.from_body(inner.body)
        join = make_join(stranger, fid, copied, now, 1).to_bytes()
        request = make_join_request(stranger, fid, join, now, 2).to_bytes()
        # 2. a records bundle of what it observed, and the observed admission replayed
        bundle = seal(stranger, kind=RECORDS, federation_id=fid, seq=3, timestamp_ms=now,
                      body=packb(observed)).to_bytes()
        size = len(f.view)
        for message in (request, bundle):
            fed.drivers[f.peer_id].call(f.receive, stranger.peer_id, message)
        await trio.sleep(10)
        assert stranger.peer_id not in members(f) and len(f.view) == size
        assert f.rejected.get("unauthorized", 0) >= 2  # the request and the bundle
        # 3. nothing by digest, nothing relayed, while members are served
        assert not f.serves(stranger.peer_id) and f.serves(school.peer_id)
        assert not f.accepts_broadcast(stranger.peer_id, bundle, trio_clock_ms())
        mine = f._bundle_envelopes([admission], trio_clock_ms())[0]
        assert f.accepts_broadcast(f.peer_id, mine, trio_clock_ms())
        nursery.cancel_scope.cancel()


async def test_a_key_bound_invite_admits_only_its_peer(
        homes: Callable[[str], Home], autojump_clock: trio.testing.MockClock) -> None:
    founder, invited, other = homes("founder"), homes("invited"), homes("other")
    found(founder)
    token = token_of(founder, invitee=invited.peer_id)
    accept(invited, token)
    with pytest.raises(Exception, match="another peer id"):
        accept(other, token)
    async with trio.open_nursery() as nursery:
        fed = Federation(nursery)
        f = await fed.start(founder)
        await fed.start(invited, [founder.peer_id])
        await trio.sleep(10)
        assert members(f) == {founder.peer_id, invited.peer_id}
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- node level
def test_a_refused_bundle_leaves_nothing_behind() -> None:
    """A revoked member's bundle: its credentials check out on their own, but it is no member,
    so nothing it carries (here admissions it signed for joins it saw) enters the view."""
    from gossip.membership import Leave, make_admit, make_leave
    from tests.test_federated import build

    founder, a, b = build(3, {"backbone": [0, 1, 2]})
    for n in (founder, a, b):
        n.start(0)
    for n in (a, b):  # everyone knows everyone
        founder.receive(n.peer_id, n._bundle_envelopes(list(n.view.records()), 0)[0], 0)
    fid = founder.federation_id
    revocation = make_leave(founder.identity, fid, Leave(b.identity.public_key, 0, "out"), 10, 9)
    founder.view.add(revocation)
    creds = b.view.credentials(b.identity.public_key)
    joins = [Admission.from_body(founder.view.open(r).body).join
             for r in founder.view.records() if founder.view.open(r).kind == "admit"]
    forged = [make_admit(b.identity, fid, j, 5, 10 + i).to_bytes() for i, j in enumerate(joins)]
    size = len(founder.view)
    bundle = seal(b.identity, kind=RECORDS, federation_id=fid, seq=99, timestamp_ms=20,
                  body=packb([*creds, *forged])).to_bytes()
    assert [x.error.code for x in founder.receive(b.peer_id, bundle, 20)
            if hasattr(x, "error")] == ["unauthorized"]
    assert len(founder.view) == size and not founder.view.pending()


def test_a_former_member_asking_again_gets_no_admission() -> None:
    from gossip.membership import Invite, Join, make_invite
    from tests.test_federated import build

    founder, a = build(2, {"backbone": [0, 1]})
    founder.start(0)
    founder.receive(a.peer_id, a._bundle_envelopes(list(a.view.records()), 0)[0], 0)
    fid = founder.federation_id
    inv = make_invite(founder.identity, fid, Invite(a.identity.public_key, (), 10**12, (), b"x"),
                      0, 1).to_bytes()
    a.leave("bye", 100)
    founder.receive(a.peer_id, a._bundle_envelopes(a.view.records_about(
        a.identity.public_key), 100)[0], 100)
    assert not founder.view.is_member(a.identity.public_key)
    size = len(founder.view)
    old = make_join(a.identity, fid, Join(inv, ("backbone",), (), 0), 200, 50).to_bytes()
    request = make_join_request(a.identity, fid, old, 200, 51).to_bytes()
    codes = [x.error.code for x in founder.receive(a.peer_id, request, 200) if hasattr(x, "error")]
    assert codes == ["unauthorized"] and len(founder.view) == size  # nothing signed, nothing kept
    rejoin = make_join(a.identity, fid, Join(inv, ("backbone",), (), 1), 300, 52).to_bytes()
    founder.receive(a.peer_id, make_join_request(a.identity, fid, rejoin, 300, 53).to_bytes(), 300)
    assert founder.view.is_member(a.identity.public_key)  # a rejoin at a higher epoch is fine
    # join requests are sent directly, never relayed by gossip
    assert not founder.accepts_broadcast(a.peer_id, request, 300)


def test_a_record_too_large_for_a_bundle_is_left_out() -> None:
    from p2pfed.federated import BUNDLE_BUDGET, bundles

    small, huge = b"s" * 100, b"h" * BUNDLE_BUDGET
    head = [b"c" * 1000]
    groups = bundles([small, huge], head)
    assert groups == [[head[0], small]]
