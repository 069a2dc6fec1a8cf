"""The tensor payload wire format (stream ``/p2pfed/payload/1`` and the blob store).

Layout of one payload::

    offset 0   4 bytes  magic b"P2PT"
    offset 4   u8       version (1)
    offset 5   3 bytes  zero
    offset 8   u32 LE   header length H
    offset 12  H bytes  msgpack header {"component": str, "round": int, "layout": layout record}
               zero padding up to the next multiple of 64
    offset D   raw little-endian buffer, layout.numel * itemsize bytes, up to the end

The data offset ``D`` is 64-byte aligned so the buffer can be used in place (zero copy).  Nothing
here hashes: the caller checks the announced digest (:func:`gossip.envelope.digest`) over the
whole payload before or after decoding.  :func:`decode_payload` treats its input as untrusted and
raises only :class:`~gossip.errors.RemoteError` subclasses for bad data.
"""

from __future__ import annotations

import logging
import math
import struct
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from gossip.catalog import MAX_NAME_CHARS, NAME_RE
from gossip.envelope import Digested, packb, unpackb
from gossip.errors import (
    BadPayloadError,
    LocalError,
    MalformedMessageError,
    OversizedMessageError,
)
from p2pfed.components import FlatLayout, tensor_bytes

logger = logging.getLogger(__name__)

#: per thread, the send buffer :func:`encode_payload_bytes` writes into
_ENCODING = threading.local()

MAGIC = b"P2PT"
VERSION = 1
PROTOCOL_ID = "/p2pfed/payload/1"
ALIGNMENT = 64
PREFIX = struct.Struct("<4sB3sI")
PREFIX_BYTES = PREFIX.size
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 1 << 30
MAX_ROUND = (1 << 63) - 1
_HEADER_KEYS = frozenset({"component", "round", "layout"})

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("p2pfed.codec requires a little-endian host")


@dataclass(frozen=True)
class DecodedPayload:
    """A validated payload.  ``flat`` aliases the input buffer when it was writable."""

    component: str
    round: int
    layout: FlatLayout
    flat: torch.Tensor


