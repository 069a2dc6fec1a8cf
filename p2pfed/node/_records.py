"""The node's records: the signed announcement it sends, and the actions it returns.

Frozen records in a module of their own (h11's ``_events.py``): the node returns actions, a
driver (:mod:`p2pfed.runtime.driver`) carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gossip.envelope import packb, unpackb
from gossip.errors import MalformedMessageError, RemoteError
from p2pfed.lineage import Lineage
from p2pfed.provenance import Provenance

ANNOUNCE = "announce"

#: the largest noise standard deviation an announcement may declare (also refuses inf)
MAX_NOISE = 1e6
#: the largest age an announcement may declare (it may not exceed its round either)
MAX_AGE = 1 << 32


@dataclass(frozen=True)
class Announcement:
    """A small signed control record: "my update of ``component`` for ``round`` is ``digest``"."""

    component: str
    round: int
    digest: bytes
    size: int
    degree: int
    lineage: Lineage
    noise: float = 0.0
    #: how many forget requests the sender had applied: updates of an older epoch may carry a
    #: forgotten member's influence and are never mixed
    epoch: int = 0
    #: rounds since the announced state last took part in a mix (0 but after a catch-up: see
    #: :func:`p2pfed.mixing.stale_weights`); sent as a 9th element only when above 0 or
    #: followed by a 10th, so an announcement of a fresh state without provenance is the 8
    #: elements older peers send and read
    age: int = 0
    #: the announced state's mass vector (:mod:`p2pfed.provenance`), a 10th element
    #: ``[masses aligned to lineage, flags]``; None: the sender keeps none
    prov: Provenance | None = None

    def to_body(self) -> bytes:
        fields = [self.component, self.round, self.digest, self.size, self.degree,
                  self.lineage.packed, self.noise, self.epoch]
        if self.prov is not None:
            return packb([*fields, self.age, [self.prov.encode(self.lineage),
                                              self.prov.flags]])
        return packb([*fields, self.age] if self.age > 0 else fields)

    @classmethod
    def from_body(cls, body: bytes) -> Announcement:
        obj = unpackb(body)
        if not isinstance(obj, list) or len(obj) not in (8, 9, 10):
            raise MalformedMessageError("announcement must be an 8- to 10-element array")
        component, rnd, dig, size, degree, lineage, noise, epoch = obj[:8]
        age = obj[8] if len(obj) >= 9 else 0
        ok = (
            isinstance(component, str)
            and isinstance(rnd, int) and rnd >= 0
            and isinstance(dig, bytes) and len(dig) == 32
            and isinstance(size, int) and size > 0
            and isinstance(degree, int) and degree >= 0
            and isinstance(noise, int | float) and 0.0 <= noise <= MAX_NOISE
            and isinstance(epoch, int) and epoch >= 0
            and type(age) is int and 0 <= age <= min(rnd, MAX_AGE)
        )
        if not ok:
            raise MalformedMessageError("announcement fields have wrong types or ranges")
        # (packed tags; an older peer sends its members' peer ids)
        members = Lineage.decode_wire(lineage)
        prov = None
        if len(obj) == 10:
            if not isinstance(obj[9], list) or len(obj[9]) != 2:
                raise MalformedMessageError("an announcement's provenance is [masses, flags]")
            prov = Provenance.decode(members, *obj[9])
        return cls(component, rnd, dig, size, degree, members, float(noise), epoch, age, prov)


# --------------------------------------------------------------------------------------------
# Actions (what the driver must do)


@dataclass(frozen=True)
class Announce:
    """Deliver ``data`` (a sealed envelope) to each of ``recipients``."""

    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class Fetch:
    """Fetch the payload with ``digest`` from ``peer`` and report back (at most ``max_bytes``)."""

    peer: str
    component: str
    round: int
    digest: bytes
    max_bytes: int


@dataclass(frozen=True)
class Train:
    """Run local training of ``component`` for ``round``, then call ``local_update_done``;
    ``steps``: train this many times the usual steps (a part-time member making up the rounds
    it skipped, :class:`~p2pfed.node._participation.Participation`); ``objective``: the local
    objective, as the round records it."""

    component: str
    round: int
    steps: int = 1
    #: the local objective and tilt to train with (None: the trainer's own)
    objective: tuple[str, float] | None = None


@dataclass(frozen=True)
class RoundCompleted:
    component: str
    round: int
    mixed_with: tuple[str, ...]
    missing: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Mixed:
    """``component``'s state right after round ``round`` mixed (a copy), in forget ``epoch``.

    Returned only with ``NodeConfig.report_mixes`` (the simulator's trace)."""

    component: str
    round: int
    epoch: int
    state: torch.Tensor


@dataclass(frozen=True)
class PeerRejected:
    """A peer's message was refused (for scoring and logs); the node carries on."""

    peer: str
    error: RemoteError


@dataclass(frozen=True)
class Connect:
    """Keep connections to these peers: (peer id, addresses) pairs (federated nodes)."""

    peers: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Broadcast:
    """Publish ``data`` to the whole federation (GossipSub on the network)."""

    data: bytes


@dataclass(frozen=True)
class ApplyForget:
    """Call :meth:`Node.forget` for ``target`` (with no training thread running)."""

    target: str
    mode: str


@dataclass(frozen=True)
class ForgetApplied:
    """``target`` is forgotten: its influence is rolled back (re-runs may still be under way).

    Drivers wake whoever waits for it (the daemon's ``unlearn`` command)."""

    target: str


Action = (Announce | Fetch | Train | RoundCompleted | Mixed | PeerRejected | Connect | Broadcast
          | ApplyForget | ForgetApplied)


