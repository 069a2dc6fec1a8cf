"""Tensor payload wire format: round trips, zero copy, and refusal of every kind of bad input."""

from __future__ import annotations

import contextlib
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.envelope import digest, packb
from gossip.errors import (
    BadPayloadError,
    LocalError,
    MalformedMessageError,
    OversizedMessageError,
    RemoteError,
)
from p2pfed.codec import (
    ALIGNMENT,
    MAGIC,
    PREFIX_BYTES,
    all_finite,
    decode_payload,
    encode_payload,
    encode_payload_bytes,
    encoded_size,
    same_bits,
)
from p2pfed.components import FlatLayout

NAME = "encoder.text.lora"
LAYOUT = FlatLayout.from_shapes({"lora_a": (8, 16), "lora_b": (16, 8), "scale": ()})


def _flat(layout: FlatLayout = LAYOUT, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layout.numel, generator=gen, dtype=torch.float64).to(layout.dtype)


def _wire(layout: FlatLayout = LAYOUT, flat: torch.Tensor | None = None) -> bytes:
    flat = _flat(layout) if flat is None else flat
    return bytes(encode_payload(NAME, 7, flat, layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_each_dtype(dtype: torch.dtype) -> None:
    layout = FlatLayout.from_shapes({"w": (5, 3), "b": (5,)}, dtype)
    flat = _flat(layout)
    wire = encode_payload(NAME, 3, flat, layout)
    assert len(wire) == encoded_size(layout, NAME, 3)
    assert bytes(wire[:4]) == MAGIC
    decoded = decode_payload(bytes(wire), expected_component=NAME, expected_layout=layout)
    assert decoded.component == NAME
    assert decoded.round == 3
    assert decoded.layout == layout
    assert decoded.flat.dtype == dtype
    assert torch.equal(decoded.flat, flat)


def test_wire_format_prefix_and_alignment() -> None:
    wire = _wire()
    magic, version, pad, header_len = struct.unpack_from("<4sB3sI", wire, 0)
    assert (magic, version, pad) == (b"P2PT", 1, b"\0\0\0")
    data_offset = len(wire) - LAYOUT.nbytes
    assert data_offset % ALIGNMENT == 0
    assert PREFIX_BYTES + header_len <= data_offset < PREFIX_BYTES + header_len + ALIGNMENT
    assert wire[data_offset:] == _flat().numpy().tobytes()


def test_encode_into_reusable_buffer() -> None:
    size = encoded_size(LAYOUT, NAME, 7)
    out = bytearray(b"\xff" * (size + 100))
    view = encode_payload(NAME, 7, _flat(), LAYOUT, out)
    assert len(view) == size
    assert bytes(view) == _wire()
    # the returned view is the start of ``out`` itself (no extra buffer)
    assert bytes(out[:size]) == _wire()
    assert out[size:] == b"\xff" * 100
    # reuse for another round
    view2 = encode_payload(NAME, 7, _flat(seed=1), LAYOUT, memoryview(out))
    assert decode_payload(bytes(view2)).flat.tolist() == _flat(seed=1).tolist()
    with pytest.raises(LocalError):
        encode_payload(NAME, 7, _flat(), LAYOUT, bytearray(size - 1))
    with pytest.raises(LocalError):
        encode_payload(NAME, 7, _flat(), LAYOUT, memoryview(bytes(size)))


def test_encode_rejects_local_misuse() -> None:
    with pytest.raises(LocalError):
        encode_payload(NAME, 1, torch.zeros(LAYOUT.numel + 1), LAYOUT)
    with pytest.raises(LocalError):
        encode_payload(NAME, 1, torch.zeros(LAYOUT.numel, dtype=torch.float64), LAYOUT)
    with pytest.raises(LocalError):
        encode_payload("Not A Name", 1, _flat(), LAYOUT)
    with pytest.raises(LocalError):
        encode_payload(NAME, -1, _flat(), LAYOUT)


def test_decode_is_zero_copy_on_writable_buffers_and_copies_otherwise() -> None:
    buf = bytearray(_wire())
    decoded = decode_payload(buf)
    offset = len(buf) - LAYOUT.nbytes
    struct.pack_into("<f", buf, offset, 42.0)
    assert decoded.flat[0].item() == 42.0

    frozen = _wire()
    copied = decode_payload(frozen)
    copied.flat[0] = -1.0  # writable, and independent of the immutable input
    assert decode_payload(frozen).flat[0].item() == _flat()[0].item()
    mv = decode_payload(memoryview(frozen))
    assert torch.equal(mv.flat, _flat())


def test_empty_layout_round_trips() -> None:
    layout = FlatLayout.from_shapes({"nothing": (0, 4)})
    decoded = decode_payload(bytes(encode_payload(NAME, 0, torch.zeros(0), layout)))
    assert decoded.flat.numel() == 0
    assert decoded.layout == layout


def test_oversized_is_checked_before_anything() -> None:
    wire = _wire()
    with pytest.raises(OversizedMessageError):
        decode_payload(wire, max_bytes=len(wire) - 1)
    with pytest.raises(OversizedMessageError):
        decode_payload(b"garbage!" * 100, max_bytes=10)
    assert decode_payload(wire, max_bytes=len(wire)).round == 7


@pytest.mark.parametrize("cut", [0, 1, 4, 11, 12, 20, 63, -1, -4])
def test_truncated_or_extended_is_malformed(cut: int) -> None:
    wire = _wire()
    with pytest.raises(MalformedMessageError):
        decode_payload(wire[:cut])
    with pytest.raises(MalformedMessageError):
        decode_payload(wire + b"\0\0\0\0")


def _patched(offset: int, value: bytes) -> bytes:
    wire = bytearray(_wire())
    wire[offset : offset + len(value)] = value
    return bytes(wire)


@pytest.mark.parametrize(
    "corrupt",
    [
        _patched(0, b"P2PX"),  # magic
        _patched(4, b"\x02"),  # version
        _patched(5, b"\x01"),  # reserved bytes
        _patched(8, struct.pack("<I", 0)),  # header length 0
        _patched(8, struct.pack("<I", 0xFFFFFFFF)),  # header length beyond the data
        _patched(8, struct.pack("<I", 3)),  # header length cuts the header
        _patched(12, b"\xc1"),  # invalid msgpack
    ],
)
def test_bad_prefix_or_header_is_malformed(corrupt: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_payload(corrupt)


def _with_header(header: object, data: bytes = b"") -> bytes:
    raw = packb(header)
    prefix = struct.pack("<4sB3sI", MAGIC, 1, b"\0\0\0", len(raw)) + raw
    pad = -len(prefix) % ALIGNMENT
    return prefix + b"\0" * pad + data


@pytest.mark.parametrize(
    "header",
    [
        [NAME, 1, ["float32", 1, [["w", [1]]]]],
        {"component": NAME, "round": 1},
        {"component": NAME, "round": 1, "layout": ["float32", 1, [["w", [1]]]], "x": 1},
        {"component": "BAD NAME", "round": 1, "layout": ["float32", 1, [["w", [1]]]]},
        {"component": NAME, "round": -1, "layout": ["float32", 1, [["w", [1]]]]},
        {"component": NAME, "round": True, "layout": ["float32", 1, [["w", [1]]]]},
        {"component": NAME, "round": 1, "layout": ["float32", 2, [["w", [1]]]]},
        {"component": NAME, "round": 1, "layout": ["float32", 2, [["w", [2]]]]},  # 4 bytes short
        {"component": NAME, "round": 1, "layout": ["float32", 2**40, [["w", [2**40]]]]},
    ],
)
def test_bad_header_fields_are_malformed(header: object) -> None:
    with pytest.raises(MalformedMessageError):
        decode_payload(_with_header(header, b"\0\0\0\0"))


def test_nonzero_padding_is_malformed() -> None:
    wire = bytearray(_wire())
    (header_len,) = struct.unpack_from("<I", wire, 8)
    pad_start = PREFIX_BYTES + header_len
    assert pad_start < len(wire) - LAYOUT.nbytes
    wire[pad_start] = 1
    with pytest.raises(MalformedMessageError):
        decode_payload(bytes(wire))


def test_unexpected_component_or_layout_is_a_bad_payload() -> None:
    wire = _wire()
    with pytest.raises(BadPayloadError):
        decode_payload(wire, expected_component="head.topic")
    other = FlatLayout.from_shapes({"lora_a": (16, 8), "lora_b": (8, 16), "scale": ()})
    assert other.numel == LAYOUT.numel
    with pytest.raises(BadPayloadError):
        decode_payload(wire, expected_layout=other)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 1, 4097, 9998, 9999])
def test_non_finite_values_are_a_bad_payload(
    dtype: torch.dtype, value: float, position: int
) -> None:
    layout = FlatLayout.from_shapes({"w": (10_000,)}, dtype)
    flat = _flat(layout)
    flat[position] = value
    with pytest.raises(BadPayloadError):
        decode_payload(bytes(encode_payload(NAME, 1, flat, layout)))


def test_huge_finite_values_are_accepted() -> None:
    layout = FlatLayout.from_shapes({"w": (1000,)}, torch.float16)
    flat = torch.full((1000,), 65000.0, dtype=torch.float16)
    decoded = decode_payload(bytes(encode_payload(NAME, 1, flat, layout)))
    assert torch.equal(decoded.flat, flat)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_raise_remote_errors(data: bytes) -> None:
    for candidate in (data, MAGIC + b"\x01\0\0\0" + data):
        with contextlib.suppress(RemoteError):
            decode_payload(candidate, max_bytes=500)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_payloads_decode_or_raise_remote_errors(data: st.DataObject) -> None:
    wire = bytearray(_wire())
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(wire) - 1), st.integers(0, 255)), min_size=1, max_size=4
        )
    )
    for index, byte in flips:
        wire[index] = byte
    cut = data.draw(st.integers(0, len(wire)))
    try:
        decoded = decode_payload(bytes(wire[:cut]))
    except RemoteError:
        return
    assert decoded.flat.numel() == decoded.layout.numel
    assert bool(torch.isfinite(decoded.flat).all())


