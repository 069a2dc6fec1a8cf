"""A py-libp2p host as this project needs it, and py-libp2p's logging made bearable.

* :func:`new_libp2p_host` — TCP, Noise, Yamux only, with the guarded muxer of
  :mod:`gossip.transport.yamux_guard` installed.
* Logging: ``import libp2p`` detaches its logger; it is re-attached here (at import), a few
  chatty loggers are quietened, and the loggers a remote peer can make write (connection
  upgrades, Yamux, pubsub) write at most a few lines per call site per minute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from gossip.identity import Identity
from gossip.transport import yamux_guard
from gossip.transport.limits import LogLimiter, LogVerdict

#: py-libp2p loggers a remote peer can make write (failed upgrades, bad frames, bad RPCs).
PEER_DRIVEN_LOGGERS = (
    "libp2p.network.swarm",
    "libp2p.network.connection.swarm_connection",
    "libp2p.stream_muxer.yamux.yamux",
    "libp2p.pubsub.pubsub",
    "libp2p.pubsub.gossipsub",
    "libp2p.host.basic_host",
    "libp2p.protocol_muxer.multiselect",
    "libp2p.protocol_muxer.multiselect_client",
)


class CallSiteLimit(logging.Filter):
    """At most ``lines`` records per call site per ``period_s``; then one notice, then counts.

    py-libp2p formats peer ids into its messages, so the call site (logger and line) is what
    one kind of message has in common.
    """

    def __init__(self, *, lines: int = 10, period_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._limiter = LogLimiter(lines=lines, period_s=period_s)
        self._clock, self.period_s = clock, period_s

    def filter(self, record: logging.LogRecord) -> bool:
        verdict, suppressed = self._limiter.check(f"{record.name}:{record.lineno}",
                                                  self._clock())
        if verdict is LogVerdict.DROP:
            return False
        notes = []
        if suppressed:
            notes.append(f"{suppressed} similar lines were suppressed")
        if verdict is LogVerdict.WRITE_LAST:
            notes.append(f"more like this are suppressed for {self.period_s:.0f} s")
        if notes:
            record.msg = f"{record.msg} ({'; '.join(notes)})"
        return True


def _reattach_libp2p_logging() -> None:
    """Let py-libp2p's warnings reach the application's handlers again, a few at a time.

    ``import libp2p`` clears the handlers of its ``libp2p`` logger and turns propagation off
    (unless ``LIBP2P_DEBUG`` is set, when it installs handlers of its own).  Its level stays at
    WARNING, so only what matters propagates to the handlers configured at the entry point.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    logging.getLogger("libp2p").propagate = True
    # sets its own level to INFO and logs its state every 30 s
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.NOTSET)
    # logs every failed dial at ERROR, several times; the dial loop here logs it once
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
    for name in PEER_DRIVEN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, CallSiteLimit) for f in logger.filters):
            logger.addFilter(CallSiteLimit())


_reattach_libp2p_logging()


def libp2p_key_pair(identity: Identity) -> KeyPair:
    """The libp2p host key of ``identity`` (same ed25519 key, same peer id)."""
    private = Ed25519PrivateKey.from_bytes(identity.seed)
    return KeyPair(private, private.get_public_key())


def new_libp2p_host(identity: Identity, listen: Sequence[str], *, mdns: bool,
                    guard: yamux_guard.MuxGuard) -> Any:
    """A host (TCP, Noise, Yamux) whose muxer enforces ``guard``; not running yet."""
    key_pair = libp2p_key_pair(identity)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(
            key_pair, noise_privkey=new_x25519_key_pair().private_key
        )},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
        enable_mDNS=mdns,
    )
    yamux_guard.install(host.get_network(), guard)
    return host


@contextlib.contextmanager
def mdns_discovery(found: Callable[[str, tuple[str, ...]], None]) -> Iterator[None]:
    """Call ``found(peer, addresses)`` in this trio run for each peer mDNS finds.

    mDNS calls back in zeroconf's threads; the calls are handed to the trio run.
    """
    token = trio.lowlevel.current_trio_token()

    def on_peer(info: Any) -> None:
        peer, addrs = str(info.peer_id), tuple(str(a) for a in info.addrs)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(found, peer, addrs)

    peerDiscovery.register_peer_discovered_handler(on_peer)
    try:
        yield
    finally:
        peerDiscovery.unregister_peer_discovered_handler(on_peer)


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside (possibly nested) single-member groups, else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
