"""The network transport: a py-libp2p host (TCP, Noise, Yamux) behind the Transport interface.

* control messages — stream protocol ``/p2pfed/control/1``: one frame (4-byte big-endian length,
  then the bytes, at most 64 KiB) per stream;
* payloads — stream protocol ``/p2pfed/payload/1``: the client sends a 32-byte digest and the
  8-byte largest size it accepts; the server answers a status byte, an 8-byte length and the
  raw bytes.  The size is checked before the body is read, and the body is read into one
  preallocated buffer;
* membership records — GossipSub on one topic per federation, strict signing, a validator that
  drops anything over 64 KiB.

py-libp2p raises a wide variety of exceptions (and exception groups) from its internals, so
each network call is wrapped at this boundary: a failure becomes a
:class:`~gossip.errors.PeerUnreachableError` for that peer, never a crash of the host.  The host
is closed inside ``host.run()`` (otherwise its listening sockets leak).
"""

from __future__ import annotations

import logging
import random
import struct
from typing import TYPE_CHECKING, Any

import trio

from gossip.errors import OversizedMessageError, PeerUnreachableError
from gossip.identity import Identity
from gossip.transport.base import PayloadServer

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

CONTROL_PROTOCOL = "/p2pfed/control/1"
PAYLOAD_PROTOCOL = "/p2pfed/payload/1"
MAX_CONTROL_BYTES = 64 * 1024
CHUNK = 1 << 20
STATUS_OK, STATUS_MISSING, STATUS_TOO_LARGE = 0, 1, 2
CONNECT_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 30.0
PAYLOAD_TIMEOUT_S = 600.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 60.0
MAX_CONCURRENT_INBOUND = 64


async def read_exact(stream: Any, n: int, into: bytearray | None = None) -> bytearray:
    """Read exactly ``n`` bytes (``stream.read(k)`` may return fewer than ``k``)."""
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        chunk = await stream.read(min(n - got, CHUNK))
        if not chunk:
            raise EOFError(f"stream closed after {got} of {n} bytes")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buf


