"""Hostile peers: each bad input is refused per peer and the node goes on, in bounded memory."""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing

from gossip.envelope import packb, seal, unpackb
from gossip.errors import OversizedMessageError
from gossip.identity import Identity
from gossip.membership import Join, make_join
from gossip.transport.memory import MemoryNetwork
from p2pfed.codec import encode_payload
from p2pfed.federated import RECORDS
from p2pfed.lineage import Lineage
from p2pfed.model.train import TrainRequest
from p2pfed.node import ANNOUNCE, Announcement, Fetch, PeerRejected, RoundCompleted
from p2pfed.runtime.driver import NodeDriver
from tests.test_federated import build, start_federation


def _codes(actions: list[object]) -> list[str]:
    return [a.error.code for a in actions if isinstance(a, PeerRejected)]


def _bundle(sender: Identity, fed: bytes, records: list[bytes], seq: int = 1) -> bytes:
    return seal(sender, kind=RECORDS, federation_id=fed, seq=seq, timestamp_ms=0,
                body=packb(records)).to_bytes()


def test_outsider_forged_and_replayed_records_are_refused() -> None:
    a, b, _c = build(3, {"backbone": [0, 1, 2]})
    for n in (a, b, _c):
        n.start(0)
    a.receive(b.peer_id, _bundle(b.identity, b.federation_id, list(b.view.records())), 0)
    members_before = a.members()
    outsider = Identity.generate()
    ann = Announcement("backbone", 0, b"d" * 32, 10, 1, Lineage.of([outsider.peer_id]))
    env = seal(outsider, kind=ANNOUNCE, federation_id=a.federation_id, seq=1, timestamp_ms=0,
               body=ann.to_body()).to_bytes()
    assert _codes(a.receive(outsider.peer_id, env, 0)) == ["not-a-member"]
    # an outsider's join without an invite, wrapped in its own bundle
    fake_join = make_join(outsider, a.federation_id, Join(b"", ("backbone",), (), 0), 0, 1)
    assert "unauthorized" in _codes(
        a.receive(outsider.peer_id, _bundle(outsider, a.federation_id, [fake_join.to_bytes()]), 0))
    # a member's record with a forged signature
    real = next(iter(b.view.records()))
    outer = unpackb(real)
    outer[3] = outsider.sign(b"x")
    forged = packb(outer)
    a.receive(b.peer_id, _bundle(b.identity, b.federation_id, [forged], seq=5), 0)
    assert a.rejected.get("forged") == 1
    # the same bundle again
    again = _bundle(b.identity, b.federation_id, [real], seq=6)
    a.receive(b.peer_id, again, 0)
    assert _codes(a.receive(b.peer_id, again, 0)) == ["replayed"]
    assert a.members() == members_before


def test_oversized_and_mismatched_payloads_are_refused_and_the_round_finishes() -> None:
    a, b = build(2, {"backbone": [0, 1]})
    for n in (a, b):
        n.start(0)
    a.receive(b.peer_id, _bundle(b.identity, b.federation_id, list(b.view.records())), 0)
    b.receive(a.peer_id, _bundle(a.identity, a.federation_id, list(a.view.records())), 0)
    a.tick(1000)  # the next (paced) round starts, now with b as neighbour
    huge = Announcement("backbone", a.round_of("backbone"), b"d" * 32, 1 << 40, 1, Lineage())
    env = seal(b.identity, kind=ANNOUNCE, federation_id=a.federation_id, seq=50,
               timestamp_ms=0, body=huge.to_body()).to_bytes()
    assert _codes(a.receive(b.peer_id, env, 0)) == ["bad-payload"]
    rnd = a.round_of("backbone")
    payload = bytes(encode_payload("backbone", rnd, b.components["backbone"].flat,
                                   b.components["backbone"].layout))
    from gossip.envelope import digest

    ann = Announcement("backbone", rnd, digest(payload), len(payload), 1, Lineage.of([b.peer_id]))
    env = seal(b.identity, kind=ANNOUNCE, federation_id=a.federation_id, seq=51,
               timestamp_ms=0, body=ann.to_body()).to_bytes()
    fetch = next(x for x in a.receive(b.peer_id, env, 0) if isinstance(x, Fetch))
    tampered = bytearray(payload)
    tampered[-1] ^= 0xFF
    assert _codes(a.payload_received(b.peer_id, "backbone", rnd, fetch.digest, bytes(tampered),
                                     0)) == ["bad-payload"]
    before = a.components["backbone"].flat.clone()
    done = [x for x in a.tick(10**9) if isinstance(x, RoundCompleted)]
    assert done and done[0].missing == (b.peer_id,)
    assert torch.equal(a.components["backbone"].flat, before)  # nothing bad was mixed in


