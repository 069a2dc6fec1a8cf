"""Yamux that enforces what py-libp2p 0.8.1 only logs: receive windows, stream counts, bans.

py-libp2p's Yamux buffers whatever a peer sends on a stream, logging a warning per frame once
the peer writes past the receive window, so a peer that ignores flow control grows our memory
without bound.  :class:`GuardedYamux` checks every DATA frame: a frame larger than any window
is refused before its body is read, and one larger than what is left of its stream's receive
window (or that would take the stream's buffer past a hard cap) is refused before it is
buffered; either closes the whole connection at once and bans the peer.  Frames for a stream
this side has reset are dropped, and so is what such a stream still held.  New inbound streams
beyond a per-connection cap (smaller for strangers) are reset before protocol negotiation.

py-libp2p creates its ``Yamux`` by name, whatever class is registered for the protocol, so
:class:`GuardedMuxerMultistream` replaces the host's muxer selector: it refuses connections of
banned peers (and of strangers over their budget) right after the handshake and builds a
:class:`GuardedYamux` for the others.

py-libp2p also keeps the listener's task of every inbound connection, and a slot of its inbound
cap (250), until the host stops, whether the connection lives or not: a peer that reconnects
250 times would shut every newcomer out.  :func:`install` makes that task end with its
connection.

Semantics changed on this side only: a reset from the remote ends the stream *after* what it
sent before the reset has been read (py-libp2p drops it), so a reply followed by a reset, as in
the control protocol, is never lost.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Iterable, Sized
from contextvars import ContextVar
from typing import Any, NoReturn, Protocol, SupportsIndex, cast

import trio
from libp2p.abc import IMuxedConn, IMuxedStream, ISecureConn
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect import DEFAULT_NEGOTIATE_TIMEOUT
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.security.noise.io import SIZE_NOISE_MESSAGE_LEN as NOISE_LENGTH_BYTES
from libp2p.security.noise.io import NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import (
    DEFAULT_WINDOW_SIZE,
    FLAG_SYN,
    HEADER_SIZE,
    MAX_WINDOW_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
    _yamux_data_read_timeout,
)
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

#: Hard cap of one stream's receive buffer, whatever the window says (honest peers stay within
#: the largest window, 16 MiB, plus one read).
MAX_STREAM_BUFFER = 2 * MAX_WINDOW_SIZE
#: Ciphertext read from the socket at once on a Noise connection.
READ_AHEAD = 256 * 1024
#: Largest DATA frame sent (py-libp2p sends 64 KiB; any size within the peer's window is valid).
MAX_DATA_FRAME = 1 << 20
#: How long a writer waits for the peer to open its window (py-libp2p's value).
WINDOW_WAIT_S = 5.0


class MuxGuard(Protocol):
    """What the muxer asks of the transport (a :class:`~gossip.transport.guard.PeerGuard`)."""

    def refuse_connection(self, peer: str, ip: str | None, *, inbound: bool) -> str | None: ...

    def track_connection(self, conn: GuardedYamux, peer: str, ip: str | None, *,
                         remote: str | None = None,
                         inbound: bool) -> None: ...

    def stream_cap(self, peer: str) -> int: ...

    def stream_refused(self, peer: str) -> None: ...

    def window_overrun(self, peer: str, stream_id: int, excess: int) -> None: ...


class ConnectionRefused(SwarmException):
    """A connection refused right after the handshake (a banned peer, too many strangers)."""


class WindowOverrun(trio.TooSlowError):
    """A peer wrote past a receive window.

    A ``TooSlowError`` because it is the one exception py-libp2p's frame loop lets out of every
    place a frame's data is buffered, and it answers it by closing the connection.
    """


class _StreamBuffer(bytearray):
    """A stream's receive buffer that asks its connection before it takes a frame's data."""

    def __init__(self, conn: GuardedYamux, stream_id: int, initial: bytes | bytearray) -> None:
        super().__init__(initial)
        self._conn, self._stream_id = conn, stream_id

    def __getitem__(self, index: Any) -> Any:
        # the library copies a slice twice (``bytes(buffer[:n])``): a bytes slice is copied once
        if isinstance(index, slice):
            with memoryview(self) as view:
                return bytes(view[index])
        return super().__getitem__(index)

    def extend(self, data: Iterable[SupportsIndex], /) -> None:
        size = len(data) if isinstance(data, Sized) else 0
        if self._conn.admit_data(self._stream_id, len(self), size):
            super().extend(data)


class _HeaderTap:
    """The secured connection as Yamux reads and writes it.

    Remembers the last frame header read: Yamux reads a frame's 12-byte header, then (for DATA)
    its body through ``_read_data_body``; everything read outside a body is a header, so the
    last 12 bytes read outside one are the header of the frame whose body is about to be read.

    Over Noise it also replaces py-libp2p's per-message path (two socket reads per Noise
    message, five copies): ciphertext is read ahead in chunks of ``READ_AHEAD`` and decrypted
    one message at a time as Yamux asks for bytes, with the same Noise cipher states, so what
    is buffered is bounded by one chunk, one message and one read.  A write is encrypted into
    as few Noise messages as the 65,519-byte limit allows and sent with one socket write.
    """

    def __init__(self, inner: ISecureConn) -> None:
        self._inner = inner
        self.header = b""
        self.in_body = False
        self._noise: NoiseTransportReadWriter | None = None
        if isinstance(inner, SecureSession) and isinstance(inner.conn, NoiseTransportReadWriter):
            self._noise = inner.conn
            self._raw = inner.conn.read_writer.read_write_closer
            # what the session decrypted during muxer negotiation and Yamux has not read yet
            self._plain = bytearray(inner._drain(None))
            self._cipher = bytearray()
            self._pos = 0

    async def read(self, n: int | None = None) -> bytes:
        data = await (self._inner.read(n) if self._noise is None else self._read_noise(n))
        if not self.in_body:
            self.header = (self.header + data)[-HEADER_SIZE:]
        return data

    async def write(self, data: bytes) -> None:
        noise = self._noise
        if noise is None:
            await self._inner.write(data)
            return
        if len(data) <= NOISE_MAX_PLAINTEXT:
            message = noise.encrypt(data if type(data) is bytes else bytes(data))
            await self._raw.write(len(message).to_bytes(2, "big") + message)
            return
        view = memoryview(data)
        parts: list[bytes] = []
        for start in range(0, len(view), NOISE_MAX_PLAINTEXT):
            message = noise.encrypt(bytes(view[start : start + NOISE_MAX_PLAINTEXT]))
            parts += (len(message).to_bytes(2, "big"), message)
        await self._raw.write(b"".join(parts))

    async def read_body(self, length: int) -> bytes | bytearray | None:
        """Exactly ``length`` bytes of a DATA frame's body, or None off the Noise path.

        A frame written by a peer like this one fills whole Noise messages, so the buffer is
        handed over as it is, without a copy.  Raises IncompleteReadError at end of stream.
        """
        if self._noise is None:
            return None
        while len(self._plain) < length:
            if not await self._decrypt_one():
                raise IncompleteReadError(
                    f"connection closed in a frame body of {length} bytes",
                    expected_bytes=length, received_bytes=len(self._plain))
        plain = self._plain
        if len(plain) == length:
            self._plain = bytearray()
            return plain
        with memoryview(plain) as view:
            body = bytes(view[:length])
        del plain[:length]
        return body

    async def _read_noise(self, n: int | None) -> bytes:
        """Up to ``n`` plaintext bytes (all buffered, or one message, for None); b"" at EOF."""
        plain = self._plain
        want = 1 if n is None or n < 0 else n
        while len(plain) < want and await self._decrypt_one():
            pass
        take = len(plain) if n is None or n < 0 else min(n, len(plain))
        if take == len(plain):
            self._plain = bytearray()
            return bytes(plain)
        with memoryview(plain) as view:
            data = bytes(view[:take])
        del plain[:take]
        return data

    async def _decrypt_one(self) -> bool:
        """Decrypt the next Noise message into the plaintext buffer; False at end of stream."""
        assert self._noise is not None
        cipher = self._cipher
        while True:
            pos = self._pos
            if len(cipher) - pos >= NOISE_LENGTH_BYTES:
                end = pos + NOISE_LENGTH_BYTES + int.from_bytes(
                    cipher[pos : pos + NOISE_LENGTH_BYTES], "big")
                if len(cipher) >= end:
                    with memoryview(cipher) as view:
                        message = bytes(view[pos + NOISE_LENGTH_BYTES : end])
                    self._pos = end
                    self._plain += self._noise.decrypt(message)
                    return True
            if pos:
                del cipher[:pos]
                self._pos = 0
            chunk = await self._raw.read(READ_AHEAD)
            if not chunk:
                return False
            cipher += chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Buffers(dict[int, bytearray]):
    """Yamux's ``stream_buffers``: every buffer the library stores becomes a guarded one."""

    def __init__(self, conn: GuardedYamux) -> None:
        super().__init__()
        self._conn = conn

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        if not isinstance(buffer, _StreamBuffer):
            buffer = _StreamBuffer(self._conn, stream_id, buffer)
        super().__setitem__(stream_id, buffer)


