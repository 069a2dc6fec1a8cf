"""The network transport: a py-libp2p host (TCP, Noise, Yamux) behind the Transport interface.

Wire protocols, all over Noise-encrypted Yamux streams (never Mplex):

* ``/p2pfed/control/1`` and ``/p2pfed/payload/1``, one message or fetch per stream (see
  :mod:`gossip.transport.wire`).
* ``/p2pfed/bulk/1`` (``bulk=True``, the default): a fetch asks over libp2p for a one-time
  ticket, then takes the payload in AES-GCM records from a TCP port of the server's own, keyed
  through the Noise-authenticated exchange (see :mod:`gossip.transport.bulk`); when that
  channel cannot be used the fetch falls back to ``/p2pfed/payload/1``.
* GossipSub on one topic per transport (strict signing, a validator that refuses records over
  64 KiB and those the record validator refuses) for small signed records to every member
  (:mod:`gossip.transport.topic`).

Trust boundary: with a peer policy set (:meth:`Libp2pTransport.set_peer_policy`), strangers may
open a connection and send control messages within a small budget of their own (a joiner sends
its join request that way); they fetch no payload, learn no topic and receive no record
(:mod:`gossip.transport.pubsub_guard`).  Every peer's resources are bounded: streams per
connection and per peer, bytes buffered per stream (:mod:`gossip.transport.yamux_guard`
enforces the receive windows py-libp2p only logs), log lines per peer.  Peers that keep
violating the protocols are disconnected and refused for a while (:mod:`gossip.transport.guard`).

Failure boundaries: py-libp2p raises a wide variety of exceptions, some as exception groups,
so every call into it is wrapped (here and in :mod:`gossip.transport.links`).  A failed
exchange with a peer becomes a :class:`~gossip.errors.PeerUnreachableError` (or
:class:`~gossip.errors.OversizedMessageError`) for that peer; a misbehaving remote is logged (a
few lines per peer), counted and dropped; neither ever stops the host.  ``trio.Cancelled``
always propagates.

LAN discovery (``mdns=True``): py-libp2p's mDNS announces the host and listens on every
interface (zeroconf's threads; it cannot be bound to one).  A member it finds is wanted at the
addresses it announced, on top of those the node gives (:meth:`set_wanted_peers`); a stranger
is left alone: discovery brings no one past the trust boundary.

The host is closed inside ``host.run()`` and before py-libp2p's tasks are cancelled (otherwise
its sockets leak: the listener's, and every connection's).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import multiaddr
import trio
from libp2p.tools.anyio_service import background_trio_service

from gossip.errors import LocalError, OversizedMessageError, PeerUnreachableError
from gossip.identity import Identity
from gossip.transport.base import Payload, PayloadServer, PeerPolicy, RecordValidator
from gossip.transport.bulk import BULK_PROTOCOL, BulkClient, BulkServer, bind_host
from gossip.transport.bulk_io import PayloadBuffer
from gossip.transport.dialer import Dialer, backoff_delay, split_p2p_addr
from gossip.transport.framing import encode_frame
from gossip.transport.guard import PeerGuard
from gossip.transport.host import libp2p_key_pair, mdns_discovery, new_libp2p_host, sole_exception
from gossip.transport.limits import Limits, TransportStats
from gossip.transport.links import PeerLinks
from gossip.transport.pubsub_guard import MembersOnlyGossipSub, MembersOnlyPubsub
from gossip.transport.topic import RecordTopic
from gossip.transport.wire import (
    CONTROL_PROTOCOL,
    KEY_BYTES,
    MAX_CONTROL_BYTES,
    PAYLOAD_PROTOCOL,
    Handlers,
    fetch_payload,
    send_control,
)

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own types
    from trio_typing import TaskStatus

__all__ = [
    "BULK_PROTOCOL", "CONTROL_PROTOCOL", "MAX_CONTROL_BYTES", "PAYLOAD_PROTOCOL",
    "Libp2pTransport", "Limits",
    "TransportStats", "backoff_delay", "libp2p_key_pair", "split_p2p_addr",
]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
#: Best-effort time given to closing the host.
CLOSE_S = 5.0
#: Bounds on starting the host, and on stopping it (closing it included).
STARTUP_S, STOP_S = 30.0, 10.0


class Libp2pTransport:
    """One node's libp2p host.

    Run it with ``await nursery.start(transport.run)`` or ``async with transport:``.
    ``bulk`` serves and fetches payloads over the bulk channel (TCP on the host of the first
    listen address, at ``bulk_port``; 0: chosen by the OS), falling back to the libp2p stream.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        topic: str,
        listen_addrs: Sequence[str] = (DEFAULT_LISTEN,),
        inbox_size: int = 1024,
        seed: int | None = None,
        mdns: bool = False,
        limits: Limits | None = None,
        bulk: bool = True,
        bulk_port: int = 0,
    ) -> None:
        self.identity = identity
        self.topic = topic
        self.limits = limits = limits or Limits()
        self.stats = TransportStats()
        self._guard = PeerGuard(limits, self.stats, local_peer=identity.peer_id)
        self._listen = list(listen_addrs)
        self._mdns = mdns
        #: members found on the LAN (mDNS) -> the addresses they announced
        self._lan: dict[str, tuple[str, ...]] = {}
        self._send_inbox, self._recv_inbox = trio.open_memory_channel[tuple[str, bytes]](
            inbox_size
        )
        self._server: PayloadServer | None = None
        self._links = PeerLinks(limits)
        self._topic = RecordTopic(topic, identity.peer_id, self._guard, limits, self.stats,
                                  deliver=self._deliver)
        self._nursery: trio.Nursery | None = None
        self._dialer = Dialer(identity.peer_id, limits, self.stats, random.Random(seed),
                              connect=self._links.connect, connected=self.connected_peers,
                              remember=self._links.remember, banned=self._guard.banned)
        self._context: contextlib.AbstractAsyncContextManager[Self] | None = None
        self._active = False
        bulk_host = bind_host(self._listen) if bulk else None
        self._bulk = None if bulk_host is None else BulkServer(
            identity.peer_id, self._guard, limits, self.stats, self._lookup,
            host=bulk_host, port=bulk_port)
        self._bulk_client = None if self._bulk is None else BulkClient(
            identity.peer_id, self._links, self._guard, limits, self.stats)

    # ----------------------------------------------------------------------- interface
    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def incoming(self) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        """(sender peer id, bytes) of control messages and records; bounded, oldest kept."""
        return self._recv_inbox

    @property
    def dropped(self) -> int:
        return self.stats.dropped

    def set_payload_server(self, server: PayloadServer) -> None:
        self._server = server

    def set_peer_policy(self, is_member: PeerPolicy | None) -> None:
        """Treat peers for which ``is_member(peer id)`` is False as strangers.

        Strangers may connect and send control messages within their own small budget (a
        joiner sends its join request that way); they fetch no payload, learn no topic and
        receive no record.  None (the default) counts every peer as a member.  Call
        :meth:`membership_changed` when the answers change.
        """
        self._guard.set_policy(is_member)
        self.membership_changed()

    def set_record_validator(self, validate: RecordValidator | None) -> None:
        """Accept (deliver and relay) only the records ``validate(origin, data)`` accepts.

        It runs for every record received on the topic (not for this node's own), before
        GossipSub relays it: keep it quick.  A peer whose own records keep failing it, or a
        stranger relaying any, is disconnected and refused for a while.
        """
        self._guard.set_record_validator(validate)

    def membership_changed(self) -> None:
        """Open pubsub streams to new members and stop gossiping with former ones, now."""
        self._dialer.wake()

    def misbehaved(self, peer: str, reason: str) -> None:
        """The node refused input no honest peer sends (``reason``, an error code) from ``peer``.

        Counted with the transport's own strikes: enough within a window disconnect the peer
        and refuse it for a while.
        """
        self._guard.strike(peer, f"sent what the node refused ({reason})")

    def banned(self, peer: str) -> bool:
        """Whether ``peer`` is refused for misbehaving, for now."""
        return self._guard.banned(peer)

    def listen_addrs(self) -> list[str]:
        """Full listening addresses, ``.../p2p/<peer id>``; empty when not running."""
        if self._host is None:
            return []
        suffix = f"/p2p/{self.peer_id}"
        return [a if a.endswith(suffix) else a + suffix for a in map(str, self._host.get_addrs())]

    def connected_peers(self) -> list[str]:
        if self._host is None:
            return []
        return sorted(str(p) for p in self._host.get_connected_peers())

    async def send(self, peer: str, data: bytes) -> None:
        """Deliver one control message; returns once the receiver has taken the frame."""
        frame = encode_frame(data, MAX_CONTROL_BYTES)
        try:
            with trio.fail_after(self.limits.control_timeout_s):
                async with self._links.stream(peer, CONTROL_PROTOCOL) as stream:
                    await send_control(stream, frame)
        except PeerUnreachableError:
            raise
        except Exception as exc:  # py-libp2p's errors, groups of them, trio.TooSlowError
            raise PeerUnreachableError(f"cannot send to {peer}: {exc!r}", peer=peer) from exc
        self.stats.sent += 1

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> Payload:
        """Fetch a payload by key into a buffer of its own (:meth:`fetch_buffer`): no copy,
        and the caller may decode it in place."""
        buf = await self.fetch_buffer(peer, key, max_bytes)
        return buf if isinstance(buf, bytearray) else memoryview(buf)

    async def fetch_buffer(self, peer: str, key: bytes, max_bytes: int) -> PayloadBuffer:
        """Fetch a payload into one preallocated buffer, for zero-copy decoding.

        The buffer is a bytearray, or (from the bulk channel, 1 MiB and up) an anonymous mmap.

        Raises OversizedMessageError when the payload is larger than ``max_bytes`` (checked
        before the body is read) and PeerUnreachableError for anything else that goes wrong:
        unknown key, unreachable peer, reset or truncated stream, timeout.
        """
        if len(key) != KEY_BYTES:
            raise ValueError(f"a payload key is {KEY_BYTES} bytes, got {len(key)}")
        if max_bytes < 0:
            raise ValueError("max_bytes must be non-negative")
        try:
            with trio.fail_after(self.limits.fetch_timeout_s):
                buf = await self._fetch(peer, key, max_bytes)
        except (PeerUnreachableError, OversizedMessageError):
            raise
        except Exception as exc:  # truncated stream, libp2p errors, timeout
            raise PeerUnreachableError(f"cannot fetch from {peer}: {exc!r}", peer=peer) from exc
        self.stats.fetches += 1
        self.stats.fetch_bytes += len(buf)
        return buf

    async def _fetch(self, peer: str, key: bytes, max_bytes: int) -> PayloadBuffer:
        """Over the bulk channel if it can be used, else over ``/p2pfed/payload/1``."""
        if self._bulk_client is not None:
            buf = await self._bulk_client.fetch(peer, key, max_bytes)
            if buf is not None:
                return buf
        async with self._links.stream(peer, PAYLOAD_PROTOCOL) as stream:
            return await fetch_payload(stream, key, max_bytes)

    async def broadcast(self, data: bytes) -> None:
        """Publish a small record on the topic (GossipSub, signed by the host key)."""
        await self._topic.publish(data)

    # ----------------------------------------------------------------------- peers
    async def connect(self, addr: str, *, timeout_s: float | None = None) -> str:
        """Dial ``.../p2p/<peer id>`` now; returns the peer id.  Raises PeerUnreachableError."""
        try:
            peer, base = split_p2p_addr(addr)
        except ValueError as exc:
            raise PeerUnreachableError(str(exc)) from exc
        await self._links.connect(peer, (base,), timeout_s or self.limits.connect_timeout_s)
        return peer

    def want_peer(self, peer: str, addrs: Sequence[str]) -> None:
        """Keep a connection to ``peer`` at ``addrs`` (transport addresses, no /p2p/ part)."""
        self._dialer.want(peer, addrs)

    def drop_peer(self, peer: str) -> None:
        """Stop keeping a connection to ``peer`` (an open connection stays until it closes)."""
        self._dialer.drop(peer)

    def set_wanted_peers(self, peers: dict[str, tuple[str, ...]]) -> None:
        """Keep connections to exactly these peers (reconnecting with backoff), at these
        addresses and those mDNS found them at."""
        self._dialer.set_wanted({p: _merged(addrs, self._lan.get(p, ()))
                                 for p, addrs in peers.items()})

    def add_bootstrap(self, addrs: Sequence[str]) -> list[str]:
        """Want the peers of these ``.../p2p/<id>`` addresses (an invite's); their peer ids."""
        return self._dialer.add_bootstrap(addrs)

    @property
    def _wanted(self) -> dict[str, tuple[str, ...]]:
        return self._dialer.wanted

    @property
    def _host(self) -> Any:
        """py-libp2p's host while running, else None (tests reach into it)."""
        return self._links.host

    @property
    def _pubsub(self) -> MembersOnlyPubsub | None:
        return self._topic.pubsub

    # ----------------------------------------------------------------------- running
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the host, pubsub and gossipsub; ``started()`` once listening.

        Raises LocalError when it cannot listen.  Errors come out of py-libp2p's nested
        nurseries wrapped in exception groups; a group holding a single exception is unwrapped.
        """
        if self._active:
            raise RuntimeError("this transport is already running")
        self._active = True
        try:
            await self._run_host(task_status)
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from sole.__cause__
        finally:
            self._active = False

    async def _run_host(self, task_status: TaskStatus[None]) -> None:
        host, pubsub, router = self._new_host()
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(self._serve, host, pubsub, router, stopping)
                task_status.started()
                await trio.sleep_forever()
            finally:
                stopping.set()

    async def _serve(self, host: Any, pubsub: MembersOnlyPubsub, router: MembersOnlyGossipSub,
                     stopping: trio.Event, *,
                     task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host until ``stopping``, then close it before cancelling its tasks.

        Shielded: cancelled from outside, py-libp2p's tasks would drop their connections
        without closing the sockets, and ``host.close()`` would find nothing left to close.
        """
        started = False
        with trio.CancelScope(shield=True) as shield:
            shield.deadline = trio.current_time() + STARTUP_S
            addrs = [multiaddr.Multiaddr(a) for a in self._listen]
            async with host.run(listen_addrs=addrs):
                try:
                    if not host.get_addrs():  # py-libp2p logs a failed listen and carries on
                        raise LocalError(f"cannot listen on {', '.join(self._listen)}")
                    async with background_trio_service(pubsub), \
                            background_trio_service(router):
                        await pubsub.wait_until_ready()
                        subscription = await pubsub.subscribe(self.topic)
                        async with trio.open_nursery() as nursery:
                            if self._bulk is not None:
                                await nursery.start(self._bulk.run)
                            self._links.host, self._topic.pubsub = host, pubsub
                            self._nursery, self._guard.on_ban = nursery, self._on_ban
                            for peer, wanted in self._dialer.wanted.items():
                                self._links.remember(peer, wanted)
                            nursery.start_soon(self._topic.receive, subscription)
                            nursery.start_soon(self._dialer.run, self._topic.sync_members)
                            with self._discovery():
                                log.info("libp2p host %s listening on %s",
                                         self.peer_id, ", ".join(self.listen_addrs()))
                                shield.deadline = math.inf
                                task_status.started()
                                started = True
                                await stopping.wait()
                            shield.deadline = trio.current_time() + STOP_S
                            nursery.cancel_scope.cancel()
                finally:
                    self._links.host = self._topic.pubsub = None
                    self._nursery = self._guard.on_ban = None
                    with trio.move_on_after(CLOSE_S):
                        try:
                            await host.close()  # inside host.run(), or the sockets leak
                        except Exception as exc:
                            log.warning("closing the libp2p host failed: %r", exc)
        if not started:
            raise LocalError(f"the libp2p host did not start within {STARTUP_S:.0f} s")

    def _new_host(self) -> tuple[Any, MembersOnlyPubsub, MembersOnlyGossipSub]:
        """A host with the guarded muxer, the stream protocols and members-only GossipSub."""
        host = new_libp2p_host(self.identity, self._listen, mdns=self._mdns, guard=self._guard)
        handlers = Handlers(self._guard, self.limits, self.stats,
                            deliver=self._deliver, lookup=self._lookup)
        host.set_stream_handler(CONTROL_PROTOCOL, handlers.on_control)
        host.set_stream_handler(PAYLOAD_PROTOCOL, handlers.on_payload)
        if self._bulk is not None:
            host.set_stream_handler(BULK_PROTOCOL, self._bulk.on_request)
        pubsub, router = self._topic.new_pubsub(host)
        return host, pubsub, router

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Self]:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the body's own error comes back wrapped by the nursery: hand it back as raised
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from sole.__cause__

    async def __aenter__(self) -> Self:
        self._context = self._running()
        return await self._context.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        context, self._context = self._context, None
        if context is None:
            return None
        return await context.__aexit__(*exc_info)

    # ----------------------------------------------------------------------- internals
    def _deliver(self, peer: str, data: bytes) -> bool:
        try:
            self._send_inbox.send_nowait((peer, data))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.stats.dropped += 1
            log.debug("inbox full: dropped a message from %s", peer)
            return False
        return True

    def _lookup(self, key: bytes) -> bytes | None:
        server = self._server
        return None if server is None else server(key)

    def _on_ban(self, peer: str) -> None:
        """The guard banned ``peer``: close its connections (new ones are refused)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._links.disconnect, peer)
        self._dialer.wake()

    @contextlib.contextmanager
    def _discovery(self) -> Iterator[None]:
        """With mDNS on, want the members it finds."""
        with mdns_discovery(self._found_on_lan) if self._mdns else contextlib.nullcontext():
            yield

    def _found_on_lan(self, peer: str, addrs: tuple[str, ...]) -> None:
        """mDNS found ``peer`` at ``addrs``: keep a connection to it if it is a member."""
        if peer == self.peer_id or not addrs or not self._guard.is_member(peer):
            return  # anyone on the LAN can announce itself: strangers get nothing
        if peer not in self._lan and len(self._lan) >= self.limits.max_wanted_peers:
            return
        self._lan[peer] = addrs
        log.info("found %s on the LAN at %s", peer, ", ".join(addrs))
        self.want_peer(peer, _merged(self._dialer.wanted.get(peer, ()), addrs))


def _merged(*groups: Sequence[str]) -> tuple[str, ...]:
    """The addresses of ``groups`` in order, each once."""
    return tuple(dict.fromkeys(a for group in groups for a in group))
