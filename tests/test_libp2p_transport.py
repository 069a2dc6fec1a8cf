"""The libp2p transport between real hosts on 127.0.0.1 (real sockets, so marked network).

Few tests, each bounded by ``trio.fail_after``: every connection costs a Noise handshake.
"""

from __future__ import annotations

import mmap
import random
import socket
import struct
from collections.abc import Callable

import pytest
import trio

from gossip.errors import (
    LocalError,
    MalformedMessageError,
    OversizedMessageError,
    PeerUnreachableError,
)
from gossip.identity import Identity
from gossip.transport.framing import encode_frame, read_frame
from gossip.transport.libp2p import (
    CONTROL_PROTOCOL,
    Libp2pTransport,
    Limits,
    backoff_delay,
    split_p2p_addr,
)

pytestmark = pytest.mark.network
TOPIC = "/p2pfed/test/records"
FAST = Limits(connect_timeout_s=2.0, control_timeout_s=5.0, fetch_timeout_s=20.0,
              backoff_min_s=0.05, backoff_max_s=0.4)


def transport(identity: Identity | None = None, listen: str = "/ip4/127.0.0.1/tcp/0",
              ) -> Libp2pTransport:
    return Libp2pTransport(identity or Identity.generate(), topic=TOPIC, listen_addrs=[listen],
                           seed=7, limits=FAST)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def port_of(addr: str) -> int:
    return int(addr.split("/tcp/")[1].split("/", maxsplit=1)[0])


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll libp2p's state, which offers nothing to wait on (the caller bounds the time)."""
    while True:
        if condition():
            return
        await trio.sleep(0.02)


class FakeStream:
    """Returns at most ``step`` bytes per read, like a libp2p stream."""

    def __init__(self, data: bytes, step: int = 3) -> None:
        self.data, self.step = data, step

    async def read(self, n: int) -> bytes:
        out, self.data = self.data[: min(n, self.step)], self.data[min(n, self.step) :]
        return out

    async def write(self, data: bytes) -> None:
        raise NotImplementedError


async def test_framing_reads_exactly_and_checks_sizes_first() -> None:
    assert await read_frame(FakeStream(encode_frame(b"hello world"))) == b"hello world"
    with pytest.raises(OversizedMessageError):
        await read_frame(FakeStream(struct.pack(">I", 1 << 30)))
    with pytest.raises(MalformedMessageError):
        await read_frame(FakeStream(struct.pack(">I", 10) + b"abc"))
    with pytest.raises(OversizedMessageError):
        encode_frame(b"x" * (64 * 1024 + 1))


def test_backoff_is_capped_jittered_and_seeded() -> None:
    delays = [backoff_delay(n, random.Random(1), base_s=1.0, cap_s=60.0) for n in range(10)]
    for n, d in enumerate(delays):
        full = min(60.0, 2.0**n)
        assert full / 2 <= d <= full
    assert delays == [backoff_delay(n, random.Random(1), base_s=1.0, cap_s=60.0)
                      for n in range(10)]
    assert backoff_delay(10_000, random.Random(), base_s=1.0, cap_s=60.0) <= 60.0


