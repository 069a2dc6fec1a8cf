"""What the simulator keeps of each round's states: the figures the report needs, not the states.

A :class:`Trace` takes every node's state per component after each round (and before the
first) and keeps them only until the round is *settled*: every live holder of the component has
mixed it (or moved past it).  Then it computes the round's figures — the consensus distance
‖X − mean‖_F over the nodes that reported, relative to the spread of the starting states, and
how far the mean drifted from the starting mean — and drops the states.  So a run holds about
one round of states at a time, however many rounds it has.

The figures are computed exactly as from a stack of all the round's states in node-name order:
each round's states are written straight into the rows of one matrix in that order (no copy
per state kept, no stack made), so the numbers do not depend on when a round settles.
While a round may still be re-run (an unlearning under way), :attr:`Trace.hold` keeps every
round open.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RoundFigures:
    #: ‖X − mean‖_F over the nodes that reported, divided by the starting spread
    distance: float
    #: largest change of the nodes' mean from the starting holders' mean
    drift: float


@dataclass(frozen=True)
class _Start:
    mean: np.ndarray
    scale: float


class _OpenRound:
    """One round's states, one row per possible reporter, in name order."""

    __slots__ = ("reported", "states")

    def __init__(self, rows: int, size: int) -> None:
        self.states = np.empty((rows, size), dtype=np.float64)  # pages are touched as written
        self.reported = np.zeros(rows, dtype=bool)


class Trace:
    """Per component, the figures of every settled round, and the states of the open ones."""

    def __init__(self, holders: Mapping[str, Collection[str]]) -> None:
        """``holders``: per component, every node that may report a state of it."""
        #: the starting states per component and node, until :meth:`begin` (attackers and
        #: tests read them before the run)
        self.initial: dict[str, dict[str, np.ndarray]] = {}
        #: while true no round settles (its states may still be replaced by a re-run)
        self.hold = False
        self._rows = {comp: {name: i for i, name in enumerate(sorted(names))}
                      for comp, names in holders.items()}
        self._start: dict[str, _Start] = {}
        self._open: dict[str, dict[int, _OpenRound]] = {}
        self._figures: dict[str, dict[int, RoundFigures]] = {}
        #: per component and node, the latest round it reported
        self._last: dict[str, dict[str, int]] = {}
        #: the most states held at once (rows written), for the scale benchmark
        self.peak_states = 0
        self._held = 0

    # ---------------------------------------------------------------- recording
    def record_initial(self, comp: str, name: str, state: torch.Tensor) -> None:
        self.initial.setdefault(comp, {})[name] = (
            state.detach().to(torch.float64).numpy().copy())

    def begin(self, holders: Mapping[str, Sequence[str]]) -> None:
        """Fix each component's starting mean and spread over ``holders`` (the holders present
        at the start, in node order), and drop the starting states."""
        for comp, names in holders.items():
            if not names:
                continue
            x0 = np.stack([self.initial[comp][h] for h in names])
            mean0 = x0.mean(axis=0)
            self._start[comp] = _Start(mean0, float(np.linalg.norm(x0 - mean0)) or 1.0)
        self.initial = {}

    def record(self, comp: str, round_: int, name: str, state: torch.Tensor) -> bool:
        """Keep ``name``'s state of ``comp`` after ``round_``; True when it is the first state
        of that round (a good moment to :meth:`settle`)."""
        if round_ in self._figures.get(comp, {}):
            raise RuntimeError(f"{name} reported round {round_} of {comp}, already settled")
        rounds = self._open.setdefault(comp, {})
        opened = round_ not in rounds
        if opened:
            rounds[round_] = _OpenRound(len(self._rows[comp]), state.numel())
        row = self._rows[comp][name]
        open_round = rounds[round_]
        torch.from_numpy(open_round.states[row]).copy_(state.detach().reshape(-1))
        if not open_round.reported[row]:
            open_round.reported[row] = True
            self._held += 1
            self.peak_states = max(self.peak_states, self._held)
        last = self._last.setdefault(comp, {})
        last[name] = max(last.get(name, -1), round_)
        return opened

    # ---------------------------------------------------------------- settling
    def settle(self, comp: str, live: Collection[str]) -> None:
        """Settle the open rounds of ``comp`` that every node of ``live`` (the nodes that may
        still report) has reported or moved past."""
        if self.hold:
            return
        rounds = self._open.get(comp)
        if not rounds:
            return
        last = self._last.get(comp, {})
        rows = self._rows[comp]
        floor = min((last.get(n, -1) for n in live if n in rows), default=None)
        for round_ in sorted(rounds):
            if floor is not None and round_ > floor:
                break
            self._close(comp, round_)

    def settle_all(self, live: Collection[str] | None = None) -> None:
        """Settle every component's rounds (``live`` None: the run is over, settle them all)."""
        for comp in list(self._open):
            self.settle(comp, live if live is not None else ())

    def _close(self, comp: str, round_: int) -> None:
        open_round = self._open[comp].pop(round_)
        start = self._start.get(comp)
        if start is None:
            raise ValueError(f"no holder of {comp} at the start")
        reporters = np.flatnonzero(open_round.reported)
        states = open_round.states
        for k, row in enumerate(reporters):  # the stack of the reported states, in name order
            if k != row:
                states[k] = states[row]
        x = states[: len(reporters)]
        mean = x.mean(axis=0)
        drift = float(np.abs(mean - start.mean).max())
        x -= mean
        distance = float(np.linalg.norm(x)) / start.scale
        self._figures.setdefault(comp, {})[round_] = RoundFigures(distance, drift)
        self._held -= len(reporters)

    # ---------------------------------------------------------------- reading
    def figures(self, comp: str) -> Mapping[int, RoundFigures]:
        """The settled rounds of ``comp``: round -> its figures."""
        return self._figures.get(comp, {})

    def reported(self, comp: str) -> Mapping[str, int]:
        """Per node, the latest round of ``comp`` it reported."""
        return self._last.get(comp, {})