@pytest.mark.parametrize("noise", [float("inf"), 1e200, -1.0, float("nan")])
def test_an_announcement_declaring_impossible_noise_is_refused(noise: float) -> None:
    # noise-aware mixing squares the declared noise: inf or 1e200 must never reach it
    a, b = build(2, {"backbone": [0, 1]})
    for n in (a, b):
        n.start(0)
    a.receive(b.peer_id, _bundle(b.identity, b.federation_id, list(b.view.records())), 0)
    a.tick(1000)
    ann = Announcement("backbone", a.round_of("backbone"), b"d" * 32, 10, 1,
                       Lineage.of([b.peer_id]), noise=noise)
    env = seal(b.identity, kind=ANNOUNCE, federation_id=a.federation_id, seq=50,
               timestamp_ms=0, body=ann.to_body()).to_bytes()
    assert _codes(a.receive(b.peer_id, env, 0)) == ["malformed"]
    assert any(isinstance(x, RoundCompleted) for x in a.tick(10**9))  # the round goes on


async def test_a_flood_of_garbage_keeps_memory_bounded_and_rounds_going(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = build(3, {"backbone": [0, 1, 2]})
    net = MemoryNetwork(inbox_size=256)
    attacker = net.attach(Identity.generate().peer_id)
    async with trio.open_nursery() as nursery:
        await start_federation(nursery, nodes, net)
        await trio.sleep(5)
        start_round = nodes[0].round_of("backbone")
        for i in range(5000):
            await attacker.send(nodes[0].peer_id, b"\x93garbage" + bytes([i % 256]))
        try:
            await attacker.fetch(nodes[0].peer_id, b"\x00" * 32, 10)
        except Exception as exc:  # an unknown digest: refused, not served
            assert not isinstance(exc, OversizedMessageError)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert nodes[0].rejected["malformed"] + net.stats.dropped >= 5000
    assert nodes[0].round_of("backbone") >= start_round + 5
    assert len(nodes[0]._replay._state) <= 3  # only members' sequence windows are kept


async def test_a_failing_training_step_never_stops_the_rounds() -> None:
    """Training runs in worker threads, so this one runs on trio's real clock (for ~1 s)."""
    from tests.test_node import make_node, wire

    nodes = [make_node(float(i), trains=frozenset({"backbone"})) for i in range(2)]
    wire(nodes, [(0, 1)])
    net = MemoryNetwork()

    def broken(request: TrainRequest) -> None:
        raise RuntimeError("expected input to have 1 channel "
                           f"({request.component}, {request.round})")

    five_rounds = trio.Event()

    def progress(_actions: object) -> None:
        if min(n.round_of("backbone") for n in nodes) >= 5:
            five_rounds.set()

    async with trio.open_nursery() as nursery:
        drivers = []
        for n, trainer in zip(nodes, [broken, lambda _request: None], strict=True):
            d = NodeDriver(n, net.attach(n.peer_id), trainer=trainer, on_actions=progress)
            await nursery.start(d.run)
            drivers.append(d)
        with trio.fail_after(20):
            await five_rounds.wait()
        nursery.cancel_scope.cancel()
    assert drivers[0].training_failures >= 4 and drivers[1].training_failures == 0
    assert "mix" in {e.kind for e in nodes[0].ledger.entries()}
