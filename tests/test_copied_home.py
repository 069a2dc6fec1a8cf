"""A member's home copied while it runs (or restored from a backup) must not lock it out.

The copy signs with the same key and a higher boot epoch, so its sequence numbers are higher
than the real member's.  Once the copy stops, the real member's announcements are mixed again
within a few rounds, without a restart.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import torch
import trio
import trio.testing

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer, seal
from gossip.membership import MembershipView
from gossip.transport.memory import MemoryNetwork
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.federated import MEMBERSHIP_ENTRY, FederatedNode, load_view_from_ledger
from p2pfed.ledger import Ledger
from p2pfed.lineage import Lineage
from p2pfed.node import ANNOUNCE, Announcement, NodeConfig
from p2pfed.runtime.driver import NodeDriver
from tests.test_federated import build, start_federation


def _contribution_rounds(node: FederatedNode, sender: str) -> set[int]:
    return {e.body["round"] for e in node.ledger.entries("contribution")
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
                                   Lineage.of([real.peer_id]))
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


async def test_a_home_restored_from_an_older_backup_rejoins_cleanly(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    nodes = build(4, {"backbone": [0, 1, 2, 3]})
    first = nodes[3]
    records = sorted(first.view.records())

    def disk_node(home: Path, boot_epoch: int) -> FederatedNode:
        ledger = Ledger.open(home / "ledger.sqlite3", first.identity)
        view = MembershipView(first.view.genesis)
        for raw in records:
            view.add_bytes(raw)
        load_view_from_ledger(view, [e.body for e in ledger.entries(MEMBERSHIP_ENTRY)])
        weights = {"w": torch.full((8,), 3.0, dtype=torch.float64)}
        comps = {"backbone": FlatComponent.from_params(ComponentSpec.from_name("backbone"),
                                                       weights)}
        return FederatedNode(first.identity, first.federation_id, comps, ledger,
                             BlobStore(home / "blobs"),
                             NodeConfig(round_timeout_ms=2000, round_interval_ms=1000),
                             Sequencer(boot_epoch), view=view, degree=4)

    running = disk_node(tmp_path / "home", boot_epoch=5)  # restarted a few times since
    nodes[3] = running
    net = MemoryNetwork(latency_s=0.01)
    async with trio.open_nursery() as outer:
        drivers = await start_federation(outer, nodes[:3], net)
        async with trio.open_nursery() as inner:
            driver = NodeDriver(running, net.attach(running.peer_id))
            await inner.start(driver.run)
            driver.call(running.introduce, [nodes[0].peer_id])
            await trio.sleep(10)
            driver.call(running.checkpoint)
            # the operator's backup (taken when the boot epoch was 2), then 20 more seconds
            with sqlite3.connect(tmp_path / "backup.sqlite3") as copy:
                running.ledger._conn.backup(copy)
            shutil.copytree(tmp_path / "home" / "blobs", tmp_path / "restored" / "blobs")
            await trio.sleep(20)
            inner.cancel_scope.cancel()
        net.detach(running.peer_id)
        running.ledger.close()
        (tmp_path / "backup.sqlite3").rename(tmp_path / "restored" / "ledger.sqlite3")
        restored = disk_node(tmp_path / "restored", boot_epoch=2)
        assert restored.restore()["backbone"] < nodes[0].round_of("backbone") - 10
        driver = NodeDriver(restored, net.attach(restored.peer_id))
        await outer.start(driver.run)
        driver.call(restored.introduce, [nodes[0].peer_id])
        back_at = max(n.round_of("backbone") for n in nodes[:3])
        await trio.sleep(8)
        outer.cancel_scope.cancel()
    assert drivers
    for node in nodes[:3]:
        assert node.rejected.get("replayed", 0) == 0
        assert {r for r in _contribution_rounds(node, restored.peer_id) if r > back_at + 1}
    assert restored.round_of("backbone") >= back_at  # it caught up
