"""Network benchmark: a payload fetch by the transport vs the same bytes over plain TCP.

Two processes on 127.0.0.1.  This one fetches; a child (``python -m p2pfed.bench_net --serve
SIZE``) serves the same random payload both on a libp2p host and on a plain trio TCP socket,
and writes one line on its stdout::

    ready <libp2p address>/p2p/<peer id> <tcp port> <payload digest hex>

``payload_stream_mbps`` is what ``Libp2pTransport.fetch_buffer`` does: a ticket over
``/p2pfed/bulk/1``, then AES-GCM records over the bulk channel's own TCP connection (timed
whole: the ticket, the connection and the buffer included).  ``libp2p_stream_mbps`` is the
same fetch with the bulk channel off (``/p2pfed/payload/1`` over Noise and Yamux), for
comparison.  Results are in MB/s (1e6 bytes per second), best of ``repeats``; the libp2p
connections are set up before timing, each raw TCP run opens its own connection (a few
microseconds on loopback) into a buffer allocated before timing.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from gossip.envelope import digest
from gossip.identity import Identity
from gossip.transport.libp2p import Libp2pTransport, Limits

READY = "ready"
TOPIC = "/p2pfed/bench/records"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
TCP_CHUNK = 1 << 20
START_TIMEOUT_S = 60.0


async def _serve(size: int, write_chunk: int) -> None:
    """The child: serve one random payload over libp2p and raw TCP until killed."""
    data = os.urandom(size)
    key = digest(data)
    transport = Libp2pTransport(Identity.generate(), topic=TOPIC, listen_addrs=[LOOPBACK],
                                limits=Limits(write_chunk=write_chunk))
    transport.set_payload_server(lambda k: data if k == key else None)

    async def raw(stream: trio.SocketStream) -> None:
        async with stream:
            view = memoryview(data)
            for start in range(0, size, TCP_CHUNK):
                await stream.send_all(view[start : start + TCP_CHUNK])

    async with transport, trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, raw, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        sys.stdout.write(f"{READY} {transport.listen_addrs()[0]} {port} {key.hex()}\n")
        sys.stdout.flush()


async def _receive_tcp(port: int, size: int) -> float:
    buf = bytearray(size)
    view = memoryview(buf)
    start = time.perf_counter()
    got = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        while got < size:
            chunk = await stream.receive_some(min(TCP_CHUNK, size - got))
            if not chunk:
                raise RuntimeError(f"raw TCP stream ended after {got} of {size} bytes")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
    return time.perf_counter() - start


async def _fetch_once(me: Libp2pTransport, peer: str, key: bytes, size: int) -> float:
    """MB/s of one fetch of the payload ``key`` from ``peer``."""
    start = time.perf_counter()
    got = await me.fetch_buffer(peer, key, size)
    elapsed = time.perf_counter() - start
    if digest(memoryview(got)) != key:
        raise RuntimeError("the payload arrived corrupted")
    del got
    return size / elapsed / 1e6


async def _fetch_mbps(addr: str, key: bytes, size: int, repeats: int, *, bulk: bool) -> float:
    """Best MB/s of ``repeats`` fetches by a client transport (bulk channel on or off)."""
    async with Libp2pTransport(Identity.generate(), topic=TOPIC, listen_addrs=[LOOPBACK],
                               bulk=bulk) as me:
        peer = await me.connect(addr)
        return max([await _fetch_once(me, peer, key, size) for _ in range(repeats)])


async def _client(addr: str, port: int, key: bytes, size: int, repeats: int) -> dict[str, float]:
    """The bulk channel and raw TCP in turns, ``repeats`` times each: their best MB/s, and the
    median of the turns' ratios (the two sides of one ratio see the same machine)."""
    stream, tcp = [], []
    async with Libp2pTransport(Identity.generate(), topic=TOPIC, listen_addrs=[LOOPBACK],
                               bulk=True) as me:
        peer = await me.connect(addr)
        for _ in range(repeats):
            stream.append(await _fetch_once(me, peer, key, size))
            tcp.append(size / await _receive_tcp(port, size) / 1e6)
        if me.stats.bulk_fetches != repeats:
            raise RuntimeError("the fetches did not take the bulk channel")
    best_libp2p = await _fetch_mbps(addr, key, size, repeats, bulk=False)
    return {"payload_stream_mbps": max(stream), "raw_tcp_mbps": max(tcp),
            "libp2p_stream_mbps": best_libp2p,
            "stream_vs_tcp": statistics.median(s / t for s, t in zip(stream, tcp, strict=True))}


def _read_ready_line(child: subprocess.Popen[str]) -> list[str]:
    assert child.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        fields = line.split()
        if len(fields) == 4 and fields[0] == READY:
            return fields
    raise RuntimeError(f"the benchmark server did not start (exit code {child.poll()})")


def run_net_bench(size_mb: int = 64, repeats: int = 3, *,
                  write_chunk: int | None = None) -> dict[str, float]:
    """Best-of-``repeats`` MB/s of ``size_mb`` MiB over libp2p and over raw TCP, and the
    median ratio of the bulk channel to raw TCP measured in turns."""
    size = size_mb << 20
    chunk = write_chunk or Limits().write_chunk
    child = subprocess.Popen(
        [sys.executable, "-m", "p2pfed.bench_net", "--serve", str(size), "--chunk", str(chunk)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        _, addr, port, key = _read_ready_line(child)
        result = trio.run(_client, addr, int(port), bytes.fromhex(key), size, repeats)
    finally:
        child.kill()
        child.wait()
    result["payload_mb"] = float(size_mb)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pfed.bench_net", description=__doc__)
    parser.add_argument("--serve", type=int, metavar="BYTES",
                        help="run the serving child for a payload of BYTES")
    parser.add_argument("--chunk", type=int, default=Limits().write_chunk,
                        help="bytes per stream write when serving")
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.serve is not None:
        trio.run(_serve, args.serve, args.chunk)
        return 0
    result = run_net_bench(args.size_mb, args.repeats, write_chunk=args.chunk)
    sys.stdout.write("".join(f"{k} {v:.3f}\n" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
