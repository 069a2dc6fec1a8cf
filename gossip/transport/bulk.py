"""The bulk channel: payloads over a plain TCP connection, keyed through the libp2p connection.

py-libp2p's Noise and Yamux cost copies and ChaCha20 on every byte (~0.17x raw TCP here), so
a fetch by digest asks over libp2p (``/p2pfed/bulk/1``: members only, Noise-authenticated to
both peer ids) for a one-time ticket, then takes the bytes from the server's bulk port in
AES-256-GCM records (messages and keys: :mod:`gossip.transport.bulk_proto`).

* :class:`BulkServer` answers ticket requests (a stream slot from the guard first, exactly like
  ``/p2pfed/payload/1``) and serves its TCP port: connections per IP and in total are capped,
  the hello must arrive within ``request_timeout_s``, an unknown ticket closes the connection
  before anything is computed, a known one is gone once presented, and the payload is sent only
  after the proof checks out and the peer, still a member, gets a stream slot.
* :func:`fetch_bulk` is the client.  It raises :class:`BulkUnavailableError` when the bulk
  channel cannot be used (the peer does not speak the protocol, has no ticket to spare, its
  port cannot be reached, or it closes the connection before the first record: say, its
  connection slots are taken by strangers) so the caller can use the libp2p stream instead;
  once a byte of the payload arrived, a bad record, a short stream or a timeout fails the
  fetch.

Errors of the remote never leave a handler; ``trio.Cancelled`` always propagates.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from gossip.errors import (
    MalformedMessageError,
    OversizedMessageError,
    PeerUnreachableError,
    TamperedMessageError,
)
from gossip.transport.bulk_io import (
    PayloadBuffer,
    new_buffer,
    receive_records,
    send_records,
)
from gossip.transport.bulk_proto import (
    ANSWER,
    HELLO,
    REQUEST,
    STATUS_BUSY,
    STATUS_NOT_FOUND,
    STATUS_OK,
    STATUS_TOO_LARGE,
    BulkUnavailableError,
    Ticket,
    TicketTable,
    derive_keys,
)
from gossip.transport.framing import read_exact
from gossip.transport.guard import PeerGuard
from gossip.transport.limits import Limits, TransportStats
from gossip.transport.links import PeerLinks
from gossip.transport.wire import CLEANUP_S, Stream, serve_one_request

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = [
    "BULK_PROTOCOL", "BulkClient", "BulkServer", "BulkUnavailableError", "bind_host",
    "fetch_bulk",
]

log = logging.getLogger(__name__)

BULK_PROTOCOL = TProtocol("/p2pfed/bulk/1")


def bind_host(listen_addrs: Sequence[str]) -> str | None:
    """The IP address of the first ``/ip4/`` or ``/ip6/`` listen address (None: there is none)."""
    for addr in listen_addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return None


# --------------------------------------------------------------------------- server
class BulkServer:
    """Ticket answers on ``/p2pfed/bulk/1`` and payload transfers on a TCP port of its own."""

    def __init__(self, peer_id: str, guard: PeerGuard, limits: Limits, stats: TransportStats,
                 lookup: Callable[[bytes], bytes | None], *, host: str, port: int = 0) -> None:
        self.peer_id, self.guard, self.limits, self.stats = peer_id, guard, limits, stats
        self._lookup, self._host, self._port = lookup, host, port
        #: the bound TCP port while serving, else None (tickets are refused: BUSY)
        self.port: int | None = None
        self.tickets = TicketTable(ttl_s=limits.bulk_ticket_ttl_s,
                                   per_peer=limits.bulk_tickets_per_peer,
                                   total=limits.bulk_tickets_total,
                                   held_bytes=limits.bulk_ticket_bytes)
        self._connections: Counter[str] = Counter()
        self._threads = trio.CapacityLimiter(limits.bulk_connections_total)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the bulk port until cancelled; ``started()`` once bound (or given up)."""
        try:
            listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        except OSError as exc:
            log.warning("no bulk channel (cannot listen on %s:%d: %s): payloads go over the "
                        "libp2p stream", self._host, self._port, exc)
            task_status.started()
            return
        self.port = listeners[0].socket.getsockname()[1]
        log.info("bulk channel listening on %s:%d", self._host, self.port)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_tickets)
                task_status.started()
                await trio.serve_listeners(self._on_connection, listeners)
        finally:
            self.port = None

    async def _expire_tickets(self) -> None:
        """Let go of expired tickets' payloads even when no other ticket comes."""
        while True:
            await trio.sleep(self.limits.bulk_ticket_ttl_s)
            self.tickets.expire(trio.current_time())

    # ----------------------------------------------------------------- the ticket request
    async def on_request(self, raw: Any) -> None:
        """``/p2pfed/bulk/1``: one request, one answer, members only."""
        async def respond(stream: Stream, request: bytes) -> None:
            with trio.fail_after(self.limits.request_timeout_s):
                await stream.write(self._answer(stream.peer, *REQUEST.unpack(request)))

        await serve_one_request(Stream(raw), self.guard, self.limits, self.stats, REQUEST.size,
                                respond, "bulk")

    def _answer(self, peer: str, digest: bytes, max_bytes: int, client_rand: bytes) -> bytes:
        data = self._serve(digest)
        if data is None:
            return ANSWER.pack(STATUS_NOT_FOUND, 0, 0, bytes(32), bytes(32))
        size = len(data)
        if size > max_bytes:
            return ANSWER.pack(STATUS_TOO_LARGE, size, 0, bytes(32), bytes(32))
        server_rand, ticket_id = os.urandom(32), os.urandom(32)
        keys = derive_keys(client_rand, server_rand, ticket_id, client=peer, server=self.peer_id,
                           digest=digest)
        now = trio.current_time()
        kept = data if self.tickets.can_hold(size, now) else None  # else: looked up again
        ticket = Ticket(peer, digest, size, keys, now + self.limits.bulk_ticket_ttl_s, kept)
        port = self.port
        if port is None or not self.tickets.issue(ticket_id, ticket, now):
            return ANSWER.pack(STATUS_BUSY, size, 0, bytes(32), bytes(32))
        return ANSWER.pack(STATUS_OK, size, port, server_rand, ticket_id)

    def _serve(self, digest: bytes) -> bytes | None:
        try:
            return self._lookup(digest)
        except Exception:  # a local fault (say, an unreadable blob): answer "not found"
            log.exception("the payload server failed on %s", digest.hex()[:12])
            return None

    # ----------------------------------------------------------------- the TCP port
    async def _on_connection(self, tcp: trio.SocketStream) -> None:
        """One bulk connection: a hello within ``request_timeout_s``, then the payload."""
        ip = _remote_ip(tcp)
        if (self._connections[ip] >= self.limits.bulk_connections_per_ip
                or self._connections.total() >= self.limits.bulk_connections_total):
            self._refused(ip, "too many bulk connections")
            return  # serve_listeners closes it
        self._connections[ip] += 1
        try:
            redeemed = await self._redeem(tcp, ip)
            if redeemed is not None:
                await self._transfer(tcp, ip, *redeemed)
        except Exception as exc:  # the client went away, timed out, reset
            log.debug("bulk connection from %s failed: %r", ip, exc)
        finally:
            self._connections[ip] -= 1
            if self._connections[ip] <= 0:
                del self._connections[ip]

    async def _redeem(self, tcp: trio.SocketStream, ip: str) -> tuple[bytes, Ticket] | None:
        hello = None
        with trio.move_on_after(self.limits.request_timeout_s):
            hello = await _receive_exact(tcp, HELLO.size)
        if hello is None:
            self._refused(ip, "no hello in time")
            return None
        ticket_id, proof = HELLO.unpack(hello)
        ticket = self.tickets.redeem(ticket_id, trio.current_time())  # gone, whatever follows
        if ticket is None:
            self._refused(ip, "an unknown, used or expired ticket")
            return None
        if not ticket.keys.proof_ok(ticket_id, proof):
            self._refused(ip, f"a wrong proof for a ticket of {ticket.peer}")
            return None
        return ticket_id, ticket

    async def _transfer(self, tcp: trio.SocketStream, ip: str, ticket_id: bytes,
                        ticket: Ticket) -> None:
        slot = self.guard.admit_stream(ticket.peer, ip, members_only=True)  # still a member?
        if slot is None:
            self.stats.bulk_refused += 1
            return
        try:
            data = ticket.data if ticket.data is not None else self._serve(ticket.digest)
            if data is None or len(data) != ticket.size:
                log.info("payload %s went away before its bulk transfer",
                         ticket.digest.hex()[:12])
                return
            with trio.fail_after(self.limits.fetch_timeout_s):
                await send_records(tcp, ticket.keys, ticket_id, memoryview(data),
                                   limiter=self._threads, idle_s=self.limits.fetch_timeout_s)
            self.stats.served += 1
            self.stats.bulk_served += 1
            self.stats.served_bytes += len(data)
            del data
            with trio.move_on_after(CLEANUP_S):  # let the client close first
                await tcp.receive_some(1)
        finally:
            self.guard.release(slot)

    def _refused(self, ip: str, why: str) -> None:
        self.stats.bulk_refused += 1
        self.guard.log(ip, logging.INFO, "refused a bulk connection from %s: %s", ip, why)