class GuardedYamuxStream(YamuxStream):
    """A Yamux stream that sends large DATA frames and wakes its writer on window updates.

    py-libp2p sends at most 64 KiB per DATA frame and, out of window, polls every 10 ms; the
    Yamux spec allows any frame within the peer's receive window, so a bulk write here costs
    one frame (and one socket write) per ``MAX_DATA_FRAME`` and resumes as soon as a window
    update arrives.  py-libp2p builds its streams itself: :meth:`adopt` converts one.
    """

    _window_grew: trio.Event

    @classmethod
    def adopt(cls, stream: YamuxStream) -> GuardedYamuxStream:
        stream.__class__ = cls
        adopted = cast(GuardedYamuxStream, stream)
        adopted._window_grew = trio.Event()
        return adopted

    # the library sets ``send_window`` when a window update arrives: a data descriptor over
    # the instance's own attribute, so the writer waiting for room is woken
    @property
    def send_window(self) -> int:
        return cast(int, self.__dict__["send_window"])

    @send_window.setter
    def send_window(self, value: int) -> None:
        grew = value > self.__dict__.get("send_window", 0)
        self.__dict__["send_window"] = value
        if grew and "_window_grew" in self.__dict__:
            self._window_grew.set()

    async def write(self, data: bytes) -> None:
        view = memoryview(data).cast("B")
        total, sent = len(view), 0
        while sent < total:
            frame: bytes | None = None
            async with self.rw_lock.write_lock():
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                async with self.window_lock:
                    if self.closed:
                        raise MuxedStreamError("Stream is closed")
                    size = min(self.send_window, MAX_DATA_FRAME, total - sent)
                    if size > 0:
                        self.send_window -= size
                        frame = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0,
                                            self.stream_id, size) + view[sent : sent + size]
                    else:
                        self._window_grew = trio.Event()
            if frame is None:
                self._zero_window_waits += 1
                with trio.move_on_after(WINDOW_WAIT_S):
                    await self._window_grew.wait()
                if self.send_window <= 0 and not self.closed:
                    raise MuxedStreamError(
                        f"Timed out waiting for window update after {WINDOW_WAIT_S} seconds.")
                continue
            await self.conn._write_frame(frame)
            sent += size


