"""The two stream protocols of the libp2p transport, both ends.

* ``/p2pfed/control/1`` — one control message per stream.  The sender writes a frame (4-byte
  big-endian length, at most 64 KiB, then the bytes) and waits for a one-byte acknowledgement.
  The receiver reads exactly one frame within ``request_timeout_s``, queues it, writes the
  acknowledgement and *resets* the stream, so nothing the sender adds is ever buffered.  A
  stream reset without an acknowledgement is a refusal.
* ``/p2pfed/payload/1`` — fetch by digest, members only.  The client sends a 32-byte key and
  the 8-byte largest size it accepts; the server answers a status byte (0 ok, 1 not found, 2
  too large), an 8-byte length and the raw bytes, then half-closes and waits (briefly) for the
  client's close.  The length is checked before the body is read, and the body is read into one
  preallocated buffer.  The request must arrive within ``request_timeout_s``, whatever the
  (long) timeout of the body.

Every inbound stream takes a slot from the :class:`~gossip.transport.guard.PeerGuard` first;
protocol violations (oversized or truncated frames, bytes past the request, a stranger's stall)
are struck against the peer.  Errors of the remote never leave a handler; ``trio.Cancelled``
always propagates.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from gossip.errors import (
    MalformedMessageError,
    OversizedMessageError,
    PeerUnreachableError,
    RemoteError,
)
from gossip.transport.framing import MAX_FRAME_BYTES, read_exact, read_frame, read_into
from gossip.transport.guard import PeerGuard
from gossip.transport.limits import Limits, TransportStats

log = logging.getLogger(__name__)

CONTROL_PROTOCOL = TProtocol("/p2pfed/control/1")
PAYLOAD_PROTOCOL = TProtocol("/p2pfed/payload/1")
MAX_CONTROL_BYTES = MAX_FRAME_BYTES
#: The receiver's acknowledgement of a control message.
ACK = b"\x06"
KEY_BYTES = 32
PAYLOAD_REQUEST = struct.Struct(">32sQ")
PAYLOAD_RESPONSE = struct.Struct(">BQ")
STATUS_OK, STATUS_NOT_FOUND, STATUS_TOO_LARGE = 0, 1, 2
#: Best-effort time given to closing or resetting a stream, or to a one-byte answer.
CLEANUP_S = 1.0


class Stream:
    """A libp2p stream seen through the few calls used here (the untyped surface stays here).

    ``read`` returns ``b""`` at end of stream (py-libp2p raises an EOFError subclass instead).
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    @property
    def peer(self) -> str:
        return str(self._raw.muxed_conn.peer_id)

    @property
    def remote_ip(self) -> str | None:
        try:
            address = self._raw.get_remote_address()
        except Exception:  # a connection going away
            return None
        return str(address[0]) if address else None

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


# --------------------------------------------------------------------------- clients
async def send_control(stream: Stream, frame: bytes) -> None:
    """Write one framed control message and wait for its acknowledgement."""
    await stream.write(frame)
    if await stream.read(1) != ACK:  # a reset raises; an early end reads b""
        raise PeerUnreachableError(f"{stream.peer} did not take a control message",
                                   peer=stream.peer)


async def fetch_payload(stream: Stream, key: bytes, max_bytes: int) -> bytearray:
    """Request ``key``; the payload in one preallocated buffer.

    Raises OversizedMessageError when it is larger than ``max_bytes`` (checked before the body
    is read) and PeerUnreachableError when the peer does not have it.
    """
    peer = stream.peer
    await stream.write(PAYLOAD_REQUEST.pack(key, max_bytes))
    await stream.close_write()
    status, size = PAYLOAD_RESPONSE.unpack(await read_exact(stream, PAYLOAD_RESPONSE.size))
    if status == STATUS_NOT_FOUND:
        raise PeerUnreachableError(f"{peer} does not have {key.hex()[:12]}", peer=peer)
    if status == STATUS_TOO_LARGE or (status == STATUS_OK and size > max_bytes):
        raise OversizedMessageError(
            f"payload of {size} bytes from {peer} exceeds the cap of {max_bytes}", peer=peer)
    if status != STATUS_OK:
        raise PeerUnreachableError(f"{peer} answered an unknown status {status}", peer=peer)
    buf = bytearray(size)
    await read_into(stream, buf)
    return buf


