"""The bulk channel's records over a connected TCP socket, moved by a worker thread.

Measured here (64 MiB, two processes on loopback): receiving through trio's socket wrapper
yields to the scheduler on every ``recv_into`` (a few hundred times per payload, with
py-libp2p's tasks running in between) and costs about a third of the transfer; a blocking loop
in a worker thread does not.  The thread gets a descriptor of its own (``dup``), which only it
closes, so the connection's own descriptor never changes hands between threads; when the trio
side is cancelled or fails, it shuts the connection down, which wakes a thread blocked on it,
and the thread is abandoned (it ends as soon as its next call fails).

Socket buffers are left to the kernel: setting SO_RCVBUF or SO_SNDBUF fixes the window and turns
Linux's autotuning off (up to ``net.ipv4.tcp_rmem``'s 32 MiB here), which measured slower.

Large payloads land in an anonymous ``mmap`` populated in one system call: touching fresh pages
one by one costs about 0.6 ms per MiB on this machine, as much as moving the bytes, and even
populated at once 4 KiB pages cost 0.42 ms per MiB (27 ms for 64 MiB).  Where the kernel has
enough free 2 MiB blocks (``/proc/buddyinfo``), the buffer asks for transparent huge pages
(``MADV_HUGEPAGE``) and is then populated: 7 ms for 64 MiB.  Without enough free blocks it does
not ask, as the kernel would stall the fetch compacting memory to make them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Callable

import trio
from cryptography.exceptions import InvalidTag

from gossip.errors import MalformedMessageError, TamperedMessageError
from gossip.transport.bulk_proto import (
    RECORD_BYTES,
    TAG_BYTES,
    BulkKeys,
    BulkUnavailableError,
    record_ad,
    record_count,
    record_nonce,
    record_span,
)

__all__ = ["MMAP_MIN_BYTES", "PayloadBuffer", "new_buffer",
           "receive_records", "send_records"]

#: A fetched payload: a bytearray, or an anonymous mmap from ``MMAP_MIN_BYTES`` on.
PayloadBuffer = bytearray | mmap.mmap
MMAP_MIN_BYTES = 1 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: Huge pages are asked for from this size on (smaller buffers gain little)...
HUGE_MIN_BYTES = 8 << 20
HUGE_PAGE_BYTES = 2 << 20
_HUGE_ORDER = 9  # a 2 MiB block is 2**9 pages of 4 KiB
#: ... and populated with MADV_POPULATE_WRITE (Linux 5.14; Python 3.11's mmap lacks the name)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_BUDDYINFO = "/proc/buddyinfo"


def new_buffer(size: int) -> PayloadBuffer:
    """A zeroed, writable buffer of ``size`` bytes, its pages in place."""
    if size < MMAP_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return bytearray(size)
    if size >= HUGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE") \
            and free_huge_blocks() * HUGE_PAGE_BYTES >= 2 * size:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
            buf.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: its pages come as they are first written
            pass
        return buf
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)


def free_huge_blocks(path: str = _BUDDYINFO) -> int:
    """Free 2 MiB blocks the kernel has now (0 when it does not say)."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    blocks = 0
    for line in lines:
        # "Node 0, zone   Normal  <free blocks of order 0> <order 1> ... <order 10>"
        counts = line.split()[4:]
        try:
            blocks += sum(int(n) << (order - _HUGE_ORDER)
                          for order, n in enumerate(counts) if order >= _HUGE_ORDER)
        except ValueError:
            continue
    return blocks


async def send_records(tcp: trio.SocketStream, keys: BulkKeys, ticket_id: bytes,
                       data: memoryview, *, limiter: trio.CapacityLimiter,
                       idle_s: float) -> None:
    """Seal ``data`` into records and send them all (see :mod:`gossip.transport.bulk_proto`)."""
    await _in_thread(tcp, _send_blocking, limiter, idle_s, keys, ticket_id, data)


