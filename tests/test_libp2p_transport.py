"""The libp2p transport between two hosts on 127.0.0.1 (real sockets; marked network)."""

from __future__ import annotations

import struct

import pytest
import trio

from gossip.errors import OversizedMessageError, PeerUnreachableError
from gossip.identity import Identity
from gossip.transport.libp2p import CONTROL_PROTOCOL, Libp2pTransport

pytestmark = pytest.mark.network
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def pair() -> tuple[Libp2pTransport, Libp2pTransport]:
    return (Libp2pTransport(Identity.generate(), listen_addrs=LOOPBACK, topic="t"),
            Libp2pTransport(Identity.generate(), listen_addrs=LOOPBACK, topic="t"))


async def test_control_fetch_broadcast_and_misbehaviour() -> None:
    a, b = pair()
    blob = bytes(range(256)) * (4 << 12)  # 4 MiB
    b.set_payload_server(lambda key: blob if key == b"k" * 32 else None)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            assert a.peer_id == a.identity.peer_id
            assert b.listen_addrs()[0].startswith("/ip4/127.0.0.1/tcp/")
            assert a.add_bootstrap(b.listen_addrs()) == [b.peer_id]
            await a.send(b.peer_id, b"hello b")
            assert await b.incoming.receive() == (a.peer_id, b"hello b")
            await b.send(a.peer_id, b"hello a")
            assert await a.incoming.receive() == (b.peer_id, b"hello a")
            assert await a.fetch(b.peer_id, b"k" * 32, 8 << 20) == blob
            with pytest.raises(PeerUnreachableError, match="does not have"):
                await a.fetch(b.peer_id, b"z" * 32, 8 << 20)
            with pytest.raises(OversizedMessageError):
                await a.fetch(b.peer_id, b"k" * 32, 1000)
            with pytest.raises(OversizedMessageError):
                await a.send(b.peer_id, b"x" * (70 * 1024))
            # a raw stream that claims a 1 GiB frame: b drops it and carries on
            stream = await a._open(b.peer_id, CONTROL_PROTOCOL)
            await stream.write(struct.pack(">I", 1 << 30) + b"junk")
            await trio.sleep(0.2)
            await a.send(b.peer_id, b"still there?")
            assert await b.incoming.receive() == (a.peer_id, b"still there?")
            assert b.connected_peers() == [a.peer_id]
            # gossip: wait for the mesh, then publish
            for _ in range(50):
                await b.broadcast(b"record")
                with trio.move_on_after(0.3):
                    assert await a.incoming.receive() == (b.peer_id, b"record")
                    break
            else:
                pytest.fail("broadcast never arrived")
            old = b.listen_addrs()[0]
            nursery.cancel_scope.cancel()
    # closed inside host.run(): nothing listens on the old address any more
    port = int(old.split("/tcp/")[1].split("/")[0])
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_unreachable_peer_is_an_error_not_a_crash() -> None:
    a, b = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            with pytest.raises(PeerUnreachableError):
                await a.send(b.peer_id, b"nobody home")
            a.set_wanted_peers({b.peer_id: ("/ip4/127.0.0.1/tcp/9",)})
            await trio.sleep(1.5)  # the dial loop fails and backs off, the host stays up
            assert a.connected_peers() == []
            nursery.cancel_scope.cancel()
