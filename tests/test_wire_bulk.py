"""The bulk channel (:mod:`gossip.transport.bulk`): payloads over a TCP port of their own.

The first tests check records and tickets without sockets (time is passed in).  The ones
marked ``network`` run real hosts on 127.0.0.1, each bounded by ``trio.fail_after``; a small
TCP proxy in front of the bulk port tampers with or cuts what the server sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from cryptography.exceptions import InvalidTag
from libp2p.network.stream.exceptions import StreamError

from gossip.envelope import digest
from gossip.errors import (
    MalformedMessageError,
    PeerUnreachableError,
    TamperedMessageError,
)
from gossip.identity import Identity
from gossip.transport import bulk, bulk_io
from gossip.transport.bulk_proto import (
    HELLO,
    RECORD_BYTES,
    REQUEST,
    STATUS_OK,
    TAG_BYTES,
    Ticket,
    TicketTable,
    derive_keys,
    record_ad,
    record_count,
    record_nonce,
)
from gossip.transport.libp2p import Libp2pTransport, Limits

network = pytest.mark.network
TOPIC = "/p2pfed/test/bulk"
FAST = Limits(connect_timeout_s=3.0, control_timeout_s=5.0, request_timeout_s=1.0,
              fetch_timeout_s=20.0, backoff_min_s=0.05, backoff_max_s=0.4)
BLOB = os.urandom(2 * RECORD_BYTES + 12345)  # three records, the last one short
KEY = digest(BLOB)


def transport(*, bulk_on: bool = True, limits: Limits = FAST) -> Libp2pTransport:
    return Libp2pTransport(Identity.generate(), topic=TOPIC,
                           listen_addrs=["/ip4/127.0.0.1/tcp/0"], seed=7, limits=limits,
                           bulk=bulk_on)


def serving(t: Libp2pTransport, blob: bytes = BLOB) -> Libp2pTransport:
    t.set_payload_server(lambda k: blob if k == digest(blob) else None)
    return t


@contextlib.asynccontextmanager
async def pair(server: Libp2pTransport, client: Libp2pTransport) -> AsyncIterator[None]:
    async with server, client:
        await client.connect(server.listen_addrs()[0])
        yield


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait for a server's counters: it counts a transfer once its sending thread is back,
    which may be after the client has the payload (the caller bounds the time)."""
    while True:
        if condition():
            return
        await trio.sleep(0.01)


def server_of(t: Libp2pTransport) -> bulk.BulkServer:
    assert t._bulk is not None and t._bulk.port is not None
    return t._bulk


# --------------------------------------------------------------------------- no sockets
def test_records_bind_their_index_the_ticket_and_the_end() -> None:
    keys = derive_keys(bytes(32), b"\1" * 32, b"\2" * 32, client="a", server="b", digest=KEY)
    size = RECORD_BYTES + 10
    assert record_count(size) == 2 and record_count(0) == 1
    sealed = keys.record.encrypt(record_nonce(0), b"x" * 10, record_ad(b"\2" * 32, 1, size))
    assert keys.record.decrypt(record_nonce(0), sealed, record_ad(b"\2" * 32, 1, size))
    for nonce, ad in ((record_nonce(1), record_ad(b"\2" * 32, 1, size)),  # moved
                      (record_nonce(0), record_ad(b"\3" * 32, 1, size)),  # another ticket
                      (record_nonce(0), record_ad(b"\2" * 32, 1, size + 1))):  # not the last
        with pytest.raises(InvalidTag):
            keys.record.decrypt(nonce, sealed, ad)
    # every input of the key schedule matters, the two peer ids in order included
    other = derive_keys(bytes(32), b"\1" * 32, b"\2" * 32, client="b", server="a", digest=KEY)
    assert other.proof(b"t" * 32) != keys.proof(b"t" * 32)
    assert keys.proof_ok(b"t" * 32, keys.proof(b"t" * 32))
    assert not keys.proof_ok(b"t" * 32, other.proof(b"t" * 32))


def test_tickets_are_single_use_expire_and_are_capped() -> None:
    keys = derive_keys(bytes(32), bytes(32), bytes(32), client="a", server="b", digest=KEY)
    table = TicketTable(ttl_s=10.0, per_peer=2, total=3, held_bytes=8)

    def ticket(peer: str, now: float) -> Ticket:
        return Ticket(peer, KEY, 5, keys, now + 10.0, b"12345" if table.can_hold(5, now) else None)

    assert table.issue(b"1", ticket("a", 0.0), 0.0) and table.held == 5
    assert table.issue(b"2", ticket("a", 1.0), 1.0) and table.held == 5  # keeps no payload
    assert not table.issue(b"3", ticket("a", 1.0), 1.0)  # two per peer
    assert table.issue(b"4", ticket("b", 2.0), 2.0)
    assert not table.issue(b"5", ticket("c", 2.0), 2.0)  # three in all
    got = table.redeem(b"2", 3.0)
    assert got is not None and got.peer == "a" and got.data is None
    assert table.redeem(b"2", 3.0) is None  # used
    table.expire(10.0)
    assert table.held == 0  # the expired ticket let go of its payload
    assert table.redeem(b"1", 10.0) is None  # expired
    assert table.redeem(b"nope", 3.0) is None
    assert len(table) == 1 and table.issue(b"6", ticket("c", 4.0), 4.0)