class GuardedYamux(Yamux):
    """A Yamux connection that closes itself when the peer ignores flow control."""

    def __init__(self, secured_conn: ISecureConn, peer_id: ID, guard: MuxGuard, *,
                 is_initiator: bool | None = None) -> None:
        super().__init__(secured_conn, peer_id, is_initiator=is_initiator)
        self._guard = guard
        self.stream_buffers = _Buffers(self)
        self._tap = _HeaderTap(secured_conn)
        self.secured_conn = cast(ISecureConn, self._tap)

    async def _read_data_body(self, length: int) -> bytes:
        # py-libp2p reads a whole frame (up to 16 MiB) into memory before buffering it: a
        # frame its stream has no room for is refused before its body is read
        stream_id, room = self._room(length)
        if length > room:
            self._overrun(stream_id, length - room)
        self._tap.in_body = True
        try:
            with trio.fail_after(_yamux_data_read_timeout()):
                body = await self._tap.read_body(length)
            if body is not None:
                return cast(bytes, body)  # a bytearray is as good to the library
            return await super()._read_data_body(length)
        finally:
            self._tap.in_body = False

    def _room(self, length: int) -> tuple[int, int]:
        """(stream id, bytes it may still receive) for the frame whose header was just read."""
        if len(self._tap.header) == HEADER_SIZE:
            _, typ, flags, stream_id, announced = struct.unpack(YAMUX_HEADER_FORMAT,
                                                                self._tap.header)
            if typ == TYPE_DATA and announced == length:
                stream = self.streams.get(stream_id)
                if stream is None or flags & FLAG_SYN:  # a new stream, or one already gone
                    return stream_id, DEFAULT_WINDOW_SIZE
                return stream_id, max(stream.recv_window, 0)
        # not expected: no stream may receive more than the largest window
        return 0, max([DEFAULT_WINDOW_SIZE, *(s.recv_window for s in self.streams.values())])

    def admit_data(self, stream_id: int, buffered: int, size: int) -> bool:
        """Whether to buffer ``size`` more bytes of a stream; raises WindowOverrun on abuse."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return False
        excess = max(size - max(stream.recv_window, 0), buffered + size - MAX_STREAM_BUFFER)
        if excess > 0:
            self._overrun(stream_id, excess)
        # reset or closed both ways here: nobody will read it
        return not (stream.closed and stream.send_closed and stream.recv_closed)

    def _overrun(self, stream_id: int, excess: int) -> NoReturn:
        peer = str(self.peer_id)
        self._guard.window_overrun(peer, stream_id, excess)
        _quiet_next_abort(peer)
        raise WindowOverrun(f"{peer} wrote {excess} bytes past the window of stream {stream_id}")

    async def open_stream(self) -> YamuxStream:
        return GuardedYamuxStream.adopt(await super().open_stream())

    async def accept_stream(self) -> IMuxedStream:
        """The next inbound stream; those beyond the connection's cap are reset unread."""
        while True:
            stream = await super().accept_stream()
            peer = str(self.peer_id)
            inbound = sum(1 for s in self.streams.values() if not s.is_initiator)
            if inbound <= self._guard.stream_cap(peer):
                if isinstance(stream, YamuxStream):
                    GuardedYamuxStream.adopt(stream)
                return stream
            self._guard.stream_refused(peer)
            await stream.reset()

    def _finalize_stream_locked(self, stream: YamuxStream, *, fully_closed: bool) -> None:
        if stream.reset_received and not stream.recv_closed:
            # reset by the remote: nothing more will arrive, what did stays readable
            stream.recv_closed = True
        super()._finalize_stream_locked(stream, fully_closed=fully_closed)

    async def _finalize_stream(self, stream: YamuxStream, *, fully_closed: bool) -> None:
        """This side closed or reset ``stream``: once it is dead, drop what nobody will read."""
        async with self.streams_lock:
            if fully_closed and stream.reset_received:
                buffer = self.stream_buffers.get(stream.stream_id)
                if buffer:
                    buffer.clear()
            self._finalize_stream_locked(stream, fully_closed=fully_closed)