async def test_control_fetch_and_refusals() -> None:
    ida = Identity.generate()
    blob = random.Random(3).randbytes(4_000_000)
    key = bytes(range(32))
    with trio.fail_after(20):
        async with transport(ida) as a, transport() as b:
            b.set_payload_server(lambda k: blob if k == key else None)
            assert a.peer_id == ida.peer_id == str(a._host.get_id())
            (addr,) = b.listen_addrs()
            assert addr.startswith("/ip4/127.0.0.1/tcp/")
            assert split_p2p_addr(addr) == (b.peer_id, addr.rsplit("/p2p/", 1)[0])
            assert await a.connect(addr) == b.peer_id
            assert a.connected_peers() == [b.peer_id]

            await a.send(b.peer_id, b"hello b")
            assert await b.incoming.receive() == (a.peer_id, b"hello b")
            await b.send(a.peer_id, b"hello a")  # over the connection a opened
            assert await a.incoming.receive() == (b.peer_id, b"hello a")

            got = await a.fetch_buffer(b.peer_id, key, 8 << 20)
            assert isinstance(got, mmap.mmap)  # over the bulk channel, populated at once
            assert bytes(got) == blob
            assert a.stats.bulk_fetches == 1
            # the server counts once its sending thread is back, maybe after the client is done
            await eventually(lambda: b.stats.bulk_served == 1)
            with pytest.raises(PeerUnreachableError, match="does not have"):
                await a.fetch(b.peer_id, b"\xff" * 32, 8 << 20)
            with pytest.raises(OversizedMessageError):
                await a.fetch(b.peer_id, key, len(blob) - 1)
            with pytest.raises(OversizedMessageError):
                await a.send(b.peer_id, b"x" * (64 * 1024 + 1))
            assert b.stats.served == 1
            assert b.stats.served_bytes == len(blob)

            # a raw stream announcing a 1 GiB frame: b refuses it and carries on
            raw = await a._host.new_stream(b._host.get_id(), [CONTROL_PROTOCOL])
            await raw.write(struct.pack(">I", 1 << 30) + b"junk")
            # and one that ends after 3 of 10 announced bytes
            raw2 = await a._host.new_stream(b._host.get_id(), [CONTROL_PROTOCOL])
            await raw2.write(struct.pack(">I", 10) + b"abc")
            await raw2.close()
            await eventually(lambda: b.stats.rejected == 2)
            assert b.stats.strikes == 2 and not b.banned(a.peer_id)  # 2 of the 5 it takes
            await a.send(b.peer_id, b"still there?")
            assert await b.incoming.receive() == (a.peer_id, b"still there?")
            assert b.stats.received == 2

            old_b = b.listen_addrs()[0]
    # the host was closed inside host.run(): nothing listens on the old address any more
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port_of(old_b))
    with trio.fail_after(10), pytest.raises(PeerUnreachableError):
        await a.send(b.peer_id, b"after close")  # a is not running either


async def test_broadcast_reaches_the_other_peer_not_the_sender() -> None:
    with trio.fail_after(20):
        async with transport() as a, transport() as b:
            await a.connect(b.listen_addrs()[0])
            for _ in range(60):  # wait for the GossipSub mesh (1 s heartbeats)
                await b.broadcast(b"record")
                with trio.move_on_after(0.25):
                    assert await a.incoming.receive() == (b.peer_id, b"record")
                    break
            else:
                pytest.fail("the broadcast never arrived")
            with pytest.raises(OversizedMessageError):
                await b.broadcast(b"x" * (64 * 1024 + 1))
            with pytest.raises(trio.WouldBlock):
                b.incoming.receive_nowait()  # never one's own records
            assert a.stats.broadcasts_received >= 1


async def test_unreachable_then_reconnect_with_backoff() -> None:
    idb = Identity.generate()
    port = free_port()
    b_addr = f"/ip4/127.0.0.1/tcp/{port}"
    with trio.fail_after(25):
        async with transport() as a:
            with pytest.raises(PeerUnreachableError):
                await a.send(idb.peer_id, b"nobody home")
            with pytest.raises(PeerUnreachableError):
                await a.connect(f"{b_addr}/p2p/{idb.peer_id}")
            a.want_peer(idb.peer_id, [b_addr])
            await eventually(lambda: a.stats.dial_failures >= 2)  # fails, backs off, retries
            assert a.connected_peers() == []
            for _ in range(2):  # b comes up at the wanted address (twice: a restart)
                async with transport(idb, b_addr) as b:
                    await eventually(lambda: idb.peer_id in a.connected_peers())
                    await a.send(b.peer_id, b"found you")
                    assert await b.incoming.receive() == (a.peer_id, b"found you")
                await eventually(lambda: idb.peer_id not in a.connected_peers())
            a.drop_peer(idb.peer_id)
            assert idb.peer_id not in a._wanted


async def test_busy_port_full_inbox_and_errors_from_the_body() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"/ip4/127.0.0.1/tcp/{busy.getsockname()[1]}"
        with trio.fail_after(10), pytest.raises(LocalError, match="cannot listen"):
            async with transport(listen=taken):
                pass
    small = Libp2pTransport(Identity.generate(), topic=TOPIC, inbox_size=2, limits=FAST)
    with trio.fail_after(10), pytest.raises(ValueError, match="from the body"):
        async with small as b, transport() as a:
            await a.connect(b.listen_addrs()[0])
            for n in range(4):
                await a.send(b.peer_id, b"%d" % n)  # delivered, then dropped when full
            assert b.stats.dropped == 2
            assert [b.incoming.receive_nowait()[1] for _ in range(2)] == [b"0", b"1"]
            raise ValueError("from the body")  # not wrapped in an exception group
