"""A member's home copied while it runs (or restored from a backup) must not lock it out.

The copy signs with the same key and a higher boot epoch, so its sequence numbers are higher
than the real member's.  Once the copy stops, the real member's announcements are mixed again
within a few rounds, without a restart.
"""

from __future__ import annotations

import trio
import trio.testing

from gossip.envelope import Sequencer, seal
from gossip.transport.memory import MemoryNetwork
from p2pfed.node import ANNOUNCE, Announcement
from tests.test_federated import build, start_federation


def _contribution_rounds(node: object, sender: str) -> set[int]:
    return {e.body["round"] for e in node.ledger.entries("contribution")  # type: ignore[attr-defined]
            if e.body["sender"] == sender}


async def test_the_real_member_is_mixed_again_after_its_copy_stops(
        autojump_clock: trio.testing.MockClock) -> None:
    nodes = build(4, {"backbone": [0, 1, 2, 3]})
    real = nodes[3]
    net = MemoryNetwork(latency_s=0.01)
    async with trio.open_nursery() as nursery:
        drivers = await start_federation(nursery, nodes, net)
        await trio.sleep(10)
        # the copy (same key, the next boot epoch of a copied home) announces to everyone
        copy_seq = Sequencer(boot_epoch=50)
        for _ in range(3):
            now = int(trio.current_time() * 1000)
            for node, driver in zip(nodes[:3], drivers[:3], strict=True):
                ann = Announcement("backbone", node.round_of("backbone"), b"c" * 32, 64, 3,
                                   (real.peer_id,))
                env = seal(real.identity, kind=ANNOUNCE, federation_id=real.federation_id,
                           seq=copy_seq.next(), timestamp_ms=now, body=ann.to_body())
                driver.call(node.receive, real.peer_id, env.to_bytes())
            await trio.sleep(1)
        stopped_at = max(n.round_of("backbone") for n in nodes[:3])
        await trio.sleep(5)  # a few rounds after the copy stopped
        nursery.cancel_scope.cancel()
    for node in nodes[:3]:
        assert node.rejected.get("replayed", 0) == 0
        later = {r for r in _contribution_rounds(node, real.peer_id) if r > stopped_at}
        assert later and min(later) <= stopped_at + 3
