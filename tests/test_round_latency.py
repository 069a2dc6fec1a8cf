"""Rounds that never wait out a timeout for a member that restarted, and a federation with no
round interval that neither spins nor recurses (four members, the real driver, MockClock)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from gossip.transport.memory import MemoryNetwork
from p2pfed.federated import FederatedNode
from p2pfed.node import NodeConfig, RoundCompleted
from p2pfed.runtime.driver import NodeDriver
from tests.test_federated import build

TIMEOUT_MS = 2000


def _four(interval_ms: int) -> list[FederatedNode]:
    nodes = build(4, {"backbone": [0, 1, 2, 3]})
    for n in nodes:  # the same members, with this test's round timing
        n.config = NodeConfig(round_timeout_ms=TIMEOUT_MS, round_interval_ms=interval_ms)
    return nodes


def test_four_members_with_no_round_interval_form_a_federation_and_mix() -> None:
    nodes = _four(interval_ms=0)
    done: list[RoundCompleted] = []

    async def main() -> None:
        net = MemoryNetwork(latency_s=0.01)
        async with trio.open_nursery() as nursery:
            for i, n in enumerate(nodes):
                d = NodeDriver(n, net.attach(n.peer_id), on_actions=lambda acts: done.extend(
                    a for a in acts if isinstance(a, RoundCompleted)))
                await nursery.start(d.run)
                if i:
                    d.call(n.introduce, [nodes[0].peer_id])
            await trio.sleep(30)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert all(n.is_member() for n in nodes)
    mixed = [r for r in done if len(r.mixed_with) == 3]
    assert len(mixed) >= 4 * 5  # every member mixed its three neighbours, round after round
    # alone before the others were known, a member ran a round per timeout, not thousands
    lone = [r for r in done if not r.mixed_with and not r.missing]
    assert len(lone) <= 4 * 30_000 // TIMEOUT_MS


def test_a_restarted_member_mixes_every_neighbour_in_its_first_round_back() -> None:
    nodes = _four(interval_ms=500)
    back: list[tuple[float, RoundCompleted]] = []
    current: list[int] = []  # the rounds the others are collecting when it comes back

    async def main() -> None:
        net = MemoryNetwork(latency_s=0.01)
        async with trio.open_nursery() as nursery:
            scopes = []
            for i, n in enumerate(nodes):
                scope = trio.CancelScope()
                scopes.append(scope)
                d = NodeDriver(n, net.attach(n.peer_id))

                async def run(d: NodeDriver = d, scope: trio.CancelScope = scope, *,
                              task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await d.run(task_status=task_status)
                await nursery.start(run)
                if i:
                    d.call(n.introduce, [nodes[0].peer_id])
            await trio.sleep(20)
            assert nodes[3].completed_of("backbone") >= 5
            scopes[3].cancel()  # member 3 stops ...
            net.detach(nodes[3].peer_id)
            await trio.sleep(3)  # ... its neighbours announce into the void meanwhile
            old = nodes[3]
            again = FederatedNode(old.identity, old.federation_id,
                                  {"backbone": old.components["backbone"]}, old.ledger,
                                  old.blobs, old.config, view=old.view, degree=4)
            again.restore()
            restarted = trio.current_time()
            current.extend(n.round_of("backbone") for n in nodes[:3])
            d = NodeDriver(again, net.attach(again.peer_id), on_actions=lambda acts: back.extend(
                (trio.current_time() - restarted, a) for a in acts
                if isinstance(a, RoundCompleted)))
            await nursery.start(d.run)
            await trio.sleep(10)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert back, "the restarted member completed no round"
    first_at, first = back[0]
    # it joins the round its neighbours are collecting (their announcements of it were lost
    # while it was away and are sent again) instead of waiting for them to time it out
    assert first.round == max(current) and len(set(current)) == 1
    assert len(first.mixed_with) == 3 and not first.missing
    assert first_at < TIMEOUT_MS / 1000