BUDDYINFO = """\
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32     79     88     80     66     68     58     37     27      6      4    741
Node 0, zone   Normal  34895  28057  11679   7644   5393   3340   1698    799    627    391   2695
"""


def test_free_huge_blocks_count_2_mib_blocks_of_every_zone(tmp_path: Any) -> None:
    info = tmp_path / "buddyinfo"
    info.write_text(BUDDYINFO)
    # order 9 counts once, order 10 (4 MiB) twice
    assert bulk_io.free_huge_blocks(str(info)) == (1 + 3 * 2) + (4 + 741 * 2) + (391 + 2695 * 2)
    info.write_text("Node 0, zone Normal 1 2 3\nnot a line at all\n")
    assert bulk_io.free_huge_blocks(str(info)) == 0
    assert bulk_io.free_huge_blocks(str(tmp_path / "missing")) == 0


@pytest.mark.parametrize("huge_blocks", [0, 1 << 20])
def test_a_new_buffer_is_zeroed_writable_and_exactly_sized(
        monkeypatch: pytest.MonkeyPatch, huge_blocks: int) -> None:
    monkeypatch.setattr(bulk_io, "free_huge_blocks", lambda: huge_blocks)
    for size in (0, 100, bulk_io.MMAP_MIN_BYTES, bulk_io.HUGE_MIN_BYTES + 4097):
        buf = bulk_io.new_buffer(size)
        view = memoryview(buf)
        assert len(view) == size and not view.readonly and not any(view[:: 4093])
        if size:
            view[-1] = 7
            assert buf[-1] == 7
        view.release()


# --------------------------------------------------------------------------- network
@network
async def test_a_payload_arrives_whole_over_the_bulk_channel() -> None:
    server, client = transport(), transport()
    blobs = {digest(b): b for b in (BLOB, b"", b"small")}
    server.set_payload_server(blobs.get)
    with trio.fail_after(30):
        async with pair(server, client):
            for blob in blobs.values():
                got = await client.fetch_buffer(server.peer_id, digest(blob), len(BLOB))
                assert bytes(got) == blob
            assert await client.fetch(server.peer_id, KEY, len(BLOB)) == BLOB
            with pytest.raises(PeerUnreachableError, match="does not have"):
                await client.fetch(server.peer_id, bytes(32), 1 << 20)
            assert client.stats.bulk_fetches == 4 and client.stats.bulk_fallbacks == 0
            await eventually(lambda: server.stats.bulk_served == server.stats.served == 4)
            assert len(server_of(server).tickets) == 0


