"""The in-memory transport: delivery, fetches, failures and bounded inboxes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gossip.errors import OversizedMessageError, PeerUnreachableError
from gossip.transport.memory import MemoryNetwork


async def test_send_fetch_and_failures() -> None:
    net = MemoryNetwork()
    a, b = net.attach("a"), net.attach("b")
    b.set_payload_server(lambda key: b"payload" if key == b"k" else None)
    await a.send("b", b"hi")
    assert b.incoming.receive_nowait() == ("a", b"hi")
    assert await a.fetch("b", b"k", 100) == b"payload"
    assert net.stats.fetch_pairs[("b", "a")] == 1
    with pytest.raises(PeerUnreachableError):
        await a.fetch("b", b"unknown", 100)
    with pytest.raises(OversizedMessageError):
        await a.fetch("b", b"k", 3)
    net.fail_link("a", "b")
    with pytest.raises(PeerUnreachableError):
        await a.send("b", b"hi")
    net.restore_link("a", "b")
    await a.send("b", b"again")
    net.detach("b")
    with pytest.raises(PeerUnreachableError):
        await a.send("b", b"gone")


async def test_full_inbox_drops_instead_of_growing() -> None:
    net = MemoryNetwork(inbox_size=4)
    a, _b = net.attach("a"), net.attach("b")
    for i in range(10):
        await a.send("b", bytes([i]))
    assert net.stats.dropped == 6


def test_latency_uses_the_mock_clock() -> None:
    async def main() -> float:
        net = MemoryNetwork(latency_s=5.0)
        a, b = net.attach("a"), net.attach("b")
        start = trio.current_time()
        await a.send("b", b"x")
        assert b.incoming.receive_nowait() == ("a", b"x")
        return trio.current_time() - start

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 5.0
