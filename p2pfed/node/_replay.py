"""Unlearning's re-run of rounds: what a component replaying rounds keeps, and the math of
fast mode's calibration (FedEraser).

The node rolls a component back to a checkpoint free of a forgotten member and re-runs the
rounds since (see :meth:`p2pfed.node.Node.forget`); the planner
(:func:`p2pfed.node._unlearning.plan_replay`) fills a :class:`Replay` from the ledger: the
neighbours' clean updates and, in fast mode, this node's own updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from p2pfed.journal import Checkpoint, Contribution
from p2pfed.unlearning import FAST_STRIDE


@dataclass
class Replay:
    """A component re-running rounds ``start .. until-1`` without a forgotten member."""

    target: str
    mode: str  # "exact" or "fast"
    start: int
    until: int
    forget_index: int  # the ledger index of the forget entry
    #: clean neighbour updates kept from before the request (the ledger's records of them:
    #: enough to mix them again without a fetch): (round, peer) -> contribution
    history: dict[tuple[int, str], Contribution] = field(default_factory=dict)
    #: fast mode: per round, digests of this node's own state before and after its training
    updates: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    stride: int = FAST_STRIDE
    #: a component the member never influenced, re-run only because an influenced one is
    #: trained through it: its checkpoint from before the request, put back when done
    keep: Checkpoint | None = None
    #: a component this node trains: the rounds it did not train before the request (their
    #: ``local-update`` records: a share's draw, a schedule's hours, a spent budget), where the
    #: re-run does not train either, whatever the settings and the clock say now
    idle: set[int] = field(default_factory=set)
    #: the same records' make-up factors, per round trained with one recorded: the re-run
    #: makes up by them (a round without one: the factor the settings give now)
    made_up: dict[int, int] = field(default_factory=dict)
    #: ... and their local objectives (a round without one: the settings' objective now)
    objectives: dict[int, tuple[str, float]] = field(default_factory=dict)
    #: ... and the leans their mixes leaned on their loss with (a round without one: none)
    leans: dict[int, float] = field(default_factory=dict)

    def trains_at(self, round_: int) -> bool:
        return self.mode == "exact" or (round_ - self.start) % self.stride == 0


def calibrate(flat: torch.Tensor, origin: torch.Tensor, stored: torch.Tensor) -> None:
    """Fast unlearning: the calibration update ``flat - origin`` keeps its direction and takes
    the size of the ``stored`` update it replaces (FedEraser); ``flat`` changes in place."""
    size = float(torch.linalg.vector_norm(stored.to(torch.float64)))
    step = flat - origin
    norm = float(torch.linalg.vector_norm(step.to(torch.float64)))
    if norm > 0.0:
        flat.copy_(origin + step * (size / norm))
