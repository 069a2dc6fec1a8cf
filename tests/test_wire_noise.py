"""The fast Noise and Yamux path of :mod:`gossip.transport.yamux_guard`, end to end.

Large payloads travel in DATA frames of up to ``MAX_DATA_FRAME`` over read-ahead Noise
decryption; what arrives is byte for byte what was served, and a flipped ciphertext bit ends
the connection instead of reaching the caller.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID

from gossip.envelope import digest
from gossip.errors import PeerUnreachableError
from gossip.identity import Identity
from gossip.transport.libp2p import Libp2pTransport
from gossip.transport.yamux_guard import MAX_DATA_FRAME, GuardedYamux
from tests.test_transport_limits import FAST, TOPIC, hosts

pytestmark = pytest.mark.network


def transport() -> Libp2pTransport:
    """Payloads over ``/p2pfed/payload/1``: the bulk channel would bypass the path under test."""
    return Libp2pTransport(Identity.generate(), topic=TOPIC,
                           listen_addrs=["/ip4/127.0.0.1/tcp/0"], seed=7, limits=FAST, bulk=False)


def muxed_conns(t: Any, peer: str) -> list[GuardedYamux]:
    conns = t._host.get_network().get_connections(ID.from_base58(peer))
    return [c.muxed_conn for c in conns]


async def test_a_payload_of_many_large_frames_arrives_whole() -> None:
    server, client = transport(), transport()
    blob = os.urandom(3 * MAX_DATA_FRAME + 12345)  # frames of every size, window waits
    server.set_payload_server(lambda k: blob if k == digest(blob) else None)
    with trio.fail_after(30):
        async with hosts(server, client):
            await client.connect(server.listen_addrs()[0])
            for _ in range(2):
                got = await client.fetch_buffer(server.peer_id, digest(blob), len(blob))
                assert digest(got) == digest(blob)
            assert server.stats.served == 2


class _FlipOneBit:
    """A raw connection that flips one bit of what it reads, past ``after`` bytes."""

    def __init__(self, inner: Any, after: int) -> None:
        self._inner, self._left = inner, after

    async def read(self, n: int | None = None) -> bytes:
        data: bytes = await self._inner.read(n)
        if 0 <= self._left < len(data):
            flipped = bytearray(data)
            flipped[self._left] ^= 0x01
            data = bytes(flipped)
        self._left -= len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_tampered_ciphertext_ends_the_connection() -> None:
    server, client = transport(), transport()
    blob = os.urandom(2 * MAX_DATA_FRAME)
    server.set_payload_server(lambda k: blob if k == digest(blob) else None)
    with trio.fail_after(30):
        async with hosts(server, client):
            await client.connect(server.listen_addrs()[0])
            (conn,) = muxed_conns(client, server.peer_id)
            tap: Any = conn._tap
            assert tap._noise is not None  # the fast path is the one under test
            tap._raw = _FlipOneBit(tap._raw, after=MAX_DATA_FRAME // 2)
            with pytest.raises(PeerUnreachableError):
                await client.fetch_buffer(server.peer_id, digest(blob), len(blob))
            with trio.fail_after(10):
                await conn.event_closed.wait()
