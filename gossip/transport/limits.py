"""Budgets of the network transport: what every peer may cost us, as plain bookkeeping.

Nothing here does I/O or reads a clock: time comes in as ``now`` (seconds, any monotonic
origin), so the rules are testable without sockets.  :mod:`gossip.transport.guard` applies them.

* :class:`Limits` — the timeouts and caps of one transport.
* :class:`StreamSlots` — open inbound streams per peer, per remote IP and in total, in two pools:
  members, and strangers (peers the membership policy does not know), so strangers can never
  take the slots members need.
* :class:`Penalties` — strikes per peer in a sliding window; too many and the peer is banned
  (disconnected and refused) for a period that doubles on each new ban.
* :class:`LogLimiter` — at most a few log lines per peer per period, then one notice.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Timeouts, caps and tuning of one transport."""

    connect_timeout_s: float = 10.0
    #: a sender's bound on delivering one control message (connect, write, acknowledgement)
    control_timeout_s: float = 15.0
    #: a server's bound on reading one request: a control frame, a payload request
    request_timeout_s: float = 5.0
    #: a client's bound on one payload fetch, and a server's on writing one payload
    fetch_timeout_s: float = 300.0
    #: inbound control and payload streams a member may hold open at once
    inbound_streams_per_peer: int = 16
    #: control and payload streams this host opens to one peer at once (more wait their turn)
    outbound_streams_per_peer: int = 8
    #: inbound control and payload streams of all members together
    inbound_streams_total: int = 256
    #: inbound control streams a stranger may hold open (it may send its join request)
    stranger_streams_per_peer: int = 2
    stranger_streams_per_ip: int = 8
    stranger_streams_total: int = 32
    #: open inbound streams of any protocol on one connection (more are reset when accepted)
    streams_per_connection: int = 64
    stranger_streams_per_connection: int = 8
    #: inbound connections from strangers (more are refused after the handshake)
    stranger_connections_per_ip: int = 16
    stranger_connections_total: int = 64
    #: protocol violations (oversized or truncated frames, junk records, stalls of strangers)
    #: within ``strike_window_s`` that get a peer disconnected and refused for a while
    strikes_to_disconnect: int = 5
    strike_window_s: float = 60.0
    #: the first ban lasts ``ban_min_s``; each further ban of the same peer twice as long
    ban_min_s: float = 30.0
    ban_max_s: float = 3600.0
    #: log lines about one peer per ``log_period_s``; the rest are counted, not written
    log_lines_per_peer: int = 5
    log_period_s: float = 60.0
    max_wanted_peers: int = 1024
    max_concurrent_dials: int = 8
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0
    #: Bytes handed to one ``stream.write`` when serving a payload.  Yamux cuts them into
    #: 64 KiB frames anyway; fewer, larger writes save per-call overhead.  Measured here (64 MB,
    #: two processes, MB/s): 64 KiB ~115, 256 KiB ~150, 1 MiB ~160, 4 MiB ~169, 16 MiB ~169.
    write_chunk: int = 4 << 20
    #: GossipSub: the most records a peer may forward on the topic per second.
    max_records_per_second: float = 50.0
    #: Bulk channel (:mod:`gossip.transport.bulk`): a ticket is good once, for this long
    bulk_ticket_ttl_s: float = 10.0
    #: outstanding tickets per member and in total (more: the fetch uses the libp2p stream)
    bulk_tickets_per_peer: int = 4
    bulk_tickets_total: int = 64
    #: payload bytes outstanding tickets keep in memory (past it, a ticket keeps none and the
    #: payload is looked up again, and checked, when the ticket is redeemed)
    bulk_ticket_bytes: int = 256 << 20
    #: open connections to the bulk port, from one IP address and in total (before and after
    #: their ticket is checked; a transfer also takes one of the member's stream slots)
    bulk_connections_per_ip: int = 8
    bulk_connections_total: int = 32
    #: after the bulk channel failed with a peer, fetch from it over the libp2p stream this long
    bulk_retry_s: float = 60.0
    #: a client's bound on connecting to a bulk port (a firewall may drop it: fall back soon)
    bulk_connect_timeout_s: float = 3.0


@dataclass
class TransportStats:
    """Counters of one transport (read by tests, metrics and the daemon's status)."""

    sent: int = 0
    received: int = 0
    #: messages lost because the inbox was full
    dropped: int = 0
    #: inbound streams refused: oversized or short frames, too many streams, bad requests
    rejected: int = 0
    broadcasts_sent: int = 0
    broadcasts_received: int = 0
    fetches: int = 0
    fetch_bytes: int = 0
    served: int = 0
    served_bytes: int = 0
    dial_failures: int = 0
    #: streams and connections of non-members refused (payload requests, over their budget)
    refused_strangers: int = 0
    #: connections refused because the peer is banned for misbehaving
    refused_banned: int = 0
    #: connections closed because the peer wrote past a stream's receive window
    window_overruns: int = 0
    #: broadcast records the record validator (or the size cap) refused
    records_rejected: int = 0
    #: protocol violations counted against peers
    strikes: int = 0
    #: peers disconnected and banned for misbehaving
    disconnected: int = 0
    #: log lines about noisy peers that were counted instead of written
    log_lines_suppressed: int = 0
    #: times one peer id was connected from two places at once (a copied home running)
    duplicate_identity: int = 0
    #: payloads fetched (and served) over the bulk channel; also counted in fetches (served)
    bulk_fetches: int = 0
    bulk_served: int = 0
    #: fetches that fell back to the libp2p stream (no bulk channel with that peer)
    bulk_fallbacks: int = 0
    #: bulk connections closed unserved: unknown, used, expired or unproven ticket, over a cap
    bulk_refused: int = 0


