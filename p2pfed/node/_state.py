"""A component's round: its phases, the table of transitions, and what a round holds.

Everything that moves a component's round lives here (h11's ``_state.py``): the node calls
:func:`transition` with an :class:`Event` (a move the table does not list is a bug), or the
moves built on it: :func:`begin` (the round limit and pacing), :func:`advance` (a round
mixed), :func:`jump` (catching up) and :func:`due` (what a deadline does).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from p2pfed.components import FlatComponent
from p2pfed.lineage import Lineage
from p2pfed.mixing import Memory
from p2pfed.node._records import Announcement
from p2pfed.node._replay import Replay
from p2pfed.provenance import Provenance

HISTORY = 1000  # rounds of disagreement history kept for status

class Phase(Enum):
    IDLE = "idle"
    TRAINING = "training"
    COLLECTING = "collecting"
    PAUSED = "paused"


class Event(Enum):
    START = "start"
    TRAINED = "trained"
    COMPLETE = "complete"  # every neighbour's update is in, or the deadline passed
    LIMIT = "limit"  # the round limit set by the driver was reached
    RESUME = "resume"
    ABANDON = "abandon"  # neighbours are rounds ahead: drop this round and catch up


#: Everything that moves a component's round lives here: (phase, event) -> next phase.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.IDLE, Event.START): Phase.TRAINING,
    (Phase.TRAINING, Event.TRAINED): Phase.COLLECTING,
    (Phase.COLLECTING, Event.COMPLETE): Phase.IDLE,
    (Phase.IDLE, Event.LIMIT): Phase.PAUSED,
    (Phase.PAUSED, Event.RESUME): Phase.IDLE,
    (Phase.COLLECTING, Event.ABANDON): Phase.IDLE,
    (Phase.TRAINING, Event.ABANDON): Phase.IDLE,  # rolled back while training
}



@dataclass
class Received:
    announcement: Announcement
    flat: torch.Tensor | None = None  # set once fetched and verified


@dataclass
class ComponentRound:
    comp: FlatComponent
    phase: Phase = Phase.IDLE
    round: int = 0
    deadline_ms: int | None = None
    start_at_ms: int | None = None  # earliest start of the next round (round pacing)
    started_ms: int | None = None  # when the current (or last) round started
    weights: dict[str, float] = field(default_factory=dict)  # MH row (self included)
    neighbours: tuple[str, ...] = ()
    # (round, peer) -> announcement and payload
    inbox: dict[tuple[int, str], Received] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    own_digest: bytes = b""
    #: per round mixed with neighbours, the largest relative distance to their updates
    disagreement: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    completed: int = 0  # rounds mixed since this node started
    #: members whose presence shapes this node's mixing weights (within two hops)
    weight_deps: Lineage = field(default_factory=Lineage)
    replay: Replay | None = None
    trained: bool = False  # this round's update includes local training
    #: the state before this round's training, when calibration or privacy needs it
    origin: torch.Tensor | None = None
    noise: float = 0.0  # the noise std this round's announcement declared
    memory: Memory = field(default_factory=Memory)  # what the mixing rule remembers
    start_digest: bytes = b""  # the state before this round's training (kept for fast mode)
    #: rounds since this state last took part in a mix with a neighbour: a catch-up adds the
    #: rounds it jumps over; a mix that takes in a neighbour's update sets it back to 0
    age: int = 0
    #: the state's mass vector: how much of each member's training it holds
    #: (:mod:`p2pfed.node._provenance`)
    prov: Provenance = field(default_factory=Provenance.empty)
    credit: float = 0.0  # the mass this round's training credited to this node
    make_up: int = 1  # the make-up factor of this round's training (on steps or the update)
    objective: tuple[str, float] | None = None  # the local objective this round trains with
    #: (lean, loss) this round's mix leans with (:func:`p2pfed.node._mix.lean_of`; None: not)
    lean: tuple[float, float] | None = None
    #: the first round whose share draw a make-up counts: the round this node last jumped ahead
    #: to (a catch-up, kept in the ledger) or was fast-forwarded to (a member joining a running
    #: federation), else 0
    since: int = 0

    @property
    def radius(self) -> float:
        """Clipped gossip's radius in the last round (part of :attr:`memory`)."""
        return self.memory.radius


def transition(state: ComponentRound, event: Event) -> None:
    """Move ``state`` on ``event`` as :data:`TRANSITIONS` says."""
    try:
        state.phase = TRANSITIONS[(state.phase, event)]
    except KeyError:
        raise AssertionError(f"no transition from {state.phase} on {event}") from None


def begin(state: ComponentRound, limit: int | None, now_ms: int, interval_ms: int) -> bool:
    """Start the next round unless the round limit is reached (the component pauses) or the
    round is paced to start later (``tick`` starts it); True when it started."""
    if limit is not None and state.round >= limit:
        transition(state, Event.LIMIT)
        return False
    if state.start_at_ms is not None and now_ms < state.start_at_ms:
        return False
    state.start_at_ms = now_ms + interval_ms if interval_ms > 0 else None
    state.started_ms = now_ms
    transition(state, Event.START)
    return True


def repace(state: ComponentRound, interval_ms: int) -> None:
    """The pace changed (a lone component got a neighbour, or lost its last): a waiting
    round may start ``interval_ms`` after the last one started."""
    if state.phase is Phase.IDLE and state.start_at_ms is not None and state.started_ms is not None:
        state.start_at_ms = state.started_ms + interval_ms


def advance(state: ComponentRound) -> None:
    """The round is mixed: on to the next (what arrived for later rounds is kept)."""
    state.inbox = {k: v for k, v in state.inbox.items() if k[0] > state.round}
    state.round += 1
    state.completed += 1
    state.deadline_ms = None
    transition(state, Event.COMPLETE)


def jump(state: ComponentRound, round_: int) -> None:
    """Catch up: neighbours are well ahead (a restart, a cut link); drop this round.  The
    state held is as many rounds older as are jumped over (its :attr:`~ComponentRound.age`)."""
    state.inbox = {k: v for k, v in state.inbox.items() if k[0] >= round_}
    state.age += max(0, round_ - state.round)
    state.round, state.deadline_ms, state.start_at_ms = round_, None, None
    state.since = max(state.since, round_)  # (the rounds jumped over are not made up)
    if state.phase is Phase.COLLECTING:
        transition(state, Event.ABANDON)


def due(state: ComponentRound, now_ms: int) -> Event | None:
    """What time alone does to ``state`` at ``now_ms``: a paced round may start, a collecting
    round's deadline has passed (it completes with what came), or nothing."""
    if state.phase is Phase.IDLE and state.start_at_ms is not None and now_ms >= state.start_at_ms:
        return Event.START
    if (state.phase is Phase.COLLECTING and state.deadline_ms is not None
            and now_ms >= state.deadline_ms):
        return Event.COMPLETE
    return None


def fast_forward(state: ComponentRound, round_: int) -> None:
    """A paused component moves to ``round_`` (a member rejoining a running federation)."""
    if state.phase not in (Phase.PAUSED, Phase.IDLE):
        raise AssertionError("fast_forward needs every component paused")
    if round_ > state.round:
        state.round = state.since = round_
        state.inbox.clear()


def all_in(state: ComponentRound) -> bool:
    """A collecting round has every neighbour's update of its round."""
    if state.phase is not Phase.COLLECTING:
        return False
    have = {p for (r, p), rec in state.inbox.items() if r == state.round and rec.flat is not None}
    return have.issuperset(state.neighbours)
