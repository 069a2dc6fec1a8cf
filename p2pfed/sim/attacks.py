"""The simulator's Byzantine members: what they send instead of their state.

A Byzantine node is a :class:`~p2pfed.node.Node` that follows the protocol but releases a
forged update (:class:`ByzantineNode`); the honest node knows nothing of attacks.  Label
flipping poisons the data instead (:meth:`p2pfed.sim.education.EducationWorkload.flip_labels`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gossip.envelope import digest
from p2pfed.node import Node

#: what a Byzantine node sends: its state negated; its state plus N(0, 1) noise; "a little is
#: enough" (the honest neighbours' mean minus one standard deviation, per coordinate); inner
#: product manipulation (minus half the honest neighbours' mean); or its honest state after
#: training on flipped labels
ATTACKS = ("sign-flip", "gaussian", "alie", "ipm", "label-flip")
ALIE_Z = 1.0
IPM_EPSILON = 0.5

#: (component, round, the node's state) -> what it sends instead
Forgery = Callable[[str, int, torch.Tensor], torch.Tensor]


def forgery(kind: str, seed: int,
            honest: Callable[[str], list[torch.Tensor]]) -> Forgery:
    """The update an attacker of ``kind`` sends; ``honest(component)`` gives the states of its
    honest neighbours (what "a little is enough" and inner product manipulation read).

    The Gaussian noise is drawn from a generator seeded by ``seed``, the component and the
    round, not from one stream: the order in which a node's components start their rounds
    depends on trio's scheduler (which is randomized), and must not change the numbers."""

    def send(component: str, round_: int, state: torch.Tensor) -> torch.Tensor:
        if kind == "sign-flip":
            return -state
        if kind == "gaussian":
            gen = torch.Generator().manual_seed(_noise_seed(seed, component, round_))
            return state + torch.randn(state.shape, generator=gen, dtype=state.dtype)
        states = honest(component)
        if not states:
            return state
        stacked = torch.stack([h.to(torch.float64) for h in states])
        mean = stacked.mean(dim=0)
        if kind == "alie":
            spread = stacked.std(dim=0) if len(states) > 1 else torch.zeros_like(mean)
            return mean - ALIE_Z * spread
        return -IPM_EPSILON * mean  # ipm

    return send


def _noise_seed(seed: int, component: str, round_: int) -> int:
    return int.from_bytes(digest(f"p2pfed-sim-attack/{seed}/{component}/{round_}".encode())[:7],
                          "little")


class ByzantineNode(Node):
    """A node that announces ``send(component, round, state)`` instead of its state (and mixes
    like any other)."""

    def __init__(self, *args: Any, send: Forgery, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send = send

    def _outgoing(self, name: str, round_: int, state: torch.Tensor) -> torch.Tensor:
        return self._send(name, round_, state).to(state.dtype)
