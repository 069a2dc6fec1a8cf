"""The node's side of provenance shares (:mod:`p2pfed.provenance`): what it credits, sends,
records and restores.

Each component's state carries a mass vector (``ComponentRound.prov``).  A training round
credits the node's own member with the norm of what it added to the state — measured after
fast unlearning's calibration and after differential privacy clipped and noised the update,
since that is what entered the state — the announcement carries the vector of the state it
announces, and the mix combines the vectors with the weights the parameters were mixed with
(:func:`p2pfed.node._mix.mix_round`).  The ledger keeps the vector in the ``local-update``
(the credit), ``contribution``, ``mix`` and ``checkpoint`` entries, so a restart and an
unlearning re-run carry it on exactly.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from p2pfed.lineage import MAX_MEMBERS, Lineage
from p2pfed.node._records import Announcement
from p2pfed.node._state import ComponentRound
from p2pfed.provenance import APPROX, PARTIAL, Provenance

#: an announcement carries its vector while its lineage names at most this many members: the
#: masses (8 bytes a member) and the lineage (8 more) must fit one control frame; above it the
#: receivers mark the mass they cannot attribute (PARTIAL)
SEND_MAX_MEMBERS = MAX_MEMBERS // 2

__all__ = ["SEND_MAX_MEMBERS", "Fields", "Provenance", "credit", "fields", "outgoing",
           "received", "recorded"]


def credit(st: ComponentRound, self_tag: bytes, origin: torch.Tensor | None, *,
           stored: torch.Tensor | None = None, approx: bool = False) -> float:
    """Credit this node's member with this round's update: the state minus ``origin`` (the
    state before training), or ``stored`` (an update re-applied without training); returns
    the mass (0.0 when the round added nothing)."""
    if origin is not None:
        delta = st.comp.flat.detach().double() - origin.double()
    elif stored is not None:
        delta = stored.detach().double()
    else:
        return 0.0
    mass = float(torch.linalg.vector_norm(delta))
    if not math.isfinite(mass):  # (training diverged: the state is lost anyway; say so)
        st.prov = Provenance(st.prov.tags, st.prov.mass, st.prov.flags | PARTIAL)
        return 0.0
    prov = st.prov.credit(self_tag, mass)
    st.prov = Provenance(prov.tags, prov.mass, prov.flags | (APPROX if approx else 0))
    return mass


def outgoing(st: ComponentRound) -> Provenance | None:
    """The vector to announce with the state (None above :data:`SEND_MAX_MEMBERS`)."""
    return st.prov if len(st.lineage) <= SEND_MAX_MEMBERS else None


def received(ann: Announcement) -> Provenance:
    """A neighbour's vector; one that sent none gives its mass to nobody (PARTIAL)."""
    return ann.prov if ann.prov is not None else Provenance.empty(PARTIAL)


class Fields(TypedDict, total=False):
    """A record's provenance fields (``mass`` aligned to its lineage, ``prov_flags``)."""

    mass: bytes
    prov_flags: int


def fields(prov: Provenance | None, lineage: Lineage) -> Fields:
    """The ledger fields of ``prov`` for a record whose lineage is ``lineage``."""
    if prov is None:
        return {}
    return {"mass": prov.encode(lineage), "prov_flags": prov.flags}


def recorded(mass: bytes | None, flags: int | None, lineage: Lineage,
             round_: int) -> Provenance:
    """The vector a ledger record kept; a record written before provenance was kept (a
    ledger of an older version) has none: empty, and PARTIAL after round 0."""
    if mass is None:
        return Provenance.empty(PARTIAL if round_ > 0 else 0)
    return Provenance.decode(lineage, mass, flags or 0)
