"""Keeping connections to the peers a node wants, with capped, jittered backoff.

The :class:`Dialer` knows nothing of libp2p: it is handed a ``connect`` coroutine, a way to list
connected peers and a way to remember addresses, so its schedule is testable with fakes.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence

import trio

from gossip.errors import PeerUnreachableError
from gossip.transport.limits import Limits, TransportStats

log = logging.getLogger(__name__)

#: How often the loop re-checks connections when nothing else wakes it.
RECHECK_S = 1.0

Connect = Callable[[str, tuple[str, ...], float], Awaitable[None]]


def backoff_delay(attempt: int, rng: random.Random, *, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff with jitter: in [d/2, d] for d = min(cap, base * 2**attempt)."""
    delay = min(cap_s, base_s * math.pow(2.0, min(attempt, 62)))
    return delay / 2 + rng.uniform(0.0, delay / 2)


def split_p2p_addr(addr: str) -> tuple[str, str]:
    """``/ip4/.../tcp/N/p2p/<id>`` -> (peer id, transport address); ValueError otherwise."""
    base, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer or "/" in peer:
        raise ValueError(f"address {addr!r} does not end in /p2p/<peer id>")
    return peer, base


class Dialer:
    """Dials wanted peers that are not connected; failures back off, banned peers wait."""

    def __init__(self, local_peer: str, limits: Limits, stats: TransportStats,
                 rng: random.Random, *, connect: Connect,
                 connected: Callable[[], Sequence[str]],
                 remember: Callable[[str, tuple[str, ...]], None],
                 banned: Callable[[str], bool]) -> None:
        self.local_peer, self.limits, self.stats, self._rng = local_peer, limits, stats, rng
        self._connect, self._connected, self._remember = connect, connected, remember
        self._banned = banned
        #: wanted peer -> its transport addresses
        self.wanted: dict[str, tuple[str, ...]] = {}
        self._attempts: dict[str, int] = {}
        self._next_dial: dict[str, float] = {}
        self._dialing: set[str] = set()
        self._wake = trio.Event()

    def wake(self) -> None:
        """Run a round now rather than at the next recheck."""
        self._wake.set()

    def want(self, peer: str, addrs: Sequence[str]) -> None:
        """Keep a connection to ``peer`` at ``addrs`` (transport addresses, no /p2p/ part)."""
        if peer == self.local_peer:
            return
        if peer not in self.wanted and len(self.wanted) >= self.limits.max_wanted_peers:
            log.warning("not keeping a connection to %s: already %d wanted peers",
                        peer, len(self.wanted))
            return
        self.wanted[peer] = tuple(addrs)
        self._remember(peer, self.wanted[peer])
        self._wake.set()

    def drop(self, peer: str) -> None:
        """Stop keeping a connection to ``peer`` (an open connection stays until it closes)."""
        self.wanted.pop(peer, None)
        self._attempts.pop(peer, None)
        self._next_dial.pop(peer, None)

    def set_wanted(self, peers: dict[str, tuple[str, ...]]) -> None:
        """Keep connections to exactly these peers."""
        for peer in set(self.wanted) - set(peers):
            self.drop(peer)
        for peer, addrs in peers.items():
            self.want(peer, addrs)

    def add_bootstrap(self, addrs: Sequence[str]) -> list[str]:
        """Want the peers of these ``.../p2p/<id>`` addresses (an invite's); their peer ids."""
        found: dict[str, list[str]] = {}
        for addr in addrs:
            try:
                peer, base = split_p2p_addr(addr)
            except ValueError:
                log.warning("ignoring bootstrap address %r without /p2p/<peer id>", addr)
                continue
            found.setdefault(peer, []).append(base)
        for peer, bases in found.items():
            self.want(peer, tuple(dict.fromkeys(bases + list(self.wanted.get(peer, ())))))
        return sorted(p for p in found if p != self.local_peer)

    async def run(self, each_round: Callable[[], None]) -> None:
        """Dial until cancelled; ``each_round`` runs first in every round."""
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                each_round()
                now = trio.current_time()
                connected = set(self._connected())
                for peer, addrs in list(self.wanted.items()):
                    if peer in connected:
                        self._attempts.pop(peer, None)
                        self._next_dial.pop(peer, None)
                        continue
                    if (peer in self._dialing or not addrs or self._banned(peer)
                            or self._next_dial.get(peer, now) > now):
                        continue
                    if len(self._dialing) >= self.limits.max_concurrent_dials:
                        break
                    self._dialing.add(peer)
                    nursery.start_soon(self._dial, peer, addrs)
                with trio.move_on_after(RECHECK_S):
                    await self._wake.wait()

    async def _dial(self, peer: str, addrs: tuple[str, ...]) -> None:
        try:
            await self._connect(peer, addrs, self.limits.connect_timeout_s)
            log.info("connected to %s", peer)
        except PeerUnreachableError as exc:
            self.stats.dial_failures += 1
            attempt = self._attempts.get(peer, 0)
            delay = backoff_delay(attempt, self._rng, base_s=self.limits.backoff_min_s,
                                  cap_s=self.limits.backoff_max_s)
            if peer in self.wanted:
                self._attempts[peer] = attempt + 1
                self._next_dial[peer] = trio.current_time() + delay
            log.info("cannot reach %s (%s); next try in %.1f s", peer, exc, delay)
        finally:
            self._dialing.discard(peer)
            self._wake.set()
