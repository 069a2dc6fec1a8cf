"""The network transport: a py-libp2p host (TCP, Noise, Yamux) behind the Transport interface.

Wire protocols, all over Noise-encrypted Yamux streams (never Mplex):

* ``/p2pfed/control/1`` — one control message per stream: a frame (4-byte big-endian length,
  at most 64 KiB, then the bytes).  The receiver reads exactly one frame, queues it and closes
  the stream; the sender waits for that close, so a reset (refused frame) is an error.
* ``/p2pfed/payload/1`` — fetch by digest: the client sends a 32-byte key and the 8-byte
  largest size it accepts; the server answers a status byte (0 ok, 1 not found, 2 too large),
  an 8-byte length and the raw bytes.  The length is checked before the body is read, and the
  body is read into one preallocated buffer.
* GossipSub on one topic per transport (strict signing, a validator that refuses records over
  64 KiB) for small signed records to every member.

Failure boundaries: py-libp2p raises a wide variety of exceptions, some as exception groups,
so every call into it is wrapped here.  A failed exchange with a peer becomes a
:class:`~gossip.errors.PeerUnreachableError` (or :class:`~gossip.errors.OversizedMessageError`)
for that peer; a misbehaving remote (oversized frame, short read, too many streams) is logged,
counted and dropped; neither ever stops the host.  ``trio.Cancelled`` always propagates.

Memory is bounded: frames and records are capped, payloads are capped by the caller's
``max_bytes`` before anything is allocated, inbound streams are capped per peer and in total,
the inbox drops new messages when full, and the set of wanted peers is capped.

The host is closed inside ``host.run()`` (otherwise its listening sockets leak).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import struct
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from gossip.errors import (
    LocalError,
    OversizedMessageError,
    PeerUnreachableError,
    RemoteError,
)
from gossip.identity import Identity
from gossip.transport.base import PayloadServer
from gossip.transport.framing import (
    MAX_FRAME_BYTES,
    encode_frame,
    read_exact,
    read_frame,
    read_into,
)

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own types
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


def _reattach_libp2p_logging() -> None:
    """Let py-libp2p's warnings reach the application's handlers again.

    ``import libp2p`` clears the handlers of its ``libp2p`` logger and turns propagation off
    (unless ``LIBP2P_DEBUG`` is set, when it installs handlers of its own).  Its level stays at
    WARNING, so only what matters propagates to the handlers configured at the entry point.
    """
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").propagate = True
        # sets its own level to INFO and logs its state every 30 s
        logging.getLogger("libp2p.network.auto_connector").setLevel(logging.NOTSET)
        # logs every failed dial at ERROR, several times; the dial loop here logs it once
        logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)


_reattach_libp2p_logging()

CONTROL_PROTOCOL = TProtocol("/p2pfed/control/1")
PAYLOAD_PROTOCOL = TProtocol("/p2pfed/payload/1")
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
MAX_CONTROL_BYTES = MAX_FRAME_BYTES
KEY_BYTES = 32
PAYLOAD_REQUEST = struct.Struct(">32sQ")
PAYLOAD_RESPONSE = struct.Struct(">BQ")
STATUS_OK, STATUS_NOT_FOUND, STATUS_TOO_LARGE = 0, 1, 2
#: How often the dial loop re-checks connections when nothing else wakes it.
RECHECK_S = 1.0
#: Best-effort time given to closing or resetting a stream after an error.
CLEANUP_S = 1.0


@dataclass(frozen=True)
class Limits:
    """Timeouts, caps and tuning of one transport."""

    connect_timeout_s: float = 10.0
    control_timeout_s: float = 15.0
    fetch_timeout_s: float = 300.0
    inbound_streams_per_peer: int = 16
    inbound_streams_total: int = 256
    max_wanted_peers: int = 1024
    max_concurrent_dials: int = 8
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0
    #: Bytes handed to one ``stream.write`` when serving a payload.  Yamux cuts them into
    #: 64 KiB frames anyway; fewer, larger writes save per-call overhead.  Measured here (64 MB,
    #: two processes, MB/s): 64 KiB ~115, 256 KiB ~150, 1 MiB ~160, 4 MiB ~169, 16 MiB ~169.
    write_chunk: int = 4 << 20
    #: GossipSub: the most records a peer may forward on the topic per second.
    max_records_per_second: float = 50.0


@dataclass
class TransportStats:
    """Counters of one transport (read by tests and metrics)."""

    sent: int = 0
    received: int = 0
    #: messages lost because the inbox was full
    dropped: int = 0
    #: inbound streams refused: oversized or short frames, too many streams, bad requests
    rejected: int = 0
    broadcasts_sent: int = 0
    broadcasts_received: int = 0
    fetches: int = 0
    fetch_bytes: int = 0
    served: int = 0
    served_bytes: int = 0
    dial_failures: int = 0


def backoff_delay(attempt: int, rng: random.Random, *, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff with jitter: in [d/2, d] for d = min(cap, base * 2**attempt)."""
    delay = min(cap_s, base_s * math.pow(2.0, min(attempt, 62)))
    return delay / 2 + rng.uniform(0.0, delay / 2)


