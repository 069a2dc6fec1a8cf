"""Signed envelopes: the only way a record leaves or enters a node.

Wire form (msgpack, canonical): ``[VERSION, header, body, signature]`` where ``header`` is the
msgpack encoding of ``[kind, federation_id, sender, seq, timestamp_ms, body_digest]`` and the
signature is ed25519 over ``b"p2pfed/v1/" + kind + b"\\0" + header``.  The domain tag keeps a
signature made for one kind of record from being accepted as another.  Signing the header (which
carries the body's digest) rather than the body itself lets a receiver tell a forged envelope
(signature does not verify) from a tampered one (authentic header, body changed in transit).

Receivers check, cheapest first: size, shape, federation, clock skew, signature, body digest,
then (statefully, with :class:`ReplayGuard`) the per-sender sequence number.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack

from gossip.errors import (
    ClockSkewError,
    ForgedSignatureError,
    MalformedMessageError,
    OversizedMessageError,
    ReplayedMessageError,
    TamperedMessageError,
    WrongFederationError,
)
from gossip.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_from_public_key,
    verify_signature,
)

VERSION = 1
DOMAIN_PREFIX = b"p2pfed/v1/"
DIGEST_BYTES = 32
FEDERATION_ID_BYTES = 32
MAX_ENVELOPE_BYTES = 64 * 1024
DEFAULT_MAX_SKEW_MS = 5 * 60 * 1000
MAX_KIND_CHARS = 64


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The content digest used everywhere in p2pfed (SHA-256, hardware-accelerated here)."""
    if type(data) is Digested:
        return data.sha256
    return hashlib.sha256(data).digest()


class Digested(bytes):
    """Immutable bytes that carry their SHA-256, computed once when they are made.

    A node's own payload is one: it is hashed for its announcement anyway, and every later
    :func:`digest` of the same object (the blob store's, and in a simulation each receiver's
    check, since the in-memory transport hands over the sender's object) reads it back.  The
    content cannot change, so the digest read back is always the digest of the content; bytes
    from the network are never Digested, and are hashed as they come.
    """

    sha256: bytes

    def __new__(cls, data: bytes | bytearray | memoryview) -> Digested:
        self = super().__new__(cls, data)
        object.__setattr__(self, "sha256", hashlib.sha256(self).digest())
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Digested bytes are immutable")


def packb(obj: Any) -> bytes:
    """Canonical msgpack: bin type for bytes, no floats narrowed, deterministic for equal input."""
    out: bytes = msgpack.packb(obj, use_bin_type=True, strict_types=False)
    return out


def unpackb(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Any:
    """Decode msgpack written by :func:`packb`, refusing oversized or non-canonical input."""
    if len(data) > max_bytes:
        raise OversizedMessageError(f"{len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except (
        ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError
    ) as exc:
        raise MalformedMessageError(f"not valid msgpack: {exc}") from exc


def signing_message(kind: str, header: bytes) -> bytes:
    return DOMAIN_PREFIX + kind.encode("utf-8") + b"\0" + header


@dataclass(frozen=True)
class Envelope:
    """A verified (or freshly sealed) envelope."""

    kind: str
    federation_id: bytes
    sender: bytes
    seq: int
    timestamp_ms: int
    body: bytes
    signature: bytes
    header: bytes

    @property
    def sender_id(self) -> str:
        return peer_id_from_public_key(self.sender)

    def to_bytes(self) -> bytes:
        return packb([VERSION, self.header, self.body, self.signature])


def seal(
    identity: Identity,
    *,
    kind: str,
    federation_id: bytes,
    seq: int,
    timestamp_ms: int,
    body: bytes,
) -> Envelope:
    """Sign ``body`` as a record of ``kind`` for ``federation_id``."""
    if not kind or len(kind) > MAX_KIND_CHARS:
        raise ValueError(f"record kind must be 1..{MAX_KIND_CHARS} characters")
    if len(federation_id) != FEDERATION_ID_BYTES:
        raise ValueError("federation id must be 32 bytes")
    if seq < 0 or timestamp_ms < 0:
        raise ValueError("seq and timestamp must be non-negative")
    header = packb([kind, federation_id, identity.public_key, seq, timestamp_ms, digest(body)])
    signature = identity.sign(signing_message(kind, header))
    env = Envelope(
        kind, federation_id, identity.public_key, seq, timestamp_ms, body, signature, header
    )
    if len(env.to_bytes()) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"envelope exceeds {MAX_ENVELOPE_BYTES} bytes; send tensors as payloads")
    return env


def _field(value: Any, typ: type, name: str, size: int | None = None) -> Any:
    if not isinstance(value, typ) or isinstance(value, bool):
        raise MalformedMessageError(f"envelope field {name} has type {type(value).__name__}")
    if size is not None and isinstance(value, bytes) and len(value) != size:
        raise MalformedMessageError(f"envelope field {name} must be {size} bytes")
    return value


