"""Network benchmark: a payload over the real libp2p stream vs the same bytes over plain TCP.

Two processes on 127.0.0.1: this one fetches, a child (``python -m p2pfed.bench_net serve``)
serves both a libp2p host (``/p2pfed/payload/1``, TCP+Noise+Yamux) and a raw trio TCP socket.
Results in MB/s (1e6 bytes per second), best of ``repeats``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from typing import Any

import trio

from gossip.envelope import digest
from gossip.identity import Identity
from gossip.transport.libp2p import Libp2pTransport

KEY_LINE = "ready"


def _payload(size: int) -> bytes:
    return os.urandom(1 << 16) * (size >> 16) + os.urandom(size & 0xFFFF)


async def _serve(size: int) -> None:
    data = _payload(size)
    key = digest(data)
    transport = Libp2pTransport(Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                                topic="/p2pfed/bench")
    transport.set_payload_server(lambda k: data if k == key else None)

    async def raw(stream: trio.SocketStream) -> None:
        async with stream:
            view = memoryview(data)
            for start in range(0, len(data), 1 << 20):
                await stream.send_all(view[start : start + (1 << 20)])

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        listeners = await nursery.start(functools.partial(trio.serve_tcp, raw, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        print(KEY_LINE, transport.listen_addrs()[0], port, key.hex(), flush=True)
        await trio.sleep_forever()


async def _client(addr: str, port: int, key: bytes, size: int, repeats: int) -> dict[str, float]:
    transport = Libp2pTransport(Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                                topic="/p2pfed/bench")
    best_p2p = best_tcp = 0.0
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        (peer,) = transport.add_bootstrap([addr])
        for _ in range(repeats):
            start = time.perf_counter()
            got = await transport.fetch(peer, key, size)
            elapsed = time.perf_counter() - start
            if digest(got) != key:
                raise RuntimeError("libp2p payload arrived corrupted")
            best_p2p = max(best_p2p, size / elapsed / 1e6)
        for _ in range(repeats):
            buf = bytearray(size)
            view = memoryview(buf)
            start = time.perf_counter()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            got_n = 0
            async with stream:
                while got_n < size:
                    chunk = await stream.receive_some(min(1 << 20, size - got_n))
                    if not chunk:
                        break
                    view[got_n : got_n + len(chunk)] = chunk
                    got_n += len(chunk)
            elapsed = time.perf_counter() - start
            if got_n != size:
                raise RuntimeError("raw TCP stream ended early")
            best_tcp = max(best_tcp, size / elapsed / 1e6)
        nursery.cancel_scope.cancel()
    return {"payload_stream_mbps": best_p2p, "raw_tcp_mbps": best_tcp}


def run_net_bench(size_mb: int = 64, repeats: int = 3) -> dict[str, Any]:
    size = size_mb << 20
    child = subprocess.Popen(
        [sys.executable, "-m", "p2pfed.bench_net", "serve", str(size)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert child.stdout is not None
        line = ""
        while not line.startswith(KEY_LINE):
            line = child.stdout.readline()
            if not line:
                raise RuntimeError("the benchmark server did not start")
        _, addr, port, key = line.split()
        result = trio.run(_client, addr, int(port), bytes.fromhex(key), size, repeats)
    finally:
        child.kill()
        child.wait()
    return {**result, "payload_mb": size_mb,
            "stream_vs_tcp": result["payload_stream_mbps"] / result["raw_tcp_mbps"]}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        trio.run(_serve, int(sys.argv[2]))
    else:
        print(run_net_bench())
