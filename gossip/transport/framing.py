"""Exact reads and length-prefixed frames over a byte stream.

A libp2p stream's ``read(n)`` returns *up to* ``n`` bytes, so every message on the wire is
framed and read with a loop.  Sizes are checked against a cap before anything is allocated, so
a peer cannot make us reserve memory by announcing a huge frame.  No I/O besides the stream
handed in, so the helpers are testable with a fake stream.
"""

from __future__ import annotations

import struct
from typing import Protocol

from gossip.errors import MalformedMessageError, OversizedMessageError

FRAME_HEADER = struct.Struct(">I")
#: Hard cap of a control frame (and of a broadcast record).
MAX_FRAME_BYTES = 64 * 1024
#: Largest single ``read`` asked of the stream.
READ_CHUNK = 1 << 20


class ByteStream(Protocol):
    """The part of a libp2p stream the framing needs."""

    async def read(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


async def read_into(stream: ByteStream, buf: bytearray | memoryview) -> None:
    """Fill ``buf`` exactly from ``stream``; raise MalformedMessageError if it ends early."""
    view = memoryview(buf).cast("B")
    size = len(view)
    got = 0
    while got < size:
        chunk = await stream.read(min(size - got, READ_CHUNK))
        if not chunk:
            raise MalformedMessageError(f"stream ended after {got} of {size} bytes")
        if len(chunk) > size - got:
            raise MalformedMessageError("stream returned more bytes than asked for")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)


async def read_exact(stream: ByteStream, size: int) -> bytearray:
    """Read exactly ``size`` bytes into a new buffer."""
    buf = bytearray(size)
    await read_into(stream, buf)
    return buf


def encode_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """4-byte big-endian length, then ``data``."""
    if len(data) > max_bytes:
        raise OversizedMessageError(f"frame of {len(data)} bytes exceeds the cap of {max_bytes}")
    return FRAME_HEADER.pack(len(data)) + data


async def read_frame(stream: ByteStream, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Read one frame; the announced length is checked before the body is read."""
    (size,) = FRAME_HEADER.unpack(await read_exact(stream, FRAME_HEADER.size))
    if size > max_bytes:
        raise OversizedMessageError(f"frame of {size} bytes announced, the cap is {max_bytes}")
    return bytes(await read_exact(stream, size))
