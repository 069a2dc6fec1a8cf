"""Micro-benchmarks of the data path: copy, mix, encode, decode, hash, sign, verify.

:func:`run_bench` measures each step in one process (best of ``repeats`` with
:func:`time.perf_counter`) and returns plain numbers, so the CLI or a report can print them.
``memcpy_gbps`` is the reference: mixing, encoding and decoding are meant to run near it.
Big buffers are freed between sections to keep the peak near ``(neighbours + 2) * 4 * params``
bytes (about 2 GB at the defaults).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable

import torch

from gossip.catalog import ComponentKind, ComponentSpec
from gossip.envelope import digest
from gossip.identity import Identity, verify_signature
from p2pfed.codec import decode_payload, encode_payload, encoded_size
from p2pfed.components import FlatLayout
from p2pfed.consensus import mix_into

logger = logging.getLogger(__name__)

BENCH_COMPONENT = ComponentSpec("backbone.bench", ComponentKind.BACKBONE)
SIGNED_MESSAGE_BYTES = 200


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _rate(fn: Callable[[], object], min_seconds: float) -> float:
    """Operations per second of ``fn``, run in growing batches for at least ``min_seconds``."""
    fn()
    ops = 0
    batch = 1
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < min_seconds:
        for _ in range(batch):
            fn()
        ops += batch
        batch *= 2
        elapsed = time.perf_counter() - start
    return ops / max(elapsed, 1e-9)


def bench_layout(params: int) -> FlatLayout:
    """A two-tensor layout of ``params`` float32 elements (a weight matrix and a vector)."""
    cols = 1024 if params >= 1024 else 1
    rows = params // cols
    return FlatLayout.from_shapes({"bias": (params - rows * cols,), "weight": (rows, cols)})


def bench_memcpy(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), repeats)
    return nbytes / seconds / 1e9


def bench_mix(params: int, neighbours: int, repeats: int) -> float:
    inputs = [torch.full((params,), float(k + 1)) for k in range(neighbours + 1)]
    out = torch.empty(params)
    weight = 1.0 / len(inputs)
    terms = [(weight, x) for x in inputs]
    seconds = _best_seconds(lambda: mix_into(out, terms), repeats)
    read = sum(x.numel() * x.element_size() for x in inputs)
    return read / seconds / 1e9


def _encode_decode(layout: FlatLayout, repeats: int) -> tuple[float, float, float, bytes]:
    """Encode into a reusable buffer, then decode it in place; returns seconds and wire bytes."""
    name = BENCH_COMPONENT.name
    flat = torch.randn(layout.numel)
    out = bytearray(encoded_size(layout, name, 1))
    encode_s = _best_seconds(lambda: encode_payload(name, 1, flat, layout, out), repeats)
    wire = encode_payload(name, 1, flat, layout, out)
    decode_s = _best_seconds(
        lambda: decode_payload(wire, expected_component=name, expected_layout=layout), repeats
    )
    digest_s = _best_seconds(lambda: digest(wire), repeats)
    return encode_s, decode_s, digest_s, bytes(wire)


def bench_codec(params: int, repeats: int) -> dict[str, float]:
    layout = bench_layout(params)
    encode_s, decode_s, digest_s, frozen = _encode_decode(layout, repeats)
    gc.collect()
    decode_copy_s = _best_seconds(lambda: decode_payload(frozen), repeats)
    nbytes = layout.nbytes
    return {
        "encode_gbps": nbytes / encode_s / 1e9,
        "decode_gbps": nbytes / decode_s / 1e9,
        "decode_copy_gbps": nbytes / decode_copy_s / 1e9,
        "digest_gbps": len(frozen) / digest_s / 1e9,
    }


def bench_signatures(min_seconds: float) -> dict[str, float]:
    identity = Identity.generate()
    message = bytes(range(256))[:SIGNED_MESSAGE_BYTES]
    signature = identity.sign(message)
    public_key = identity.public_key
    return {
        "sign_per_s": _rate(lambda: identity.sign(message), min_seconds),
        "verify_per_s": _rate(
            lambda: verify_signature(public_key, message, signature), min_seconds
        ),
    }


def run_bench(
    *,
    memcpy_mb: int = 256,
    mix_params: int = 50_000_000,
    neighbours: int = 8,
    repeats: int = 3,
    crypto_seconds: float = 0.5,
) -> dict[str, float]:
    """Measure the data path; every ``*_gbps`` value is GB (1e9 bytes) per second.

    ``mix_gbps`` counts the bytes of every input read (self and ``neighbours``);
    ``encode_gbps``/``decode_gbps`` count tensor bytes (decode from a writable buffer, zero
    copy, with validation); ``decode_copy_gbps`` decodes from immutable ``bytes`` (one copy);
    ``digest_gbps`` counts wire bytes.
    """
    if memcpy_mb <= 0 or mix_params <= 0 or neighbours < 0 or repeats <= 0:
        raise ValueError("bench sizes must be positive")
    results: dict[str, float] = {
        "params": float(mix_params),
        "neighbours": float(neighbours),
        "torch_threads": float(torch.get_num_threads()),
        "cpu_count": float(os.cpu_count() or 1),
    }
    logger.info("bench: memcpy of %d MB", memcpy_mb)
    results["memcpy_gbps"] = bench_memcpy(memcpy_mb * 1_000_000, repeats)
    gc.collect()
    logger.info("bench: mixing %d params over %d neighbours", mix_params, neighbours)
    results["mix_gbps"] = bench_mix(mix_params, neighbours, repeats)
    gc.collect()
    logger.info("bench: payload codec and digest")
    results.update(bench_codec(mix_params, repeats))
    gc.collect()
    logger.info("bench: ed25519 sign/verify")
    results.update(bench_signatures(crypto_seconds))
    return results