# --------------------------------------------------------------------------- client
class BulkClient:
    """Fetches over the bulk channel, and remembers the peers it failed with for a while."""

    def __init__(self, me: str, links: PeerLinks, guard: PeerGuard, limits: Limits,
                 stats: TransportStats) -> None:
        self.me, self.links, self.guard, self.limits, self.stats = me, links, guard, limits, stats
        #: peer -> when to try its bulk channel again
        self._retry_at: OrderedDict[str, float] = OrderedDict()
        self._threads = trio.CapacityLimiter(limits.outbound_streams_per_peer)

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> PayloadBuffer | None:
        """The payload, or None when the libp2p stream should be used instead.

        After a bad record or a short bulk stream the fetch fails (the caller may fetch again)
        and the peer's next fetches use the libp2p stream for ``bulk_retry_s``.
        """
        now = trio.current_time()
        if self._retry_at.get(peer, now) > now:
            self.stats.bulk_fallbacks += 1
            return None
        self._retry_at.pop(peer, None)
        try:
            buf = await fetch_bulk(self.links, self.me, peer, key, max_bytes, self.limits,
                                   self._threads)
        except BulkUnavailableError as exc:
            self._failed(peer, exc)
            self.stats.bulk_fallbacks += 1
            return None
        except (TamperedMessageError, MalformedMessageError) as exc:
            self._failed(peer, exc)
            raise
        self.stats.bulk_fetches += 1
        return buf

    def _failed(self, peer: str, exc: Exception) -> None:
        self._retry_at[peer] = trio.current_time() + self.limits.bulk_retry_s
        while len(self._retry_at) > self.limits.max_wanted_peers:
            self._retry_at.popitem(last=False)
        self.guard.log(peer, logging.INFO, "fetching from %s over the libp2p stream for %.0f s: "
                       "%s", peer, self.limits.bulk_retry_s, exc)