def open_envelope(
    data: bytes,
    *,
    federation_id: bytes | None,
    now_ms: int,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> Envelope:
    """Decode and verify an envelope (everything but replay, see :class:`ReplayGuard`).

    ``federation_id=None`` accepts any federation (used only for bootstrap records such as a
    join request carrying its own genesis).
    """
    if len(data) > max_bytes:
        raise OversizedMessageError(f"envelope of {len(data)} bytes exceeds the cap of {max_bytes}")
    outer = unpackb(data, max_bytes=max_bytes)
    if not isinstance(outer, list) or len(outer) != 4:
        raise MalformedMessageError("envelope must be a 4-element array")
    version, header, body, signature = outer
    if version != VERSION:
        raise MalformedMessageError(f"unsupported envelope version {version!r}")
    _field(header, bytes, "header")
    _field(body, bytes, "body")
    _field(signature, bytes, "signature", SIGNATURE_BYTES)
    if packb(outer) != bytes(data):  # one signed record, one encoding: ids are digests of it
        raise MalformedMessageError("envelope is not in canonical form")
    fields = unpackb(header, max_bytes=max_bytes)
    if not isinstance(fields, list) or len(fields) != 6:
        raise MalformedMessageError("envelope header must be a 6-element array")
    if packb(fields) != header:
        raise MalformedMessageError("envelope header is not in canonical form")
    kind, fed, sender, seq, ts, body_digest = fields
    _field(kind, str, "kind")
    if not kind or len(kind) > MAX_KIND_CHARS:
        raise MalformedMessageError("bad record kind")
    _field(fed, bytes, "federation_id", FEDERATION_ID_BYTES)
    _field(sender, bytes, "sender", PUBLIC_KEY_BYTES)
    _field(seq, int, "seq")
    _field(ts, int, "timestamp")
    _field(body_digest, bytes, "body_digest", DIGEST_BYTES)
    if seq < 0 or ts < 0:
        raise MalformedMessageError("negative seq or timestamp")
    sender_id = peer_id_from_public_key(sender)
    if federation_id is not None and fed != federation_id:
        raise WrongFederationError(
            f"record for federation {fed.hex()[:12]}, we are in {federation_id.hex()[:12]}",
            peer=sender_id,
        )
    if abs(ts - now_ms) > max_skew_ms:
        raise ClockSkewError(
            f"timestamp {ts} is {abs(ts - now_ms)} ms from our clock (limit {max_skew_ms})",
            peer=sender_id,
        )
    if not verify_signature(sender, signing_message(kind, header), signature):
        raise ForgedSignatureError(f"signature does not verify for {sender_id}", peer=sender_id)
    if digest(body) != body_digest:
        raise TamperedMessageError("body does not match its signed digest", peer=sender_id)
    return Envelope(kind, fed, sender, seq, ts, body, signature, header)


class ReplayGuard:
    """Per-sender anti-replay window: accept each (sender, timestamp, seq) at most once.

    A sender's last ``window`` envelopes are remembered, ordered by their signed timestamp and
    then their sequence number; an envelope already remembered, or older than every remembered
    one once the window is full, is a replay.  Envelopes may arrive out of order within the
    window.  Ordering by the signed time first is what keeps a member whose home was copied
    (a second instance ran with a higher boot epoch, hence higher sequence numbers) or restored
    from an older backup from being locked out: its fresh envelopes carry fresh times, so they
    are accepted at once.  Envelopes older than the clock-skew limit never get here
    (:func:`open_envelope` refuses them), so a replay cannot outlive the window by waiting.

    Memory is bounded: at most ``max_senders`` senders (least recently active evicted) and at
    most ``window`` entries per sender.
    """

    def __init__(self, window: int = 1024, max_senders: int = 4096) -> None:
        self.window = window
        self.max_senders = max_senders
        self._state: OrderedDict[bytes, tuple[list[tuple[int, int]], set[tuple[int, int]]]] = \
            OrderedDict()

    def check(self, sender: bytes, seq: int, timestamp_ms: int) -> None:
        """Raise :class:`ReplayedMessageError` unless the envelope is fresh; then remember it."""
        oldest, seen = self._state.get(sender, ([], set()))
        key = (timestamp_ms, seq)
        if key in seen or (len(seen) >= self.window and key <= oldest[0]):
            raise ReplayedMessageError(
                f"sequence {seq} signed at {timestamp_ms} already seen or too old",
                peer=peer_id_from_public_key(sender),
            )
        heapq.heappush(oldest, key)
        seen.add(key)
        while len(seen) > self.window:
            seen.discard(heapq.heappop(oldest))
        self._state[sender] = (oldest, seen)
        self._state.move_to_end(sender)
        while len(self._state) > self.max_senders:
            self._state.popitem(last=False)


class Sequencer:
    """Per-sender sequence numbers that stay increasing across restarts.

    ``seq = boot_epoch << 32 | counter``: the caller persists ``boot_epoch`` once per start
    (one durable write per start instead of one per message).
    """

    def __init__(self, boot_epoch: int = 0) -> None:
        self._base = boot_epoch << 32
        self._counter = 0

    def next(self) -> int:
        self._counter += 1
        if self._counter >= 1 << 32:
            raise OverflowError("sequence counter exhausted; restart to take a new boot epoch")
        return self._base | self._counter