class Libp2pTransport:
    """One node's libp2p host.  Start it with ``await nursery.start(transport.run)``."""

    def __init__(
        self,
        identity: Identity,
        *,
        listen_addrs: list[str],
        topic: str,
        inbox_size: int = 1024,
        seed: int | None = None,
    ) -> None:
        self.identity = identity
        self.topic = topic
        self._listen = listen_addrs
        self._send, self._recv = trio.open_memory_channel[tuple[str, bytes]](inbox_size)
        self._server: PayloadServer | None = None
        self._wanted: dict[str, tuple[str, ...]] = {}
        self._wanted_changed = trio.Event()
        self._inbound = trio.Semaphore(MAX_CONCURRENT_INBOUND)
        self._rng = random.Random(seed)
        self.dropped = 0
        self.host: Any = None
        self._pubsub: Any = None

    # ------------------------------------------------------------------ interface
    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def incoming(self) -> trio.MemoryReceiveChannel[tuple[str, bytes]]:
        return self._recv

    def set_payload_server(self, server: PayloadServer) -> None:
        self._server = server

    def listen_addrs(self) -> list[str]:
        if self.host is None:
            return []
        return [f"{a}/p2p/{self.peer_id}" if "/p2p/" not in str(a) else str(a)
                for a in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        if self.host is None:
            return []
        return sorted(str(p) for p in self.host.get_connected_peers())

    def set_wanted_peers(self, peers: dict[str, tuple[str, ...]]) -> None:
        self._wanted = {p: a for p, a in peers.items() if p != self.peer_id}
        for peer, addrs in self._wanted.items():
            self._remember(peer, addrs)
        self._wanted_changed.set()

    def add_bootstrap(self, addrs: list[str]) -> list[str]:
        """Dial these ``.../p2p/<id>`` addresses (from an invite); returns their peer ids."""
        found: dict[str, list[str]] = {}
        for addr in addrs:
            if "/p2p/" in addr:
                base, _, peer = addr.rpartition("/p2p/")
                found.setdefault(peer, []).append(base)
        for peer, bases in found.items():
            if peer != self.peer_id:
                self._remember(peer, tuple(bases))
                self._wanted.setdefault(peer, tuple(bases))
        self._wanted_changed.set()
        return sorted(p for p in found if p != self.peer_id)

    async def send(self, peer: str, data: bytes) -> None:
        if len(data) > MAX_CONTROL_BYTES:
            raise OversizedMessageError(f"control message of {len(data)} bytes is too large")
        try:
            with trio.fail_after(STREAM_TIMEOUT_S):
                stream = await self._open(peer, CONTROL_PROTOCOL)
                try:
                    await stream.write(struct.pack(">I", len(data)) + data)
                finally:
                    await stream.close()
        except PeerUnreachableError:
            raise
        except Exception as exc:  # py-libp2p's many error types
            raise PeerUnreachableError(f"cannot send to {peer}: {exc!r}", peer=peer) from exc

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> bytes:
        try:
            with trio.fail_after(PAYLOAD_TIMEOUT_S):
                stream = await self._open(peer, PAYLOAD_PROTOCOL)
                try:
                    await stream.write(key + struct.pack(">Q", max_bytes))
                    head = await read_exact(stream, 9)
                    status, size = head[0], struct.unpack(">Q", head[1:])[0]
                    if status == STATUS_MISSING:
                        raise PeerUnreachableError(f"{peer} does not have {key.hex()[:12]}",
                                                   peer=peer)
                    if status == STATUS_TOO_LARGE or size > max_bytes:
                        raise OversizedMessageError(
                            f"payload from {peer} exceeds the cap of {max_bytes}", peer=peer)
                    if status != STATUS_OK:
                        raise PeerUnreachableError(f"bad status {status} from {peer}", peer=peer)
                    return bytes(await read_exact(stream, size))
                finally:
                    await stream.close()
        except (PeerUnreachableError, OversizedMessageError):
            raise
        except Exception as exc:
            raise PeerUnreachableError(f"cannot fetch from {peer}: {exc!r}", peer=peer) from exc

    async def broadcast(self, data: bytes) -> None:
        if len(data) > MAX_CONTROL_BYTES:
            raise OversizedMessageError("broadcast record is too large")
        if self._pubsub is None:
            raise PeerUnreachableError("the host is not running")
        try:
            await self._pubsub.publish(self.topic, data)
        except Exception as exc:
            raise PeerUnreachableError(f"publish failed: {exc!r}") from exc

    # ------------------------------------------------------------------ running
    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import multiaddr
        from libp2p import new_host
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair
        from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
        from libp2p.custom_types import TProtocol
        from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
        from libp2p.security.noise.transport import Transport as NoiseTransport
        from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
        from libp2p.stream_muxer.yamux.yamux import Yamux
        from libp2p.tools.anyio_service import background_trio_service

        private = Ed25519PrivateKey.from_bytes(self.identity.seed)
        key_pair = KeyPair(private, private.get_public_key())
        addrs = [multiaddr.Multiaddr(a) for a in self._listen]
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_ID: NoiseTransport(key_pair, noise_privkey=new_x25519().private_key)},
            muxer_opt={TProtocol(YAMUX_ID): Yamux},
            listen_addrs=addrs,
        )
        host.set_stream_handler(TProtocol(CONTROL_PROTOCOL), self._on_control)
        host.set_stream_handler(TProtocol(PAYLOAD_PROTOCOL), self._on_payload)
        router = GossipSub(
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4, degree_high=12,
            heartbeat_interval=1, spam_protection_enabled=False,
            eclipse_protection_enabled=False,
        )
        pubsub = Pubsub(host, router, strict_signing=True)
        pubsub.set_topic_validator(self.topic, self._validate, False)
        async with host.run(listen_addrs=addrs):
            self.host = host
            try:
                async with background_trio_service(pubsub), background_trio_service(router):
                    await pubsub.wait_until_ready()
                    subscription = await pubsub.subscribe(self.topic)
                    self._pubsub = pubsub
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pubsub_loop, subscription)
                        nursery.start_soon(self._dial_loop)
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                self._pubsub = None
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await host.close()
                self.host = None

    # ------------------------------------------------------------------ internals
    def _validate(self, _forwarder: Any, msg: Any) -> bool:
        return len(msg.data) <= MAX_CONTROL_BYTES

    def _deliver(self, peer: str, data: bytes) -> None:
        try:
            self._send.send_nowait((peer, data))
        except trio.WouldBlock:
            self.dropped += 1

    def _remember(self, peer: str, addrs: tuple[str, ...]) -> None:
        if self.host is None:
            return
        import multiaddr
        from libp2p.peer.id import ID

        try:
            maddrs = [multiaddr.Multiaddr(a) for a in addrs if a]
            if maddrs:
                self.host.get_peerstore().add_addrs(ID.from_base58(peer), maddrs, 0)
        except Exception as exc:
            log.warning("ignoring bad addresses for %s: %s", peer, exc)

    async def _open(self, peer: str, protocol: str) -> Any:
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        if self.host is None:
            raise PeerUnreachableError("the host is not running", peer=peer)
        try:
            peer_id = ID.from_base58(peer)
        except Exception as exc:
            raise PeerUnreachableError(f"bad peer id {peer!r}", peer=peer) from exc
        return await self.host.new_stream(peer_id, [TProtocol(protocol)])

    async def _on_control(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        async with self._inbound:
            try:
                with trio.fail_after(STREAM_TIMEOUT_S):
                    (size,) = struct.unpack(">I", await read_exact(stream, 4))
                    if size > MAX_CONTROL_BYTES:
                        log.info("dropping an oversized control frame (%d bytes) from %s",
                                 size, peer)
                        await stream.reset()
                        return
                    self._deliver(peer, bytes(await read_exact(stream, size)))
                    await stream.close()
            except Exception as exc:
                log.debug("control stream from %s failed: %r", peer, exc)

    async def _on_payload(self, stream: Any) -> None:
        peer = str(stream.muxed_conn.peer_id)
        async with self._inbound:
            try:
                with trio.fail_after(PAYLOAD_TIMEOUT_S):
                    request = await read_exact(stream, 40)
                    key, (max_bytes,) = bytes(request[:32]), struct.unpack(">Q", request[32:])
                    data = self._server(key) if self._server is not None else None
                    if data is None:
                        await stream.write(struct.pack(">BQ", STATUS_MISSING, 0))
                    elif len(data) > max_bytes:
                        await stream.write(struct.pack(">BQ", STATUS_TOO_LARGE, len(data)))
                    else:
                        await stream.write(struct.pack(">BQ", STATUS_OK, len(data)))
                        view = memoryview(data)
                        for start in range(0, len(data), CHUNK):
                            await stream.write(bytes(view[start : start + CHUNK]))
                    await stream.close()
            except Exception as exc:
                log.debug("payload stream from %s failed: %r", peer, exc)

    async def _pubsub_loop(self, subscription: Any) -> None:
        from libp2p.peer.id import ID

        while True:
            msg = await subscription.get()
            try:
                origin = str(ID(msg.from_id))
            except Exception:
                continue
            if origin != self.peer_id:
                self._deliver(origin, bytes(msg.data))

    async def _dial_loop(self) -> None:
        """Keep the wanted peers connected, with capped exponential backoff and jitter."""
        import multiaddr
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo

        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while True:
            now = trio.current_time()
            connected = set(self.connected_peers())
            for peer, addrs in sorted(self._wanted.items()):
                if peer in connected or next_try.get(peer, 0.0) > now or not addrs:
                    if peer in connected:
                        backoff.pop(peer, None)
                    continue
                try:
                    info = PeerInfo(ID.from_base58(peer), [multiaddr.Multiaddr(a) for a in addrs])
                    with trio.fail_after(CONNECT_TIMEOUT_S):
                        await self.host.connect(info)
                    backoff.pop(peer, None)
                    log.info("connected to %s", peer)
                except Exception as exc:
                    delay = min(BACKOFF_MAX_S, backoff.get(peer, BACKOFF_MIN_S / 2) * 2)
                    backoff[peer] = delay
                    next_try[peer] = now + delay * (0.5 + self._rng.random())
                    log.info("cannot reach %s (%r); retrying in %.1f s", peer, exc, delay)
            self._wanted_changed = trio.Event()
            with trio.move_on_after(1.0):
                await self._wanted_changed.wait()