async def _proxy(target: int, *, flip_at: int | None = None, cut_at: int | None = None,
                 task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Forward 127.0.0.1 connections to ``target``; flip a bit of, or cut, what comes back."""

    async def down(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        seen = 0
        async for chunk in src:
            data = bytearray(chunk)
            if flip_at is not None and seen <= flip_at < seen + len(data):
                data[flip_at - seen] ^= 0x01
            if cut_at is not None and seen + len(data) >= cut_at:
                await dst.send_all(data[: cut_at - seen])
                return
            await dst.send_all(data)
            seen += len(data)

    async def up(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        async for chunk in src:
            await dst.send_all(chunk)

    async def handle(client: trio.SocketStream) -> None:
        # The client may hang up while this still writes (it saw the flipped bit): that broken
        # pipe comes out of the nursery inside an exception group, hence except*.
        try:
            async with client, await trio.open_tcp_stream("127.0.0.1", target) as srv, \
                    trio.open_nursery() as nursery:
                nursery.start_soon(up, client, srv)
                await down(srv, client)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@network
@pytest.mark.parametrize(("flip_at", "cut_at", "cause"), [
    (RECORD_BYTES + TAG_BYTES + 7, None, TamperedMessageError),  # a bit of record 1
    (None, RECORD_BYTES + 100, MalformedMessageError),  # cut inside record 1
    (None, RECORD_BYTES + TAG_BYTES, MalformedMessageError),  # cut after a whole record
])
async def test_a_tampered_or_cut_stream_fails_the_fetch(
        flip_at: int | None, cut_at: int | None, cause: type[Exception]) -> None:
    server, client = serving(transport()), transport()
    with trio.fail_after(30):
        async with pair(server, client), trio.open_nursery() as nursery:
            bulk_server = server_of(server)
            bulk_server.port = await nursery.start(functools.partial(
                _proxy, bulk_server.port or 0, flip_at=flip_at, cut_at=cut_at))
            with pytest.raises(PeerUnreachableError) as info:
                await client.fetch_buffer(server.peer_id, KEY, len(BLOB))
            assert isinstance(info.value.__cause__, cause)
            assert client.stats.bulk_fetches == 0 and client.stats.fetches == 0
            # the peer's next fetches take the libp2p stream for a while
            assert await client.fetch(server.peer_id, KEY, len(BLOB)) == BLOB
            assert client.stats.bulk_fallbacks == 1 and client.stats.bulk_fetches == 0
            nursery.cancel_scope.cancel()


async def _ticket(client: Libp2pTransport, server: Libp2pTransport) -> tuple[bytes, bytes, int]:
    """Ask for a ticket as the client would: (ticket, the right proof, bulk port)."""
    client_rand = os.urandom(32)
    (status, size, port, server_rand, ticket), _ = await bulk._ask(
        client._links, server.peer_id, REQUEST.pack(KEY, len(BLOB), client_rand))
    assert status == STATUS_OK and size == len(BLOB)
    keys = derive_keys(client_rand, server_rand, ticket, client=client.peer_id,
                       server=server.peer_id, digest=KEY)
    return ticket, keys.proof(ticket), port


async def _present(port: int, hello: bytes) -> int:
    """Send a hello to the bulk port; how many bytes come back before the server closes."""
    got = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as tcp:
        await tcp.send_all(hello)
        async for chunk in tcp:
            got += len(chunk)
    return got


@network
async def test_a_ticket_is_good_once_and_only_with_its_keys() -> None:
    server, client = serving(transport()), transport()
    with trio.fail_after(30):
        async with pair(server, client):
            refused = server.stats.bulk_refused
            ticket, proof, port = await _ticket(client, server)
            # stolen: someone who saw the ticket on the wire, without the keys
            assert await _present(port, HELLO.pack(ticket, os.urandom(32))) == 0
            # ... burnt it: the owner's own hello is refused too
            assert await _present(port, HELLO.pack(ticket, proof)) == 0
            ticket, proof, port = await _ticket(client, server)
            sealed = len(BLOB) + record_count(len(BLOB)) * TAG_BYTES
            assert await _present(port, HELLO.pack(ticket, proof)) == sealed
            assert await _present(port, HELLO.pack(ticket, proof)) == 0  # replayed
            assert await _present(port, HELLO.pack(os.urandom(32), proof)) == 0  # unknown
            assert await _present(port, b"short") == 0  # no hello within request_timeout_s
            assert server.stats.bulk_refused - refused == 5
            await eventually(lambda: server.stats.bulk_served == 1)
            assert len(server_of(server).tickets) == 0
            assert await client.fetch(server.peer_id, KEY, len(BLOB)) == BLOB  # still fine


@network
async def test_a_stranger_gets_no_ticket() -> None:
    server, member, stranger = serving(transport()), transport(), transport()
    server.set_peer_policy({member.peer_id}.__contains__)
    with trio.fail_after(30):
        async with server, member, stranger:
            for t in (member, stranger):
                await t.connect(server.listen_addrs()[0])
            with pytest.raises(StreamError):  # reset before a byte of the request was read
                await bulk._ask(stranger._links, server.peer_id,
                                REQUEST.pack(KEY, len(BLOB), os.urandom(32)))
            with pytest.raises(PeerUnreachableError):
                await stranger.fetch(server.peer_id, KEY, len(BLOB))
            assert len(server_of(server).tickets) == 0 and server.stats.served == 0
            assert server.stats.refused_strangers == 2
            assert stranger.stats.bulk_fallbacks == 0  # a refusal is no reason to fall back
            assert await member.fetch(server.peer_id, KEY, len(BLOB)) == BLOB
            assert member.stats.bulk_fetches == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@network
async def test_the_libp2p_stream_serves_when_the_bulk_channel_cannot() -> None:
    server, client = serving(transport()), transport()
    old = serving(transport(bulk_on=False))  # does not speak /p2pfed/bulk/1
    # its bulk port is taken (by strangers, say): closed on accept
    full = serving(transport(limits=dataclasses.replace(FAST, bulk_connections_total=0)))
    with trio.fail_after(30):
        async with pair(server, client), old, full:
            server_of(server).port = _closed_port()  # advertised, but nobody listens there
            for _ in range(2):  # the second one does not even try the bulk channel
                assert await client.fetch(server.peer_id, KEY, len(BLOB)) == BLOB
            assert client.stats.bulk_fallbacks == 2 and client.stats.bulk_fetches == 0
            assert server.stats.served == 2 and server.stats.bulk_served == 0
            await client.connect(old.listen_addrs()[0])
            assert await client.fetch(old.peer_id, KEY, len(BLOB)) == BLOB
            assert client.stats.bulk_fallbacks == 3 and old.stats.served == 1
            await client.connect(full.listen_addrs()[0])
            assert await client.fetch(full.peer_id, KEY, len(BLOB)) == BLOB
            assert client.stats.bulk_fallbacks == 4 and full.stats.bulk_refused == 1
            assert full.stats.served == 1 and client.stats.bulk_fetches == 0
