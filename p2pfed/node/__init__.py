"""The sans-IO federated node: one round state machine per component.

Nothing here sleeps, reads a clock, opens a socket or starts a thread.  Drivers (the daemon's
runtime and the simulator, see :mod:`p2pfed.runtime.driver`) feed events in — time, received
bytes, fetched payloads, finished local training — and carry out the actions that come back.

Round lifecycle of one component (everything that moves it lives in :data:`TRANSITIONS`)::

    IDLE --start--> TRAINING --trained--> COLLECTING --all in / deadline--> (mix) --> next round
                    (skipped when this node does not train the component)

On entering COLLECTING the node encodes its current state, stores it by digest, records a
durable ``local-update`` ledger entry and only then announces ``(component, round, digest)`` to
the component's holders among its neighbours.  Each neighbour's announcement triggers a fetch of
the payload by digest; the payload is checked against the announced digest, decoded and kept.
When every neighbour's update is in, or the deadline passes, the node mixes with
Metropolis–Hastings weights on the holders' subgraph; a missing neighbour's weight goes back to
self.  Announcements for later rounds are buffered (a bounded window); older ones are dropped.
"""

from p2pfed.node._node import EARLY, ROUND_WINDOW, Node, NodeConfig
from p2pfed.node._participation import KeepPace, TrainHours
from p2pfed.node._records import (
    ANNOUNCE,
    MAX_NOISE,
    Action,
    Announce,
    Announcement,
    ApplyForget,
    Broadcast,
    Connect,
    Fetch,
    ForgetApplied,
    Mixed,
    PeerRejected,
    RoundCompleted,
    Train,
)
from p2pfed.node._retention import RetentionPolicy
from p2pfed.node._state import HISTORY, TRANSITIONS, Event, Phase
from p2pfed.node._status import component_status, status_of

__all__ = [
    "ANNOUNCE",
    "EARLY",
    "HISTORY",
    "MAX_NOISE",
    "ROUND_WINDOW",
    "TRANSITIONS",
    "Action",
    "Announce",
    "Announcement",
    "ApplyForget",
    "Broadcast",
    "Connect",
    "Event",
    "Fetch",
    "ForgetApplied",
    "KeepPace",
    "Mixed",
    "Node",
    "NodeConfig",
    "PeerRejected",
    "Phase",
    "RetentionPolicy",
    "RoundCompleted",
    "Train",
    "TrainHours",
    "component_status",
    "status_of",
]