def test_shared_decode_views_immutable_bytes_and_bytes_encoding_matches() -> None:
    frozen = encode_payload_bytes(NAME, 3, _flat(), LAYOUT)
    assert isinstance(frozen, bytes) and frozen.sha256 == digest(bytes(frozen))  # (made once)
    assert frozen == bytes(encode_payload(NAME, 3, _flat(), LAYOUT))
    shared = decode_payload(frozen, shared=True)
    assert torch.equal(shared.flat, _flat()) and shared.round == 3
    # a view, not a copy: the tensor's data lies inside the immutable payload
    base = np.frombuffer(frozen, dtype=np.uint8).ctypes.data
    assert shared.flat.data_ptr() == base + len(frozen) - LAYOUT.nbytes
    # without ``shared`` an immutable payload is still copied
    assert decode_payload(frozen).flat.data_ptr() != decode_payload(frozen).flat.data_ptr()
    empty = FlatLayout.from_shapes({"nothing": (0,)})
    assert decode_payload(encode_payload_bytes(NAME, 0, torch.zeros(0), empty)).layout == empty


def test_finite_values_whose_sum_overflows_are_still_finite() -> None:
    huge = torch.full((8,), 3e38)  # (float32: the sum is inf, every value is finite)
    assert not math.isfinite(float(huge.sum())) and all_finite(huge)
    for bad in (float("nan"), float("inf"), float("-inf")):
        mixed = huge.clone()
        mixed[3] = bad
        assert not all_finite(mixed)
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # (sum: NaN)
    assert all_finite(torch.zeros(0))


def test_same_bits_compares_bytes_not_values() -> None:
    x = torch.randn(10)
    assert same_bits(x, x.clone()) and not same_bits(x, x + 1)
    assert not same_bits(torch.zeros(3), -torch.zeros(3))  # (torch.equal says equal)
    nan = torch.full((3,), float("nan"))
    assert same_bits(nan, nan.clone())  # (torch.equal says not)
    assert not same_bits(torch.zeros(3), torch.zeros(4)) and not same_bits(
        torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert same_bits(torch.ones(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16))
