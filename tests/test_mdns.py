"""LAN discovery: ``[node] mdns`` reaches the transport, which wants the members mDNS finds.

py-libp2p's mDNS (zeroconf, in threads of its own) announces on every interface; the one
network test here lets two hosts on 127.0.0.1 find each other with no address given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gossip.errors import ConfigError
from gossip.identity import Identity
from gossip.transport.libp2p import Libp2pTransport, Limits
from p2pfed.config import Config

TOPIC = "/p2pfed/test/mdns"
FAST = Limits(connect_timeout_s=2.0, backoff_min_s=0.05, backoff_max_s=0.4)
ADDR = "/ip4/192.0.2.7/tcp/4001"


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll libp2p's state, which offers nothing to wait on (the caller bounds the time)."""
    while True:
        if condition():
            return
        await trio.sleep(0.05)


def transport(*, mdns: bool) -> Libp2pTransport:
    return Libp2pTransport(Identity.generate(), topic=TOPIC, listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                           seed=3, mdns=mdns, limits=FAST)


def test_config_carries_mdns_and_refuses_an_interface(tmp_path: Path) -> None:
    assert Config.from_dict({"node": {"mdns": True}}).node.mdns is True
    assert "mdns = true" in Config.from_dict({"node": {"mdns": True}}).to_toml()
    # 'p2pfed init' wrote an empty mdns_interface into every p2pfed.toml: still read
    old = Config.from_dict({"node": {"mdns": False, "mdns_interface": ""}})
    assert old.node.mdns is False and "mdns_interface" not in old.to_toml()
    with pytest.raises(ConfigError, match=r"node\.mdns_interface is no longer supported"):
        Config.from_dict({"node": {"mdns": True, "mdns_interface": "eth0"}})
    path = tmp_path / "p2pfed.toml"
    path.write_text('[node]\nmdns = true\nmdns_interface = "eth1"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p2pfed\.toml: node\.mdns_interface"):
        Config.from_toml(path)


def test_members_found_on_the_lan_are_wanted_strangers_are_not() -> None:
    t = transport(mdns=True)
    member, stranger = Identity.generate().peer_id, Identity.generate().peer_id
    t.set_peer_policy(lambda peer: peer == member)
    t._found_on_lan(stranger, (ADDR,))
    t._found_on_lan(member, (ADDR,))
    t._found_on_lan(t.peer_id, (ADDR,))
    assert t._wanted == {member: (ADDR,)}
    # the node's wanted peers keep what mDNS found, on top of the records' addresses
    t.set_wanted_peers({member: ("/ip4/10.0.0.1/tcp/4001",), stranger: ()})
    assert t._wanted == {member: ("/ip4/10.0.0.1/tcp/4001", ADDR), stranger: ()}


@pytest.mark.network
async def test_two_hosts_with_mdns_find_each_other_without_an_address() -> None:
    a, b = transport(mdns=True), transport(mdns=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)  # neither is given the other's address
        with trio.fail_after(30):  # zeroconf announces within a few seconds
            await eventually(lambda: b.peer_id in a.connected_peers())
        assert a.peer_id in b.connected_peers()
        found = a._wanted.get(b.peer_id) or b._wanted.get(a.peer_id)
        assert found and all(x.startswith("/ip4/127.0.0.1/tcp/") for x in found)
        nursery.cancel_scope.cancel()