@dataclass(frozen=True)
class Budget:
    """Caps on the open inbound streams of one pool."""

    per_peer: int
    per_ip: int
    total: int


@dataclass(frozen=True)
class Slot:
    """One admitted inbound stream; hand it back to :meth:`StreamSlots.release`."""

    peer: str
    ip: str
    member: bool


class StreamSlots:
    """Open inbound streams per peer, per remote IP and in total; members and strangers apart."""

    def __init__(self, members: Budget, strangers: Budget) -> None:
        self._budgets = {True: members, False: strangers}
        self._peers: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}
        self._ips: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}

    def acquire(self, peer: str, ip: str | None, *, member: bool) -> Slot | None:
        """A slot for one more stream of ``peer`` from ``ip``; None when over a cap."""
        budget, peers, ips = self._budgets[member], self._peers[member], self._ips[member]
        ip = ip or "?"
        if (peers[peer] >= budget.per_peer or ips[ip] >= budget.per_ip
                or peers.total() >= budget.total):
            return None
        peers[peer] += 1
        ips[ip] += 1
        return Slot(peer, ip, member)

    def release(self, slot: Slot) -> None:
        for counter, key in ((self._peers[slot.member], slot.peer),
                             (self._ips[slot.member], slot.ip)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def open(self, *, member: bool) -> int:
        """Streams open in one pool."""
        return self._peers[member].total()

    def of_peer(self, peer: str) -> int:
        return self._peers[True][peer] + self._peers[False][peer]


class Penalties:
    """Strikes per peer in a sliding window, and bans that double for repeat offenders.

    At most ``max_peers`` peers are remembered (throw-away identities are free): the least
    recently struck are forgotten first, but a banned peer is kept until its ban ends.
    """

    def __init__(self, *, strikes: int, window_s: float, ban_min_s: float, ban_max_s: float,
                 max_peers: int = 4096) -> None:
        if strikes < 1:
            raise ValueError("strikes must be at least 1")
        self.strikes, self.window_s = strikes, window_s
        self.ban_min_s, self.ban_max_s = ban_min_s, ban_max_s
        self.max_peers = max_peers
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned_until: dict[str, float] = {}
        self._bans: OrderedDict[str, int] = OrderedDict()

    def strike(self, peer: str, now: float) -> float | None:
        """Count a violation; the ban's length when this one crosses the threshold, else None."""
        times = self._strikes.pop(peer, None) or deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        times.append(now)
        if len(times) < self.strikes:
            self._strikes[peer] = times
            self._trim(now)
            return None
        return self.ban(peer, now)

    def ban(self, peer: str, now: float) -> float:
        """Ban ``peer`` from ``now``; returns how long (doubling with each ban, capped)."""
        self._strikes.pop(peer, None)
        count = self._bans.pop(peer, 0)
        self._bans[peer] = count + 1
        duration = min(self.ban_max_s, self.ban_min_s * math.pow(2.0, min(count, 62)))
        self._banned_until[peer] = max(self._banned_until.get(peer, now), now + duration)
        self._trim(now)
        return duration

    def banned_until(self, peer: str, now: float) -> float | None:
        """When the ban of ``peer`` ends, or None if it is not banned."""
        until = self._banned_until.get(peer)
        if until is None:
            return None
        if until <= now:
            del self._banned_until[peer]
            return None
        return until

    def banned(self, peer: str, now: float) -> bool:
        return self.banned_until(peer, now) is not None

    def _trim(self, now: float) -> None:
        while len(self._strikes) > self.max_peers:
            self._strikes.popitem(last=False)
        while len(self._bans) > self.max_peers:
            self._bans.popitem(last=False)
        if len(self._banned_until) > self.max_peers:
            for peer in [p for p, until in self._banned_until.items() if until <= now]:
                del self._banned_until[peer]


class LogVerdict(enum.Enum):
    """What to do with one log line about a peer."""

    WRITE = "write"
    #: write it, then say that further lines about this peer are suppressed for a while
    WRITE_LAST = "write-last"
    DROP = "drop"


class LogLimiter:
    """At most ``lines`` log lines per peer per ``period_s``; the rest are counted.

    :meth:`check` also returns how many lines were suppressed since the last written one, so
    the next written line can say so.
    """

    def __init__(self, *, lines: int, period_s: float, max_peers: int = 1024) -> None:
        self.lines, self.period_s, self.max_peers = lines, period_s, max_peers
        #: peer -> (start of its period, lines written in it, lines suppressed since)
        self._state: OrderedDict[str, tuple[float, int, int]] = OrderedDict()

    def check(self, peer: str, now: float) -> tuple[LogVerdict, int]:
        start, written, suppressed = self._state.pop(peer, (now, 0, 0))
        if now - start >= self.period_s:
            start, written = now, 0
        if written >= self.lines:
            self._remember(peer, (start, written, suppressed + 1))
            return LogVerdict.DROP, 0
        written += 1
        self._remember(peer, (start, written, 0))
        verdict = LogVerdict.WRITE_LAST if written == self.lines else LogVerdict.WRITE
        return verdict, suppressed

    def _remember(self, peer: str, state: tuple[float, int, int]) -> None:
        self._state[peer] = state
        while len(self._state) > self.max_peers:
            self._state.popitem(last=False)
