"""Which rounds this node trains in: a share of the rounds, and a schedule.

A member may train only some rounds (a phone that trains at night, a school that pauses for
the holidays).  A round it does not train is exactly a round of a component it does not train:
it still publishes its current state and mixes, so its neighbours never wait for it.

* The share (``NodeConfig.participation``) is a draw, deterministic per (node, round):
  :func:`drawn` hashes the node's peer id and the round, so every component of the node gets
  the same answer at round ``r`` (the components of one forward pass train together) and an
  exact unlearning's re-run of round ``r`` draws the same.
* The schedule (``NodeConfig.schedule``) is the driver's: a predicate on ``now_ms``, the time
  the driver passes in (this node reads no clock), such as :class:`TrainHours`, the daemon's
  ``[rounds] train_hours``.  The first component to start round ``r`` asks it; the others
  starting ``r`` get the same answer.  A re-run of round ``r`` cannot ask the clock of then:
  it trains where the round trained before (its ``local-update`` record, kept in
  :attr:`~p2pfed.node._replay.Replay.idle`).
* Every trained round records its make-up factor in its ``local-update``
  (:meth:`Participation.recorded`), and a re-run makes up by it
  (:attr:`~p2pfed.node._replay.Replay.made_up`), whatever ``participation`` and ``make_up``
  are then (a ledger written before the factor was recorded: the settings' factor).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gossip.envelope import digest
from p2pfed.config_sections import OBJECTIVES
from p2pfed.node._config import NodeConfig

if TYPE_CHECKING:
    from p2pfed.node._replay import Replay
    from p2pfed.node._state import ComponentRound

#: rounds whose schedule answer is remembered (components a few rounds apart share them)
_REMEMBERED = 16

log = logging.getLogger(__name__)


def draw(peer_id: str, round_: int) -> float:
    """A number in [0, 1) fixed by ``peer_id`` and ``round_`` (SHA-256, as the training seeds
    of :func:`p2pfed.model.train.seed_for` are)."""
    tag = repr(("participation", peer_id, round_)).encode()
    return int.from_bytes(digest(tag)[:8], "little") / 2.0 ** 64


def drawn(peer_id: str, round_: int, share: float) -> bool:
    """Does ``peer_id`` train at ``round_`` when it trains the share ``share`` of the rounds?
    (``share`` 1: always, without hashing.)"""
    return share >= 1.0 or draw(peer_id, round_) < share


def make_up(peer_id: str, round_: int, share: float, cap: int, since: int = 0) -> int:
    """The make-up factor of ``peer_id``'s round ``round_`` (on its steps, or on its update:
    ``NodeConfig.make_up_by``): 1 + the rounds just before it that the share's draw skipped,
    counting from round ``since`` (the node ran those: the rounds before it joined or jumped
    ahead were not the draw's to skip), at most ``cap`` (1 with ``share`` 1).  A
    member that trains a share p of the rounds makes up about 1/p (for p >= 1/cap), so over
    the rounds its data weighs about as much as a full-time member's; the draw is seeded and
    the factor recorded, so a re-run scales exactly as the round did.  A schedule's skipped
    hours are not made up (the re-run could not ask the clock of then)."""
    factor = 1
    while factor < cap and round_ - factor >= since and not drawn(peer_id, round_ - factor,
                                                                    share):
        factor += 1
    return factor


class Participation:
    """This node's answer, per round, to "do I train in this round?"."""

    def __init__(self, peer_id: str, share: float,
                 schedule: Callable[[int], bool] | None, cap: int = 1,
                 by: str = "update", objective: tuple[str, float] = ("erm", 1.0),
                 subsampled: bool = False) -> None:
        self.peer_id, self.share, self.schedule, self.cap = peer_id, share, schedule, cap
        self.by = by  # what the make-up multiplies: "update" or "steps"
        #: the node's local objective and tilt (``NodeConfig.objective``)
        self.objective = objective
        #: differential privacy samples its data (``sample_rate`` below 1) on a component
        self.subsampled = subsampled
        self._asked: OrderedDict[int, bool] = OrderedDict()

    @classmethod
    def of(cls, peer_id: str, config: NodeConfig) -> Participation:
        return cls(peer_id, config.participation, config.schedule, config.make_up,
                   config.make_up_by, config.objective,
                   any(p.sample_rate < 1 for p in config.privacy.values()))

    def factor(self, round_: int, since: int = 0) -> int:
        """The make-up factor of this node's round ``round_``, counting the draws from round
        ``since`` on (:func:`make_up`)."""
        return 1 if self.share >= 1.0 else make_up(self.peer_id, round_, self.share, self.cap,
                                                   since)

    def how(self, st: ComponentRound, replay: Replay | None) -> tuple[int, tuple[str, float]]:
        """How the round ``st`` starts, which trains, trains: its make-up factor (counting the
        draws from ``st.since`` on, :meth:`factor`) and its local objective (the node's); in a
        re-run, the ones the round recorded (the settings may have changed since)."""
        if replay is not None:  # (a round not recorded: a ledger from before they were
            # recorded, whose rounds counted every draw)
            return (replay.made_up.get(st.round) or self.factor(st.round),
                    self._usable(replay.objectives.get(st.round, self.objective)))
        return self.factor(st.round, st.since), self.objective

    def _usable(self, objective: tuple[str, float]) -> tuple[str, float]:
        """A recorded objective, unless it cannot run now: one this version does not know (a
        newer p2pfed wrote it), or group-dro where differential privacy now samples the data
        (it would draw a small group's examples more often than the accountant counts).  Then
        the node's own, with a warning: that re-run is not exact."""
        name = objective[0]
        if name in OBJECTIVES and not (name == "group-dro" and self.subsampled):
            return objective
        log.warning("a re-run trains with %s, not the recorded %s (%s)", self.objective[0],
                    name, "unknown here" if name not in OBJECTIVES
                    else "privacy now samples the data")
        return self.objective

    def recorded(self, st: ComponentRound) -> dict[str, Any]:
        """What the round's ``local-update`` record keeps of how it trained: the make-up
        factor (1 included), the objective and the lean of its mix of a trained round (nothing
        for a round that did not train), so that a re-run trains and mixes as the round did
        whatever the settings are then."""
        if not st.trained:
            return {}
        return {"make_up": st.make_up, "objective": st.objective,
                "lean": st.lean[0] if st.lean is not None else None}

    def scale(self, factor: int) -> int:
        """The factor on a round's update, of make-up ``factor`` (1 when made up by steps)."""
        return factor if self.by == "update" else 1

    def steps(self, factor: int) -> int:
        """The factor on the trainer's steps, of make-up ``factor`` (1 when made up by the
        update)."""
        return factor if self.by == "steps" else 1

    def trains(self, round_: int, now_ms: int, idle: Collection[int] | None = None) -> bool:
        """May this node train at ``round_`` (asked at ``now_ms``)?  ``idle``: in a re-run,
        the rounds it did not train before (they stand in for the schedule)."""
        if idle is not None:  # (a re-run trains where the round trained: settings may change)
            return round_ not in idle
        if not drawn(self.peer_id, round_, self.share):
            return False
        if self.schedule is None:
            return True
        allowed = self._asked.get(round_)
        if allowed is None:
            allowed = self._asked[round_] = bool(self.schedule(now_ms))
            while len(self._asked) > _REMEMBERED:
                self._asked.popitem(last=False)
        return allowed


@dataclass(frozen=True)
class TrainHours:
    """A schedule: training is allowed from local hour ``start`` to ``end`` (excluded),
    wrapping midnight (``TrainHours(22, 6)``: 22:00 to 5:59).  Called with ``now_ms`` (the
    driver's time, ms since the Unix epoch) it answers for the process's time zone."""

    start: int
    end: int

    def allows(self, hour: int) -> bool:
        """Is local ``hour`` (0 to 23) one of the hours?"""
        if self.start <= self.end:
            return self.start <= hour < self.end
        return hour >= self.start or hour < self.end

    def __call__(self, now_ms: int) -> bool:
        return self.allows(time.localtime(now_ms // 1000).tm_hour)


class KeepPace:
    """A schedule for a member whose training takes longer than a round (a phone): after a
    training that started at ``a``, the next starts no earlier than ``a + train + interval``,
    so between trainings the member runs rounds that only mix, catches up with its neighbours
    (whose states it would otherwise miss: it buffers at most a few rounds ahead) and its own
    states reach them again on time.  ``train_ms()`` is how long a training takes (the
    daemon: its measured mean; the simulator: the profile's).  The rounds it skips are not
    made up (a re-run trains where the run trained: its ``local-update`` records).  A member
    whose training fits in a round interval trains every round."""

    def __init__(self, train_ms: Callable[[], float], interval_ms: int) -> None:
        self.train_ms, self.interval_ms = train_ms, interval_ms
        self._next_ms: float | None = None

    def __call__(self, now_ms: int) -> bool:
        train_ms = self.train_ms()
        if train_ms <= self.interval_ms:  # (fast enough: every round)
            return True
        if self._next_ms is not None and now_ms < self._next_ms:
            return False
        self._next_ms = now_ms + train_ms + self.interval_ms
        return True