async def receive_records(tcp: trio.SocketStream, keys: BulkKeys, ticket_id: bytes,
                          out: memoryview, *, limiter: trio.CapacityLimiter, idle_s: float,
                          peer: str) -> None:
    """Receive and open every record of a payload of ``len(out)`` bytes into ``out``.

    TamperedMessageError when a record fails its tag (reordered, altered, cut, wrong key),
    MalformedMessageError when the connection ends early, BulkUnavailableError when it ends
    before the first byte (the server refused the hello: nothing was received).
    """
    await _in_thread(tcp, _receive_blocking, limiter, idle_s, keys, ticket_id, out, peer)


# --------------------------------------------------------------------------- the thread
def _send_blocking(sock: socket.socket, keys: BulkKeys, ticket_id: bytes,
                   data: memoryview) -> None:
    size = len(data)
    sealed = memoryview(bytearray(RECORD_BYTES + TAG_BYTES))
    for index in range(record_count(size)):
        start, end = record_span(index, size)
        n = keys.record.encrypt_into(record_nonce(index), data[start:end],
                                     record_ad(ticket_id, index, size),
                                     sealed[: end - start + TAG_BYTES])
        sock.sendall(sealed[:n])


def _receive_blocking(sock: socket.socket, keys: BulkKeys, ticket_id: bytes, out: memoryview,
                      peer: str) -> None:
    size = len(out)
    sealed = memoryview(bytearray(RECORD_BYTES + TAG_BYTES))
    for index in range(record_count(size)):
        start, end = record_span(index, size)
        record = sealed[: end - start + TAG_BYTES]
        got = 0
        while got < len(record):
            try:
                n = sock.recv_into(record[got:])
            except ConnectionResetError:
                n = 0  # a refusal resets, with the hello unread
            if not n and index == got == 0:
                raise BulkUnavailableError(f"{peer} closed the bulk connection unserved",
                                           peer=peer)
            if not n:
                raise MalformedMessageError(
                    f"bulk stream of {peer} ended in record {index} of {record_count(size)}",
                    peer=peer)
            got += n
        try:
            keys.record.decrypt_into(record_nonce(index), record,
                                     record_ad(ticket_id, index, size), out[start:end])
        except InvalidTag as exc:
            raise TamperedMessageError(f"bulk record {index} of {peer} failed its tag",
                                       peer=peer) from exc


class _Handoff:
    """A socket handed to a worker thread: closed by the thread if it ran, else by trio."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._taken = self._dropped = False

    def take(self) -> bool:
        with self._lock:
            self._taken = not self._dropped
            return self._taken

    def drop(self) -> None:
        with self._lock:
            self._dropped = True
            if not self._taken:
                self.sock.close()


def _run(handoff: _Handoff, work: Callable[..., None], idle_s: float, *args: object) -> None:
    if not handoff.take():
        return  # abandoned before it started
    with handoff.sock as sock:
        sock.settimeout(idle_s)
        work(sock, *args)


async def _in_thread(tcp: trio.SocketStream, work: Callable[..., None],
                     limiter: trio.CapacityLimiter, idle_s: float, *args: object) -> None:
    """Run ``work(sock, *args)`` on a blocking duplicate of ``tcp``'s socket, in a thread."""
    handoff = _Handoff(socket.socket(fileno=os.dup(tcp.socket.fileno())))
    done = False
    try:
        # trio-typing's stubs (pulled in by libp2p) predate ``abandon_on_cancel``
        await trio.to_thread.run_sync(  # type: ignore[call-arg]
            _run, handoff, work, idle_s, *args, abandon_on_cancel=True, limiter=limiter)
        done = True
    finally:
        if not done:  # cancelled or failed: wake the thread if it still waits on the socket
            handoff.drop()
            with contextlib.suppress(OSError):
                tcp.socket.shutdown(socket.SHUT_RDWR)