# --------------------------------------------------------------------------- servers
class Handlers:
    """The inbound ends of both protocols, for ``host.set_stream_handler``."""

    def __init__(self, guard: PeerGuard, limits: Limits, stats: TransportStats, *,
                 deliver: Callable[[str, bytes], bool],
                 lookup: Callable[[bytes], bytes | None]) -> None:
        self.guard, self.limits, self.stats = guard, limits, stats
        self._deliver, self._lookup = deliver, lookup

    async def on_control(self, raw: Any) -> None:
        stream = Stream(raw)
        peer = stream.peer
        slot = self.guard.admit_stream(peer, stream.remote_ip, members_only=False)
        if slot is None:
            await stream.reset()
            return
        try:
            with trio.fail_after(self.limits.request_timeout_s):
                data = await read_frame(stream, MAX_CONTROL_BYTES)
            if self._deliver(peer, data):
                self.stats.received += 1
            with trio.move_on_after(CLEANUP_S):
                await stream.write(ACK)
        except RemoteError as exc:  # oversized or truncated frame
            self.stats.rejected += 1
            self.guard.strike(peer, f"sent a bad control frame: {exc}")
        except trio.TooSlowError:
            self._stalled(peer, slot.member, "a control message")
        except Exception as exc:  # reset by the remote, connection gone
            log.debug("control stream from %s failed: %r", peer, exc)
        finally:
            await stream.reset()  # never half-closed: nothing more is buffered
            self.guard.release(slot)

    async def on_payload(self, raw: Any) -> None:
        async def respond(stream: Stream, request: bytes) -> None:
            key, max_bytes = PAYLOAD_REQUEST.unpack(request)
            with trio.fail_after(self.limits.fetch_timeout_s):
                await self._answer(stream, key, max_bytes)

        await serve_one_request(Stream(raw), self.guard, self.limits, self.stats,
                                PAYLOAD_REQUEST.size, respond, "payload")

    async def _answer(self, stream: Stream, key: bytes, max_bytes: int) -> None:
        data = self._serve(key)
        if data is None:
            await stream.write(PAYLOAD_RESPONSE.pack(STATUS_NOT_FOUND, 0))
        elif len(data) > max_bytes:
            await stream.write(PAYLOAD_RESPONSE.pack(STATUS_TOO_LARGE, len(data)))
        else:
            chunk = self.limits.write_chunk
            view = memoryview(data)
            # the header rides with the first chunk: one write, one Yamux frame less
            await stream.write(PAYLOAD_RESPONSE.pack(STATUS_OK, len(data)) + view[:chunk])
            for start in range(chunk, len(view), chunk):
                await stream.write(view[start : start + chunk])
            self.stats.served += 1
            self.stats.served_bytes += len(data)

    def _serve(self, key: bytes) -> bytes | None:
        try:
            return self._lookup(key)
        except Exception:  # a local fault (say, an unreadable blob): answer "not found"
            log.exception("the payload server failed on %s", key.hex()[:12])
            return None

    def _stalled(self, peer: str, member: bool, what: str) -> None:
        if member:
            self.guard.log(peer, logging.DEBUG, "%s was too slow with %s", peer, what)
        else:
            self.guard.strike(peer, f"stalled {what}")


async def serve_one_request(stream: Stream, guard: PeerGuard, limits: Limits,
                            stats: TransportStats, size: int,
                            respond: Callable[[Stream, bytes], Awaitable[None]],
                            what: str) -> None:
    """A members-only stream that carries one request of ``size`` bytes and its answer
    (``respond`` writes it): a stream slot first, the request within ``request_timeout_s``,
    then the client's end of stream; anything more is a strike, a stall a strike for a
    stranger (a member's is logged), a vanished client nothing."""
    peer = stream.peer
    slot = guard.admit_stream(peer, stream.remote_ip, members_only=True)
    if slot is None:
        await stream.reset()
        return
    ended = False
    try:
        with trio.fail_after(limits.request_timeout_s):
            request = await read_exact(stream, size)
        await respond(stream, bytes(request))
        with trio.fail_after(limits.request_timeout_s):
            await stream.close_write()
        with trio.move_on_after(limits.request_timeout_s):
            if await stream.read(1):
                raise MalformedMessageError("sent more than one request")
            ended = True  # the client closed: the stream is done both ways
    except RemoteError as exc:  # short request, or bytes after it
        stats.rejected += 1
        guard.strike(peer, f"sent a bad {what} request: {exc}")
    except trio.TooSlowError:
        if slot.member:
            guard.log(peer, logging.DEBUG, "%s was too slow with a %s", peer, what)
        else:
            guard.strike(peer, f"stalled a {what}")
    except Exception as exc:  # the client went away
        log.debug("%s stream of %s failed: %r", what, peer, exc)
    finally:
        await (stream.close() if ended else stream.reset())
        guard.release(slot)
