"""Signed envelopes: each kind of bad envelope is refused with its own error."""

from __future__ import annotations

import hashlib

import pytest

from gossip.envelope import (
    MAX_ENVELOPE_BYTES,
    Digested,
    ReplayGuard,
    Sequencer,
    digest,
    open_envelope,
    packb,
    seal,
    unpackb,
)
from gossip.errors import (
    ClockSkewError,
    ForgedSignatureError,
    MalformedMessageError,
    OversizedMessageError,
    RemoteError,
    ReplayedMessageError,
    TamperedMessageError,
    WrongFederationError,
)
from gossip.identity import Identity

FED = b"F" * 32
OTHER_FED = b"G" * 32
NOW = 1_700_000_000_000


def _seal(identity: Identity, body: bytes = b"hello", **kw: object) -> bytes:
    args: dict[str, object] = {"kind": "announce", "federation_id": FED, "seq": 1,
                               "timestamp_ms": NOW, "body": body}
    args.update(kw)
    return seal(identity, **args).to_bytes()  # type: ignore[arg-type]


def _open(data: bytes) -> object:
    return open_envelope(data, federation_id=FED, now_ms=NOW)


def test_round_trip() -> None:
    alice = Identity.generate()
    env = open_envelope(_seal(alice), federation_id=FED, now_ms=NOW)
    assert env.body == b"hello"
    assert env.sender == alice.public_key
    assert env.sender_id == alice.peer_id
    assert env.kind == "announce" and env.seq == 1


def test_forged_signature_is_refused() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    outer = unpackb(_seal(mallory))
    fields = unpackb(outer[1])
    fields[2] = alice.public_key  # claim to be alice, keep mallory's signature
    outer[1] = packb(fields)
    with pytest.raises(ForgedSignatureError):
        _open(packb(outer))


def test_tampered_body_is_refused() -> None:
    outer = unpackb(_seal(Identity.generate()))
    outer[2] = b"HELLO"
    with pytest.raises(TamperedMessageError):
        _open(packb(outer))


def test_signature_is_domain_separated_by_kind() -> None:
    outer = unpackb(_seal(Identity.generate()))
    fields = unpackb(outer[1])
    fields[0] = "leave"  # re-label an announcement as another record kind
    outer[1] = packb(fields)
    with pytest.raises(ForgedSignatureError):
        _open(packb(outer))


def test_replay_is_refused() -> None:
    alice = Identity.generate()
    guard = ReplayGuard()
    env = open_envelope(_seal(alice), federation_id=FED, now_ms=NOW)
    guard.check(env.sender, env.seq, env.timestamp_ms)
    with pytest.raises(ReplayedMessageError):
        guard.check(env.sender, env.seq, env.timestamp_ms)


def test_only_the_canonical_encoding_of_an_envelope_opens() -> None:
    """Re-encoding a signed envelope (an int or bin in a wider msgpack form) would give the
    same signed record another digest, hence another identity: refused."""
    raw = _seal(Identity.generate())
    assert open_envelope(raw, federation_id=FED, now_ms=NOW)
    version, header, body, signature = unpackb(raw)
    wider = b"\x94" + b"\xd0" + bytes([version]) + packb(header) + packb(body) + packb(signature)
    assert wider != raw and unpackb(wider) == [version, header, body, signature]
    with pytest.raises(MalformedMessageError, match="canonical"):
        open_envelope(wider, federation_id=FED, now_ms=NOW)
    long_bin = b"\x94" + packb(version) + b"\xc5" + len(header).to_bytes(2, "big") + header \
        + packb(body) + packb(signature)
    with pytest.raises(MalformedMessageError, match="canonical"):
        open_envelope(long_bin, federation_id=FED, now_ms=NOW)


def test_replay_window_accepts_reordering_but_not_old() -> None:
    guard = ReplayGuard(window=4)
    key = Identity.generate().public_key
    for seq in (5, 3, 4, 10):
        guard.check(key, seq, 100)
    with pytest.raises(ReplayedMessageError):
        guard.check(key, 2, 100)  # older than everything the full window remembers
    with pytest.raises(ReplayedMessageError):
        guard.check(key, 50, 99)  # a higher number does not help an older envelope
    guard.check(key, 8, 100)  # out of order, inside the window
    with pytest.raises(ReplayedMessageError):
        guard.check(key, 8, 100)
    with pytest.raises(ReplayedMessageError):
        guard.check(key, 3, 100)  # fell out of the window: too old now


def test_a_copied_home_does_not_lock_the_real_member_out() -> None:
    """A copy ran with a higher boot epoch (higher sequence numbers), then stopped: the real
    member's next envelopes, signed later, are accepted at once; a home restored from an
    older backup (lower numbers again) too."""
    guard = ReplayGuard(window=8)
    key = Identity.generate().public_key
    real, copy = Sequencer(3), Sequencer(4)
    for t in range(10):
        guard.check(key, real.next(), 1000 + t)
        guard.check(key, copy.next(), 1000 + t)
    guard.check(key, real.next(), 2000)  # the copy stopped: mixed again without a restart
    guard.check(key, Sequencer(1).next(), 3000)  # restored from an old backup
    with pytest.raises(ReplayedMessageError):
        guard.check(key, copy.next(), 1005)  # but an old envelope of either stays refused


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(window=8, max_senders=3)
    keys = [Identity.generate().public_key for _ in range(5)]
    for k in keys:
        for seq in range(100):
            guard.check(k, seq, seq)
    assert len(guard._state) == 3
    assert all(len(seen) <= 8 for _, seen in guard._state.values())


@pytest.mark.parametrize("offset", [-10 * 60 * 1000, 10 * 60 * 1000])
def test_skewed_timestamp_is_refused(offset: int) -> None:
    with pytest.raises(ClockSkewError):
        _open(_seal(Identity.generate(), timestamp_ms=NOW + offset))


def test_oversized_is_refused_before_decoding() -> None:
    data = b"\x00" * (MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(OversizedMessageError):
        _open(data)
    with pytest.raises(ValueError):
        _seal(Identity.generate(), body=b"x" * MAX_ENVELOPE_BYTES)


def test_wrong_federation_is_refused() -> None:
    with pytest.raises(WrongFederationError):
        _open(_seal(Identity.generate(), federation_id=OTHER_FED))


def test_errors_are_distinct_remote_errors() -> None:
    classes = {ForgedSignatureError, TamperedMessageError, ReplayedMessageError,
               ClockSkewError, OversizedMessageError, WrongFederationError, MalformedMessageError}
    assert len({c.code for c in classes}) == len(classes)
    assert all(issubclass(c, RemoteError) for c in classes)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", packb([1, 2, 3]), packb([1, b"x", b"y", b"z" * 64]), packb("text"),
     packb([2, b"", b"", b"s" * 64]), packb([1, packb([1, 2, 3, 4, 5, 6]), b"", b"s" * 64])],
)
def test_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        _open(data)


def test_sequencer_increases_across_restarts() -> None:
    first = Sequencer(boot_epoch=1)
    a = [first.next() for _ in range(3)]
    second = Sequencer(boot_epoch=2)
    assert a == sorted(a) and second.next() > a[-1]


def test_digested_bytes_carry_their_digest_and_cannot_be_given_another() -> None:
    data = Digested(b"payload" * 1000)
    assert data == b"payload" * 1000 and isinstance(data, bytes)
    assert digest(data) == hashlib.sha256(b"payload" * 1000).digest() == data.sha256
    with pytest.raises(AttributeError):
        data.sha256 = bytes(32)  # type: ignore[misc]
    assert digest(bytearray(data)) == data.sha256  # (other buffers are hashed as they come)