async def fetch_bulk(links: PeerLinks, me: str, peer: str, key: bytes, max_bytes: int,
                     limits: Limits, threads: trio.CapacityLimiter) -> PayloadBuffer:
    """Fetch ``key`` from ``peer`` over the bulk channel, into one preallocated buffer.

    Raises BulkUnavailableError when the libp2p stream should be used instead, and otherwise
    what a fetch raises (OversizedMessageError, PeerUnreachableError, TamperedMessageError...).
    """
    client_rand = os.urandom(32)
    (status, size, port, server_rand, ticket_id), ip = await _ask(
        links, peer, REQUEST.pack(key, max_bytes, client_rand))
    if status == STATUS_NOT_FOUND:
        raise PeerUnreachableError(f"{peer} does not have {key.hex()[:12]}", peer=peer)
    if status == STATUS_TOO_LARGE or size > max_bytes:
        raise OversizedMessageError(
            f"payload of {size} bytes from {peer} exceeds the cap of {max_bytes}", peer=peer)
    if status == STATUS_BUSY:
        raise BulkUnavailableError(f"{peer} has no bulk ticket to spare", peer=peer)
    if status != STATUS_OK or ip is None or port == 0:
        raise PeerUnreachableError(f"{peer} answered an unknown bulk status {status}", peer=peer)
    keys = derive_keys(client_rand, server_rand, ticket_id, client=me, server=peer, digest=key)
    try:
        with trio.fail_after(limits.bulk_connect_timeout_s):
            tcp = await trio.open_tcp_stream(ip, port)
    except (OSError, trio.TooSlowError) as exc:
        raise BulkUnavailableError(f"cannot reach the bulk port {ip}:{port} of {peer}: {exc!r}",
                                   peer=peer) from exc
    async with tcp:
        try:
            await tcp.send_all(HELLO.pack(ticket_id, keys.proof(ticket_id)))
        except trio.BrokenResourceError as exc:  # refused at once
            raise BulkUnavailableError(f"{peer} refused a bulk connection", peer=peer) from exc
        buf = new_buffer(size)  # size <= max_bytes, checked above; the server runs ahead
        await receive_records(tcp, keys, ticket_id, memoryview(buf), limiter=threads,
                              idle_s=limits.fetch_timeout_s, peer=peer)
    return buf


async def _ask(links: PeerLinks, peer: str, request: bytes
               ) -> tuple[tuple[int, int, int, bytes, bytes], str | None]:
    """The server's answer to ``request`` on ``/p2pfed/bulk/1``, and the IP it answered from.

    BulkUnavailableError when the peer does not speak the protocol; a stream opened and then
    reset (a refusal: not a member, no slot) is a PeerUnreachableError.
    """
    opened = False
    try:
        async with links.stream(peer, BULK_PROTOCOL) as stream:
            opened = True
            await stream.write(request)
            await stream.close_write()
            answer = ANSWER.unpack(await read_exact(stream, ANSWER.size))
            ip = stream.remote_ip
    except Exception as exc:
        if not opened and _unsupported(exc):
            raise BulkUnavailableError(f"{peer} does not speak {BULK_PROTOCOL}",
                                       peer=peer) from exc
        raise
    return answer, ip


def _unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` (py-libp2p's, maybe grouped or chained) says the protocol was refused."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MultiselectClientError):
            return True
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


async def _receive_into(tcp: trio.SocketStream, view: memoryview) -> None:
    got, size = 0, len(view)
    while got < size:
        n = await tcp.socket.recv_into(view[got:])
        if not n:
            raise MalformedMessageError(f"bulk stream ended after {got} of {size} bytes")
        got += n


async def _receive_exact(tcp: trio.SocketStream, size: int) -> bytes | None:
    """Exactly ``size`` bytes; None when the stream ends first."""
    buf = memoryview(bytearray(size))
    try:
        await _receive_into(tcp, buf)
    except MalformedMessageError:
        return None
    return bytes(buf)


def _remote_ip(tcp: trio.SocketStream) -> str:
    try:
        return str(tcp.socket.getpeername()[0])
    except OSError:
        return "?"
