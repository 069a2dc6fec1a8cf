"""Who may cost this host what: the membership policy applied to connections, streams and logs.

A :class:`PeerGuard` is shared by every part of one transport: the muxer asks it whether to
accept a connection or a stream and reports window overruns, the stream handlers ask it for a
slot, the GossipSub validator reports junk.  Peers the membership policy does not know
(*strangers*) get a small budget of their own; peers that keep misbehaving are banned: the
transport closes their connections (``on_ban``) and the muxer refuses new ones until the ban
ends.  Without a policy every peer counts as a member and only the members' caps apply.

Lines logged about a peer go through :meth:`PeerGuard.log`, which writes a few per peer per
period and counts the rest, so a hostile peer cannot fill the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from gossip.transport.base import PeerPolicy, RecordValidator
from gossip.transport.limits import (
    Budget,
    Limits,
    LogLimiter,
    LogVerdict,
    Penalties,
    Slot,
    StreamSlots,
    TransportStats,
)

log = logging.getLogger(__name__)


class Connection(Protocol):
    """What the guard needs of a live connection it counts."""

    @property
    def is_closed(self) -> bool: ...


class PeerGuard:
    """The membership policy, the stream budgets, the strikes and bans of one transport."""

    def __init__(self, limits: Limits, stats: TransportStats, *, local_peer: str = "",
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.limits, self.stats, self.clock = limits, stats, clock
        #: this host's own peer id: never struck, always a member
        self.local_peer = local_peer
        self._is_member: PeerPolicy | None = None
        self._validate: RecordValidator | None = None
        self.slots = StreamSlots(
            Budget(limits.inbound_streams_per_peer, limits.inbound_streams_total,
                   limits.inbound_streams_total),
            Budget(limits.stranger_streams_per_peer, limits.stranger_streams_per_ip,
                   limits.stranger_streams_total),
        )
        self.penalties = Penalties(strikes=limits.strikes_to_disconnect,
                                   window_s=limits.strike_window_s,
                                   ban_min_s=limits.ban_min_s, ban_max_s=limits.ban_max_s)
        self._log = LogLimiter(lines=limits.log_lines_per_peer, period_s=limits.log_period_s)
        #: inbound connections of strangers: (connection, peer, remote IP)
        self._strangers: list[tuple[Connection, str, str]] = []
        #: open inbound connections per peer and where they come from (``ip:port``)
        self._inbound: dict[str, list[tuple[Connection, str]]] = {}
        #: called with a peer id when the peer is banned: close its connections
        self.on_ban: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ policy
    def set_policy(self, is_member: PeerPolicy | None) -> None:
        self._is_member = is_member

    def set_record_validator(self, validate: RecordValidator | None) -> None:
        self._validate = validate

    @property
    def has_policy(self) -> bool:
        return self._is_member is not None

    def is_member(self, peer: str) -> bool:
        """True without a policy; a policy that fails counts the peer as a stranger."""
        policy = self._is_member
        if policy is None or peer == self.local_peer:
            return True
        try:
            return bool(policy(peer))
        except Exception:  # the daemon's code: fail closed, never break the host
            self.log("policy", logging.ERROR, "the peer policy failed on %s", peer,
                     exc_info=True)
            return False

    def accept_record(self, forwarder: str, origin: str, data: bytes) -> bool:
        """Run the record validator; junk a peer sent of its own (or any stranger's) strikes it.

        A member relaying a record of someone else is not struck: its view of the membership
        may simply be ahead of ours (a member we do not know of yet).
        """
        validate = self._validate
        try:
            ok = validate is None or bool(validate(origin, data))
        except Exception:
            self.log("validator", logging.ERROR, "the record validator failed on a record "
                     "from %s", origin, exc_info=True)
            ok = False
        if not ok:
            self.stats.records_rejected += 1
            if forwarder == origin or not self.is_member(forwarder):
                self.strike(forwarder, "sent a record the validator refused")
        return ok

    # ------------------------------------------------------------------ connections
    def refuse_connection(self, peer: str, ip: str | None, *, inbound: bool) -> str | None:
        """Why a new connection with ``peer`` is refused, or None to accept it."""
        now = self.clock()
        until = self.penalties.banned_until(peer, now)
        if until is not None:
            self.stats.refused_banned += 1
            self.log(peer, logging.INFO, "refusing a connection with %s: banned for %.0f s",
                     peer, until - now)
            return "banned"
        if not inbound or self.is_member(peer):
            return None
        ip = ip or "?"
        self._strangers = [(c, p, i) for c, p, i in self._strangers
                           if not c.is_closed and not self.is_member(p)]
        from_ip = sum(1 for _, _, i in self._strangers if i == ip)
        if (from_ip >= self.limits.stranger_connections_per_ip
                or len(self._strangers) >= self.limits.stranger_connections_total):
            self.stats.refused_strangers += 1
            self.log(ip, logging.INFO, "refusing a connection with %s (not a member) from %s: "
                     "too many strangers", peer, ip)
            return "too many strangers"
        return None

    def track_connection(self, conn: Connection, peer: str, ip: str | None, *,
                         inbound: bool, remote: str | None = None) -> None:
        """Count an accepted inbound connection of a stranger against their budget, and warn
        when one peer id is connected from two places at once (one identity, two nodes)."""
        if not inbound:
            return
        if not self.is_member(peer):
            self._strangers.append((conn, peer, ip or "?"))
        where = remote or ip or "?"
        live = [(c, w) for c, w in self._inbound.get(peer, []) if not c.is_closed]
        others = sorted({w for _, w in live if w != where})
        if others:
            self.stats.duplicate_identity += 1
            self.log(f"twice:{peer}", logging.WARNING,
                     "%s is connected from %s and from %s at once: two nodes run with one "
                     "identity (a copied or restored home still running?); stop one of them",
                     peer, where, ", ".join(others))
        live.append((conn, where))
        self._inbound[peer] = live
        cap = self.limits.max_wanted_peers + self.limits.stranger_connections_total
        if len(self._inbound) > cap:  # forget peers whose connections have all closed
            self._inbound = {p: [(c, w) for c, w in cs if not c.is_closed]
                             for p, cs in self._inbound.items()}
            self._inbound = {p: cs for p, cs in self._inbound.items() if cs}

    def stream_cap(self, peer: str) -> int:
        """Inbound streams ``peer`` may hold open on one connection (of any protocol)."""
        if self.is_member(peer):
            return self.limits.streams_per_connection
        return self.limits.stranger_streams_per_connection

    def stream_refused(self, peer: str) -> None:
        """The muxer reset a new stream of ``peer``: too many open on its connection."""
        self.stats.rejected += 1
        if not self.is_member(peer):
            self.stats.refused_strangers += 1
        self.log(peer, logging.INFO, "resetting a stream from %s: too many open on the "
                 "connection", peer)

    def window_overrun(self, peer: str, stream_id: int, excess: int) -> None:
        """``peer`` wrote past a stream's receive window: its connection is being closed."""
        self.stats.window_overruns += 1
        self._ban(peer, f"wrote {excess} bytes past the receive window of stream {stream_id}")

    # ------------------------------------------------------------------ streams
    def admit_stream(self, peer: str, ip: str | None, *, members_only: bool) -> Slot | None:
        """A slot for one inbound control or payload stream, or None (reset it unread)."""
        if self.penalties.banned(peer, self.clock()):
            self.stats.refused_banned += 1
            return None
        member = self.is_member(peer)
        if not member and members_only:
            self.stats.refused_strangers += 1
            self.log(peer, logging.INFO, "refusing a stream from %s: not a member", peer)
            return None
        slot = self.slots.acquire(peer, ip, member=member)
        if slot is None:
            self.stats.rejected += 1
            if not member:
                self.stats.refused_strangers += 1
            self.log(peer, logging.INFO, "refusing a stream from %s%s: too many open streams",
                     peer, "" if member else " (not a member)")
        return slot

    def release(self, slot: Slot) -> None:
        self.slots.release(slot)

    # ------------------------------------------------------------------ misbehaviour
    def strike(self, peer: str, reason: str) -> None:
        """Count a protocol violation; enough of them in a window ban the peer."""
        if peer == self.local_peer:
            return
        self.stats.strikes += 1
        duration = self.penalties.strike(peer, self.clock())
        if duration is None:
            self.log(peer, logging.INFO, "%s %s", peer, reason)
        else:
            self._announce_ban(peer, reason, duration)

    def banned(self, peer: str) -> bool:
        return self.penalties.banned(peer, self.clock())

    def banned_until(self, peer: str) -> float | None:
        return self.penalties.banned_until(peer, self.clock())

    def _ban(self, peer: str, reason: str) -> None:
        self._announce_ban(peer, reason, self.penalties.ban(peer, self.clock()))

    def _announce_ban(self, peer: str, reason: str, duration: float) -> None:
        self.stats.disconnected += 1
        self.log(peer, logging.WARNING, "disconnecting %s and refusing it for %.0f s: %s",
                 peer, duration, reason)
        if self.on_ban is not None:
            self.on_ban(peer)

    # ------------------------------------------------------------------ logging
    def log(self, key: str, level: int, msg: str, *args: object,
            exc_info: bool = False) -> None:
        """Log a line about ``key`` (a peer, an address), a few per period at most."""
        if not log.isEnabledFor(level):
            return
        verdict, suppressed = self._log.check(key, self.clock())
        if verdict is LogVerdict.DROP:
            self.stats.log_lines_suppressed += 1
            return
        if suppressed:
            log.log(level, "(%d lines about %s were suppressed)", suppressed, key)
        log.log(level, msg, *args, exc_info=exc_info)
        if verdict is LogVerdict.WRITE_LAST:
            log.log(level, "suppressing further lines about %s for %.0f s", key,
                    self.limits.log_period_s)