#: what a payload arrives in: bytes, or a buffer of the receiver's own (decoded in place)
Buffer = bytes | bytearray | memoryview


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _header(component: str, round: int, layout: FlatLayout) -> bytes:
    if not isinstance(component, str) or not _valid_name(component):
        raise LocalError(f"invalid component name {component!r}")
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= MAX_ROUND:
        raise LocalError(f"round must be an integer in [0, 2**63), got {round!r}")
    header = packb({"component": component, "round": round, "layout": layout.to_record()})
    if len(header) > MAX_HEADER_BYTES:
        raise LocalError(f"payload header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return header


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_CHARS and NAME_RE.match(name) is not None


def _check_flat(flat: torch.Tensor, layout: FlatLayout) -> None:
    if flat.dim() != 1 or flat.numel() != layout.numel or flat.dtype != layout.dtype:
        raise LocalError(
            f"tensor {tuple(flat.shape)} {flat.dtype} does not match the layout "
            f"({layout.numel} x {layout.dtype})"
        )


def encoded_size(layout: FlatLayout, component: str, round: int) -> int:
    """Exact size in bytes of :func:`encode_payload`'s output for these arguments."""
    return _align(PREFIX_BYTES + len(_header(component, round, layout))) + layout.nbytes


def encode_payload(
    component: str,
    round: int,
    flat: torch.Tensor,
    layout: FlatLayout,
    out: bytearray | memoryview | None = None,
) -> memoryview:
    """Serialize ``flat`` (described by ``layout``) for ``component`` at ``round``.

    With ``out`` (a reusable, writable send buffer of at least :func:`encoded_size` bytes) the
    payload is written at its start and the returned memoryview is the used prefix of ``out``;
    the tensor data is copied exactly once.  Without ``out`` a new buffer is allocated.
    """
    _check_flat(flat, layout)
    header = _header(component, round, layout)
    data_offset = _align(PREFIX_BYTES + len(header))
    size = data_offset + layout.nbytes
    if out is None:
        out = bytearray(size)
    view = memoryview(out)
    if view.readonly or not view.c_contiguous:
        raise LocalError("the output buffer must be writable and contiguous")
    view = view.cast("B")
    if len(view) < size:
        raise LocalError(f"output buffer of {len(view)} bytes is smaller than {size}")
    PREFIX.pack_into(view, 0, MAGIC, VERSION, b"\0\0\0", len(header))
    end = PREFIX_BYTES + len(header)
    view[PREFIX_BYTES:end] = header
    view[end:data_offset] = bytes(data_offset - end)
    if layout.nbytes:
        src = flat.detach().view(torch.uint8)
        dst = torch.frombuffer(view, dtype=torch.uint8, count=layout.nbytes, offset=data_offset)
        dst.copy_(src)
    return view[:size]


def encode_payload_bytes(component: str, round: int, flat: torch.Tensor,
                         layout: FlatLayout) -> Digested:
    """:func:`encode_payload` as new immutable bytes that carry their digest (computed here,
    once: :class:`~gossip.envelope.Digested`).  It is written into a send buffer kept per
    thread, then copied once into the bytes: no buffer of the payload's size is made and
    dropped per call."""
    size = encoded_size(layout, component, round)
    buf: bytearray | None = getattr(_ENCODING, "buf", None)
    if buf is None or len(buf) < size:
        buf = _ENCODING.buf = bytearray(size)
    return Digested(encode_payload(component, round, flat, layout, buf))


def decode_payload(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_component: str | None = None,
    expected_layout: FlatLayout | None = None,
    shared: bool = False,
) -> DecodedPayload:
    """Validate and decode one payload, cheapest checks first.

    Order: size cap (:class:`OversizedMessageError`); magic, version, header and layout versus
    the byte length (:class:`MalformedMessageError`); expected component and layout, then
    non-finite values (:class:`BadPayloadError`).  ``flat`` is a zero-copy view of ``data`` when
    ``data`` is writable (it then aliases the caller's buffer), otherwise a copy — or, with
    ``shared``, a view of the immutable ``data`` too, for a caller that only reads it (torch
    has no read-only tensors: writing into it would change bytes others hold).
    """
    view = memoryview(data)
    if not view.c_contiguous:
        raise LocalError("payload buffer must be contiguous")
    view = view.cast("B")
    total = len(view)
    if total > max_bytes:
        raise OversizedMessageError(f"payload of {total} bytes exceeds the cap of {max_bytes}")
    if total < PREFIX_BYTES:
        raise MalformedMessageError(f"payload of {total} bytes is shorter than its prefix")
    magic, version, pad, header_len = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise MalformedMessageError(f"bad payload magic {magic!r}")
    if version != VERSION:
        raise MalformedMessageError(f"unsupported payload version {version}")
    if pad != b"\0\0\0":
        raise MalformedMessageError("non-zero reserved bytes in payload prefix")
    if not 0 < header_len <= MAX_HEADER_BYTES or PREFIX_BYTES + header_len > total:
        raise MalformedMessageError(f"payload header length {header_len} out of bounds")
    end = PREFIX_BYTES + header_len
    component, round, layout = _parse_header(bytes(view[PREFIX_BYTES:end]))
    data_offset = _align(end)
    if data_offset + layout.nbytes != total:
        raise MalformedMessageError(
            f"payload of {total} bytes, layout needs {data_offset + layout.nbytes}"
        )
    if any(view[end:data_offset]):
        raise MalformedMessageError("non-zero payload header padding")
    if expected_component is not None and component != expected_component:
        raise BadPayloadError(f"payload for {component!r}, expected {expected_component!r}")
    if expected_layout is not None and layout != expected_layout:
        raise BadPayloadError(f"payload layout for {component!r} differs from the expected one")
    flat = _tensor_from(view, data_offset, layout, shared)
    if not all_finite(flat):
        raise BadPayloadError(f"payload for {component!r} round {round} has NaN or Inf values")
    return DecodedPayload(component, round, layout, flat)


def _parse_header(raw: bytes) -> tuple[str, int, FlatLayout]:
    header: Any = unpackb(raw, max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise MalformedMessageError("payload header must be a map of component, round, layout")
    component = header["component"]
    round = header["round"]
    if not isinstance(component, str) or not _valid_name(component):
        raise MalformedMessageError(f"invalid component name in payload: {component!r}")
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= MAX_ROUND:
        raise MalformedMessageError(f"invalid payload round {round!r}")
    return component, round, FlatLayout.from_record(header["layout"])


def _tensor_from(view: memoryview, offset: int, layout: FlatLayout, shared: bool) -> torch.Tensor:
    if layout.numel == 0:
        return torch.empty(0, dtype=layout.dtype)
    if not view.readonly:
        return torch.frombuffer(view, dtype=layout.dtype, count=layout.numel, offset=offset)
    if shared:
        with warnings.catch_warnings():  # (torch's once-only "buffer is not writable": known)
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=layout.dtype, count=layout.numel, offset=offset)
    flat = torch.empty(layout.numel, dtype=layout.dtype)
    dst = tensor_bytes(flat)
    dst[:] = view[offset : offset + layout.nbytes]
    return flat


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` hold the same bytes (unlike ``torch.equal``: -0.0 is not 0.0,
    and a NaN equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a8, b8 = a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
    if a8.numel() % 8 == 0:  # (wider words compare faster)
        return torch.equal(a8.view(torch.int64), b8.view(torch.int64))
    return torch.equal(a8, b8)


def all_finite(flat: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf (no temporary buffer).

    A finite sum means every element is finite (a NaN, or an infinity, makes the sum NaN or
    infinite); otherwise ``aminmax`` tells an overflowing sum of finite values from a NaN or
    an infinity (it propagates NaN, and an infinity is always the minimum or the maximum).
    """
    if flat.numel() == 0:
        return True
    flat = flat.detach().reshape(-1)
    if math.isfinite(float(flat.sum())):  # (a NaN or an infinity makes the sum one too)
        return True
    low, high = torch.aminmax(flat)  # (the sum overflowed, or there is one)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