class GuardedMuxerMultistream(MuxerMultistream):
    """Negotiates Yamux only, builds :class:`GuardedYamux`, refuses connections the guard bans.

    Install it on a host with :func:`install`.
    """

    def __init__(self, guard: MuxGuard,
                 negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT) -> None:
        super().__init__({TProtocol(YAMUX_PROTOCOL_ID): GuardedYamux}, negotiate_timeout)
        self._guard = guard

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        peer, inbound = str(peer_id), not conn.is_initiator
        address = conn.get_remote_address()
        ip = address[0] if address else None
        remote = f"{address[0]}:{address[1]}" if address else None
        reason = self._guard.refuse_connection(peer, ip, inbound=inbound)
        if reason is not None:  # py-libp2p closes the connection, quietly
            raise ConnectionRefused(f"refusing a connection with {peer}: {reason}")
        protocol, _ = await self._selector.select(conn, conn.is_initiator,
                                                  self.negotiate_timeout)
        muxed = GuardedYamux(conn, peer_id, self._guard, is_initiator=conn.is_initiator)
        self._guard.track_connection(muxed, peer, ip, inbound=inbound, remote=remote)
        return self._annotate_connection(muxed, conn, protocol)


class ConnectionEnded(SwarmException):
    """Ends the listener's task of an inbound connection that has closed."""


#: Set while py-libp2p's listener handles one inbound connection (its task, and only it).
_IN_LISTENER: ContextVar[bool] = ContextVar("in_listener", default=False)


def install(network: Any, guard: MuxGuard) -> None:
    """Make a py-libp2p swarm (``host.get_network()``) use the guarded muxer.

    Also ends the listener's task of each inbound connection when the connection closes (it
    waits for the host to stop otherwise, holding a slot of the inbound cap all along).
    """
    upgrader = network.upgrader
    timeout = getattr(upgrader.muxer_multistream, "negotiate_timeout", DEFAULT_NEGOTIATE_TIMEOUT)
    upgrader.muxer_multistream = GuardedMuxerMultistream(guard, timeout)

    handle: Callable[..., Awaitable[None]] = network._do_handle_inbound_connection
    upgrade: Callable[..., Awaitable[Any]] = network.upgrade_inbound_raw_conn

    async def handle_one(*args: Any) -> None:
        token = _IN_LISTENER.set(True)
        try:
            await handle(*args)
        finally:
            _IN_LISTENER.reset(token)

    async def upgrade_then_serve(*args: Any) -> Any:
        muxed = await upgrade(*args)
        if not _IN_LISTENER.get():  # another caller (hole punching, relays): as it was
            return muxed
        await muxed.event_closed.wait()
        # py-libp2p's listener logs this at debug level, closes the raw connection, returns
        raise ConnectionEnded("the connection ended")

    network._do_handle_inbound_connection = handle_one
    network.upgrade_inbound_raw_conn = upgrade_then_serve


# py-libp2p answers WindowOverrun with a warning about a slow frame: the guard has already
# said what happened, so that one line is dropped.
_ABORTING: set[str] = set()
_SLOW_FRAME = "Yamux: timed out reading DATA frame body"


def _quiet_next_abort(peer: str) -> None:
    if len(_ABORTING) > 256:  # lines that were never emitted (logging off): forget them
        _ABORTING.clear()
    _ABORTING.add(peer)


class _QuietAbort(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _ABORTING or not str(record.msg).startswith(_SLOW_FRAME):
            return True
        text = record.getMessage()
        for peer in list(_ABORTING):
            if peer in text:
                _ABORTING.discard(peer)
                return False
        return True


logging.getLogger("libp2p.stream_muxer.yamux.yamux").addFilter(_QuietAbort())
