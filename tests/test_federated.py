"""Federated nodes over the memory transport on a mock clock: membership drives topology."""

from __future__ import annotations

import torch
import trio
import trio.testing

from gossip.catalog import ComponentSpec
from gossip.identity import Identity
from gossip.membership import (
    Genesis,
    Invite,
    Join,
    MembershipView,
    make_admit,
    make_invite,
    make_join,
)
from gossip.transport.memory import MemoryNetwork
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.federated import JOIN_REQUEST_ENTRY, FederatedNode
from p2pfed.ledger import Ledger
from p2pfed.node import NodeConfig
from p2pfed.runtime.driver import NodeDriver

CATALOG = (ComponentSpec.from_name("backbone"), ComponentSpec.from_name("head.topic"))


def build(n: int, holders: dict[str, list[int]], *, admitted: bool = True,
          ) -> list[FederatedNode]:
    """n members; node 0 founded the federation.  With ``admitted`` each other node starts
    with its admission by node 0 in its view; otherwise with only its join request, as
    'p2pfed join' leaves it (node 0 then admits it when asked)."""
    ids = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]
    genesis = Genesis("school-net", (ids[0].public_key,), CATALOG, 1000, 0)
    fed = genesis.federation_id
    nodes = []
    for i, ident in enumerate(ids):
        view = MembershipView(genesis)
        mods = tuple(c for c, hs in holders.items() if i in hs)
        invite = b"" if i == 0 else make_invite(
            ids[0], fed, Invite(ident.public_key, (), 10**12, (), b"n"), 0, 1).to_bytes()
        join = make_join(ident, fed, Join(invite, mods, (f"/memory/{i}",), 0), 0, 1)
        ledger = Ledger.open(None, ident)
        if i == 0:
            view.add(join)  # the founder
        elif admitted:
            view.add(make_admit(ids[0], fed, join.to_bytes(), 0, 1))
        else:
            ledger.append(JOIN_REQUEST_ENTRY, {"record": join.to_bytes()}, timestamp_ms=0)
        comps = {c: FlatComponent.from_params(
            ComponentSpec.from_name(c), {"w": torch.full((8,), float(i), dtype=torch.float64)})
            for c in mods}
        nodes.append(FederatedNode(
            ident, fed, comps, ledger, BlobStore(None),
            NodeConfig(round_timeout_ms=2000, round_interval_ms=1000), view=view, degree=4))
    return nodes


async def start_federation(nursery: trio.Nursery, nodes: list[FederatedNode],
                           net: MemoryNetwork) -> list[NodeDriver]:
    """Start a driver per node; every node but the first bootstraps from the first."""
    drivers = []
    for n in nodes:
        d = NodeDriver(n, net.attach(n.peer_id))
        await nursery.start(d.run)
        drivers.append(d)
    for d, n in zip(drivers[1:], nodes[1:], strict=True):
        d.call(n.introduce, [nodes[0].peer_id])  # the invite's bootstrap peer
    return drivers


async def run_federation(nodes: list[FederatedNode], seconds: float,
                         leave_at: tuple[int, float] | None = None) -> MemoryNetwork:
    net = MemoryNetwork(latency_s=0.01)
    async with trio.open_nursery() as nursery:
        drivers = await start_federation(nursery, nodes, net)
        if leave_at is not None:
            await trio.sleep(leave_at[1])
            who = leave_at[0]
            drivers[who].call(nodes[who].leave, "moving on")
            await trio.sleep(seconds - leave_at[1])
        else:
            await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return net


def test_members_discover_each_other_and_agree() -> None:
    nodes = build(5, {"backbone": [0, 1, 2, 3, 4], "head.topic": [1, 3, 4]}, admitted=False)

    async def main() -> None:
        await run_federation(nodes, 30.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    views = {n.view.digest() for n in nodes}
    assert len(views) == 1 and all(len(n.members()) == 5 for n in nodes)
    for n in nodes:
        assert n.round_of("backbone") >= 15
        hist = n.disagreement_of("backbone")
        assert hist[-1] < hist[0] / 100
    # head.topic is mixed only among its holders
    assert nodes[0].components.keys() == {"backbone"}
    for i in (1, 3, 4):
        others = set(nodes[i].neighbours_of("head.topic"))
        assert others <= {nodes[j].peer_id for j in (1, 3, 4)}
        assert nodes[i].components["head.topic"].flat[0].item() == \
            __import__("pytest").approx((1 + 3 + 4) / 3, abs=1e-3)


def test_a_leave_is_signed_gossiped_and_weights_recomputed() -> None:
    nodes = build(4, {"backbone": [0, 1, 2, 3]})

    async def main() -> None:
        await run_federation(nodes, 40.0, leave_at=(3, 10.0))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    gone = nodes[3].peer_id
    for n in nodes[:3]:
        assert gone not in n.members() and len(n.members()) == 3
        assert gone not in n.neighbours_of("backbone")
        assert abs(sum(n.weights_of("backbone").values()) - 1) < 1e-12
    assert nodes[3].left and nodes[3].neighbours_of("backbone") == ()
    # the three who stay agree with each other
    values = [n.components["backbone"].flat[0].item() for n in nodes[:3]]
    assert max(values) - min(values) < 1e-3