def libp2p_key_pair(identity: Identity) -> KeyPair:
    """The libp2p host key of ``identity`` (same ed25519 key, same peer id)."""
    private = Ed25519PrivateKey.from_bytes(identity.seed)
    return KeyPair(private, private.get_public_key())


def _peer_id(peer: str) -> ID:
    try:
        return ID.from_base58(peer)
    except Exception as exc:  # base58 and multihash raise assorted errors
        raise PeerUnreachableError(f"not a peer id: {peer!r}", peer=peer) from exc


def split_p2p_addr(addr: str) -> tuple[str, str]:
    """``/ip4/.../tcp/N/p2p/<id>`` -> (peer id, transport address); ValueError otherwise."""
    base, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer or "/" in peer:
        raise ValueError(f"address {addr!r} does not end in /p2p/<peer id>")
    return peer, base


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside (possibly nested) single-member groups, else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


class _Stream:
    """A libp2p stream seen through the few calls used here (the untyped surface stays here).

    ``read`` returns ``b""`` at end of stream (py-libp2p raises an EOFError subclass instead).
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    @property
    def peer(self) -> str:
        return str(self._raw.muxed_conn.peer_id)

    async def read(self, n: int) -> bytes:
        try:
            data: bytes = await self._raw.read(n)
        except EOFError:
            return b""
        return data

    async def write(self, data: bytes | memoryview) -> None:
        await self._raw.write(data)

    async def close_write(self) -> None:
        await self._raw.close_write()

    async def close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
            try:
                await self._raw.close()
            except Exception as exc:  # closing a broken stream fails in many ways
                log.debug("closing a stream failed: %r", exc)

    async def reset(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
            try:
                await self._raw.reset()
            except Exception as exc:
                log.debug("resetting a stream failed: %r", exc)


class Libp2pTransport:
    """One node's libp2p host.

    Run it with ``await nursery.start(transport.run)`` or ``async with transport:``.
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
        limits: Limits = Limits(),
    ) -> None:
        self.identity = identity
        self.topic = topic
        self.limits = limits
        self.stats = TransportStats()
        self._listen = list(listen_addrs)
        self._mdns = mdns
        self._send_inbox, self._recv_inbox = trio.open_memory_channel[tuple[str, bytes]](
            inbox_size
        )
        self._server: PayloadServer | None = None
        self._rng = random.Random(seed)
        self._host: Any = None
        self._pubsub: Any = None
        self._inbound: Counter[str] = Counter()
        self._wanted: dict[str, tuple[str, ...]] = {}
        self._attempts: dict[str, int] = {}
        self._next_dial: dict[str, float] = {}
        self._dialing: set[str] = set()
        self._wake = trio.Event()
        self._context: contextlib.AbstractAsyncContextManager[Self] | None = None
        self._active = False

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
                async with self._stream(peer, CONTROL_PROTOCOL) as stream:
                    await stream.write(frame)
                    await stream.close_write()
                    if await stream.read(1):
                        raise PeerUnreachableError(f"{peer} answered a control message",
                                                   peer=peer)
        except PeerUnreachableError:
            raise
        except Exception as exc:  # py-libp2p's errors, groups of them, trio.TooSlowError
            raise PeerUnreachableError(f"cannot send to {peer}: {exc!r}", peer=peer) from exc
        self.stats.sent += 1

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> bytes:
        """Fetch a payload by key (see :meth:`fetch_buffer`, which avoids the final copy)."""
        return bytes(await self.fetch_buffer(peer, key, max_bytes))

    async def fetch_buffer(self, peer: str, key: bytes, max_bytes: int) -> bytearray:
        """Fetch a payload into one preallocated buffer, for zero-copy decoding.

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
                async with self._stream(peer, PAYLOAD_PROTOCOL) as stream:
                    await stream.write(PAYLOAD_REQUEST.pack(key, max_bytes))
                    await stream.close_write()
                    head = await read_exact(stream, PAYLOAD_RESPONSE.size)
                    status, size = PAYLOAD_RESPONSE.unpack(head)
                    if status == STATUS_NOT_FOUND:
                        raise PeerUnreachableError(
                            f"{peer} does not have {key.hex()[:12]}", peer=peer
                        )
                    if status == STATUS_TOO_LARGE or (status == STATUS_OK and size > max_bytes):
                        raise OversizedMessageError(
                            f"payload of {size} bytes from {peer} exceeds the cap of "
                            f"{max_bytes}", peer=peer,
                        )
                    if status != STATUS_OK:
                        raise PeerUnreachableError(
                            f"{peer} answered an unknown status {status}", peer=peer
                        )
                    buf = bytearray(size)
                    await read_into(stream, buf)
        except (PeerUnreachableError, OversizedMessageError):
            raise
        except Exception as exc:  # truncated stream, libp2p errors, timeout
            raise PeerUnreachableError(f"cannot fetch from {peer}: {exc!r}", peer=peer) from exc
        self.stats.fetches += 1
        self.stats.fetch_bytes += size
        return buf

    async def broadcast(self, data: bytes) -> None:
        """Publish a small record on the topic (GossipSub, signed by the host key)."""
        if len(data) > MAX_CONTROL_BYTES:
            raise OversizedMessageError(
                f"record of {len(data)} bytes exceeds the cap of {MAX_CONTROL_BYTES}"
            )
        pubsub = self._pubsub
        if pubsub is None:
            raise PeerUnreachableError("cannot broadcast: the host is not running")
        try:
            await pubsub.publish(self.topic, data)
        except Exception as exc:
            raise PeerUnreachableError(f"publish failed: {exc!r}") from exc
        self.stats.broadcasts_sent += 1

    # ----------------------------------------------------------------------- peers
    async def connect(self, addr: str, *, timeout_s: float | None = None) -> str:
        """Dial ``.../p2p/<peer id>`` now; returns the peer id.  Raises PeerUnreachableError."""
        try:
            peer, base = split_p2p_addr(addr)
        except ValueError as exc:
            raise PeerUnreachableError(str(exc)) from exc
        await self._connect(peer, (base,), timeout_s or self.limits.connect_timeout_s)
        return peer

    def want_peer(self, peer: str, addrs: Sequence[str]) -> None:
        """Keep a connection to ``peer`` at ``addrs`` (transport addresses, no /p2p/ part)."""
        if peer == self.peer_id:
            return
        if peer not in self._wanted and len(self._wanted) >= self.limits.max_wanted_peers:
            log.warning("not keeping a connection to %s: already %d wanted peers",
                        peer, len(self._wanted))
            return
        self._wanted[peer] = tuple(addrs)
        self._remember(peer, self._wanted[peer])
        self._wake.set()

    def drop_peer(self, peer: str) -> None:
        """Stop keeping a connection to ``peer`` (an open connection stays until it closes)."""
        self._wanted.pop(peer, None)
        self._attempts.pop(peer, None)
        self._next_dial.pop(peer, None)

    def set_wanted_peers(self, peers: dict[str, tuple[str, ...]]) -> None:
        """Keep connections to exactly these peers (reconnecting with backoff)."""
        for peer in set(self._wanted) - set(peers):
            self.drop_peer(peer)
        for peer, addrs in peers.items():
            self.want_peer(peer, addrs)

    def add_bootstrap(self, addrs: Sequence[str]) -> list[str]:
        """Want the peers of these ``.../p2p/<id>`` addresses (an invite's); their peer ids."""
        found: dict[str, list[str]] = {}
        for addr in addrs:
            try:
                peer, base = split_p2p_addr(addr)
            except ValueError:
                log.warning("ignoring bootstrap address %r without /p2p/<peer id>", addr)
                continue
            found.setdefault(peer, []).append(base)
        for peer, bases in found.items():
            self.want_peer(peer, tuple(dict.fromkeys(bases + list(self._wanted.get(peer, ())))))
        return sorted(p for p in found if p != self.peer_id)

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
            sole = _sole_exception(group)
            if sole is None:
                raise
            raise sole from sole.__cause__
        finally:
            self._active = False

    async def _run_host(self, task_status: TaskStatus[None]) -> None:
        key_pair = libp2p_key_pair(self.identity)
        addrs = [multiaddr.Multiaddr(a) for a in self._listen]
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=new_x25519_key_pair().private_key
            )},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=addrs,
            enable_mDNS=self._mdns,
        )
        host.set_stream_handler(CONTROL_PROTOCOL, self._on_control)
        host.set_stream_handler(PAYLOAD_PROTOCOL, self._on_payload)
        router = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
            max_messages_per_topic_per_second=self.limits.max_records_per_second,
            # all members may share one address (a lab, or loopback): no IP diversity rule
            eclipse_protection_enabled=False,
        )
        pubsub = Pubsub(host, router, strict_signing=True)
        pubsub.set_topic_validator(self.topic, self._validate_record, False)
        async with host.run(listen_addrs=addrs):
            try:
                if not host.get_addrs():  # py-libp2p logs a failed listen and carries on
                    raise LocalError(f"cannot listen on {', '.join(self._listen)}")
                async with background_trio_service(pubsub), background_trio_service(router):
                    await pubsub.wait_until_ready()
                    subscription = await pubsub.subscribe(self.topic)
                    async with trio.open_nursery() as nursery:
                        self._host, self._pubsub = host, pubsub
                        for peer, wanted in self._wanted.items():
                            self._remember(peer, wanted)
                        nursery.start_soon(self._receive_records, subscription)
                        nursery.start_soon(self._keep_connected)
                        with self._discovery():
                            log.info("libp2p host %s listening on %s",
                                     self.peer_id, ", ".join(self.listen_addrs()))
                            task_status.started()
                            await trio.sleep_forever()
            finally:
                self._host = self._pubsub = None
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await host.close()  # inside host.run(), or the sockets leak
                    except Exception as exc:
                        log.warning("closing the libp2p host failed: %r", exc)

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
            sole = _sole_exception(group)
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
    @asynccontextmanager
    async def _stream(self, peer: str, protocol: TProtocol) -> AsyncIterator[_Stream]:
        """A new stream to ``peer`` (dialing if needed): closed on success, reset on error."""
        host = self._host
        if host is None:
            raise PeerUnreachableError("the host is not running", peer=peer)
        stream = _Stream(await host.new_stream(_peer_id(peer), [protocol]))
        ok = False
        try:
            yield stream
            ok = True
        finally:
            await (stream.close() if ok else stream.reset())

    async def _connect(self, peer: str, addrs: tuple[str, ...], timeout_s: float) -> None:
        host = self._host
        if host is None:
            raise PeerUnreachableError("the host is not running", peer=peer)
        try:
            info = PeerInfo(_peer_id(peer), [multiaddr.Multiaddr(a) for a in addrs])
            # the swarm refuses to redial a peer for 60 s after a failure ("negative
            # cache"); the backoff here decides when to try again
            host.get_network().unblock_peer(info.peer_id)
            with trio.fail_after(timeout_s):
                await host.connect(info)
        except PeerUnreachableError:
            raise
        except Exception as exc:  # dial errors arrive as exception groups, among others
            raise PeerUnreachableError(f"cannot connect to {peer}: {exc!r}", peer=peer) from exc

    def _remember(self, peer: str, addrs: tuple[str, ...]) -> None:
        """Put a wanted peer's addresses in the peerstore, so a stream to it can dial."""
        if self._host is None or not addrs:
            return
        try:
            maddrs = [multiaddr.Multiaddr(a) for a in addrs]
            self._host.get_peerstore().add_addrs(_peer_id(peer), maddrs, 0)  # 0: permanent
        except Exception as exc:  # bad address or peer id, from an invite or a record
            log.warning("ignoring the addresses of %s: %r", peer, exc)

    def _deliver(self, peer: str, data: bytes) -> bool:
        try:
            self._send_inbox.send_nowait((peer, data))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.stats.dropped += 1
            log.debug("inbox full: dropped a message from %s", peer)
            return False
        return True

    def _admit(self, peer: str) -> bool:
        """Count an inbound stream, unless the peer or the host has too many open."""
        limits = self.limits
        if (self._inbound[peer] >= limits.inbound_streams_per_peer
                or self._inbound.total() >= limits.inbound_streams_total):
            self.stats.rejected += 1
            log.info("refusing a stream from %s: too many open streams", peer)
            return False
        self._inbound[peer] += 1
        return True

    def _release(self, peer: str) -> None:
        self._inbound[peer] -= 1
        if self._inbound[peer] <= 0:
            del self._inbound[peer]

    async def _on_control(self, raw: Any) -> None:
        stream = _Stream(raw)
        peer = stream.peer
        if not self._admit(peer):
            await stream.reset()
            return
        try:
            with trio.fail_after(self.limits.control_timeout_s):
                data = await read_frame(stream, MAX_CONTROL_BYTES)
            if self._deliver(peer, data):
                self.stats.received += 1
            await stream.close()
        except RemoteError as exc:  # oversized or short frame
            self.stats.rejected += 1
            log.info("dropping a control stream from %s: %s", peer, exc)
            await stream.reset()
        except Exception as exc:  # reset by the remote, connection gone, timeout
            log.debug("control stream from %s failed: %r", peer, exc)
            await stream.reset()
        finally:
            self._release(peer)

    async def _on_payload(self, raw: Any) -> None:
        stream = _Stream(raw)
        peer = stream.peer
        if not self._admit(peer):
            await stream.reset()
            return
        try:
            with trio.fail_after(self.limits.fetch_timeout_s):
                request = await read_exact(stream, PAYLOAD_REQUEST.size)
                key, max_bytes = PAYLOAD_REQUEST.unpack(request)
                data = self._lookup(key)
                if data is None:
                    await stream.write(PAYLOAD_RESPONSE.pack(STATUS_NOT_FOUND, 0))
                elif len(data) > max_bytes:
                    await stream.write(PAYLOAD_RESPONSE.pack(STATUS_TOO_LARGE, len(data)))
                else:
                    await self._write_payload(stream, data)
                    self.stats.served += 1
                    self.stats.served_bytes += len(data)
            await stream.close()
        except RemoteError as exc:  # short request
            self.stats.rejected += 1
            log.info("dropping a payload request from %s: %s", peer, exc)
            await stream.reset()
        except Exception as exc:  # the client went away, timeout
            log.debug("payload stream to %s failed: %r", peer, exc)
            await stream.reset()
        finally:
            self._release(peer)

    def _lookup(self, key: bytes) -> bytes | None:
        server = self._server
        if server is None:
            return None
        try:
            return server(key)
        except Exception:  # a local fault (say, an unreadable blob): answer "not found"
            log.exception("the payload server failed on %s", key.hex()[:12])
            return None

    async def _write_payload(self, stream: _Stream, data: bytes) -> None:
        chunk = self.limits.write_chunk
        view = memoryview(data)
        # the header rides with the first chunk: one write, one Yamux frame less
        await stream.write(PAYLOAD_RESPONSE.pack(STATUS_OK, len(data)) + view[:chunk])
        for start in range(chunk, len(view), chunk):
            await stream.write(view[start : start + chunk])

    def _validate_record(self, _forwarder: Any, msg: Any) -> bool:
        return len(msg.data) <= MAX_CONTROL_BYTES

    async def _receive_records(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            try:
                origin = str(ID(msg.from_id))
            except Exception:  # strict signing makes this unreachable; be safe
                self.stats.rejected += 1
                continue
            if origin != self.peer_id and self._deliver(origin, bytes(msg.data)):
                self.stats.broadcasts_received += 1

    async def _keep_connected(self) -> None:
        """Dial wanted peers that are not connected, with capped, jittered backoff."""
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                now = trio.current_time()
                connected = set(self.connected_peers())
                for peer, addrs in list(self._wanted.items()):
                    if peer in connected:
                        self._attempts.pop(peer, None)
                        self._next_dial.pop(peer, None)
                        continue
                    if (peer in self._dialing or not addrs
                            or self._next_dial.get(peer, now) > now):
                        continue
                    if len(self._dialing) >= self.limits.max_concurrent_dials:
                        break
                    self._dialing.add(peer)
                    nursery.start_soon(self._dial, peer, addrs)
                with trio.move_on_after(RECHECK_S):
                    await self._wake.wait()

    async def _dial(self, peer: str, addrs: tuple[str, ...]) -> None:
        try:
            await self._connect(peer, addrs, self.limits.connect_timeout_s)
            log.info("connected to %s", peer)
        except PeerUnreachableError as exc:
            self.stats.dial_failures += 1
            attempt = self._attempts.get(peer, 0)
            delay = backoff_delay(attempt, self._rng, base_s=self.limits.backoff_min_s,
                                  cap_s=self.limits.backoff_max_s)
            if peer in self._wanted:
                self._attempts[peer] = attempt + 1
                self._next_dial[peer] = trio.current_time() + delay
            log.info("cannot reach %s (%s); next try in %.1f s", peer, exc, delay)
        finally:
            self._dialing.discard(peer)
            self._wake.set()

    @contextlib.contextmanager
    def _discovery(self) -> Iterator[None]:
        """With mDNS on, want the peers it finds (its callbacks run in zeroconf's threads)."""
        if not self._mdns:
            yield
            return
        token = trio.lowlevel.current_trio_token()

        def found(info: Any) -> None:
            peer, addrs = str(info.peer_id), tuple(str(a) for a in info.addrs)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self.want_peer, peer, addrs)

        peerDiscovery.register_peer_discovered_handler(found)
        try:
            yield
        finally:
            peerDiscovery.unregister_peer_discovered_handler(found)
