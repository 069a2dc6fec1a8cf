"""What the simulator keeps of each round's states: the figures the report needs, not the states.

A :class:`Trace` takes every node's state per component after each round (and before the
first) and folds it into the round's running moments at once: a reference state (the first one
reported), the sum of the differences from it and the sum of their squared norms.  The
round's figures follow from those — the consensus distance ‖X − mean‖_F over the nodes that
reported, relative to the spread of the starting states, and how far the mean drifted from the
starting mean.  So an open round costs two state-sized arrays, however many nodes report, and a
run of 1,000 nodes holds a few rounds' moments, not their states.

Differences from a reported state are of the size of the spread itself, so the sums lose no
precision as the nodes converge (no mean of squares minus square of the mean on raw values).
The states are folded in the order they are reported, which the seed fixes (the simulator runs
on trio's MockClock): the same seed gives the same figures.

While a round may still be re-run (an unlearning under way, :attr:`Trace.hold`), its states are
kept, a re-run's replacing the first, and folded in node-name order when the round settles.  A
round is *settled* when every live holder of the component has mixed it or moved past it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RoundFigures:
    #: ‖X − mean‖_F over the nodes that reported, divided by the starting spread
    distance: float
    #: largest change of the nodes' mean from the starting holders' mean
    drift: float


class _Moments:
    """The running mean and spread of states, kept as differences from the first one."""

    __slots__ = ("count", "ref", "squares", "total")

    def __init__(self) -> None:
        self.count = 0
        self.ref: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.squares = 0.0

    def add(self, state: torch.Tensor, scratch: np.ndarray | None) -> None:
        x = state.detach().reshape(-1).numpy()
        if self.ref is None or self.total is None:
            self.ref = x.astype(np.float64, copy=True)
            self.total = np.zeros_like(self.ref)
            self.count = 1
            return
        d = np.subtract(x, self.ref, out=scratch if scratch is not None
                        and scratch.shape == self.ref.shape else None, dtype=np.float64)
        self.total += d
        self.squares += float(np.dot(d, d))
        self.count += 1

    def mean(self) -> np.ndarray:
        assert self.ref is not None and self.total is not None
        return self.ref + self.total / self.count

    def spread(self) -> float:
        """‖X − mean‖_F of the states added."""
        if self.total is None:
            return 0.0
        return math.sqrt(max(self.squares - float(np.dot(self.total, self.total)) / self.count,
                             0.0))


@dataclass(frozen=True)
class _Start:
    mean: np.ndarray
    scale: float


class _OpenRound:
    """One round's moments, and its states by row while they may still be replaced."""

    __slots__ = ("held", "moments", "reported")

    def __init__(self, rows: int) -> None:
        self.moments = _Moments()
        self.held: dict[int, torch.Tensor] = {}  # row -> state (hold mode)
        self.reported = np.zeros(rows, dtype=bool)

    def arrays(self) -> int:
        """State-sized arrays this round holds."""
        return len(self.held) + (2 if self.moments.ref is not None else 0)


class Trace:
    """Per component, the figures of every settled round, and the moments of the open ones."""

    def __init__(self, holders: Mapping[str, Collection[str]]) -> None:
        """``holders``: per component, every node that may report a state of it."""
        #: while true no round settles (its states may still be replaced by a re-run)
        self.hold = False
        self._rows = {comp: {name: i for i, name in enumerate(sorted(names))}
                      for comp, names in holders.items()}
        self._initial: dict[str, _Moments] = {}
        self._start: dict[str, _Start] = {}
        self._open: dict[str, dict[int, _OpenRound]] = {}
        self._figures: dict[str, dict[int, RoundFigures]] = {}
        #: per component and node, the latest round it reported
        self._last: dict[str, dict[str, int]] = {}
        self._scratch: dict[int, np.ndarray] = {}
        #: the most state-sized arrays held at once, for the scale benchmark
        self.peak_states = 0
        self._held = 0

    # ---------------------------------------------------------------- recording
    def record_initial(self, comp: str, state: torch.Tensor) -> None:
        """Fold in a starting state of ``comp`` (of a holder present at the start)."""
        moments = self._initial.setdefault(comp, _Moments())
        moments.add(state, self._scratch_for(state))

    def begin(self) -> None:
        """Fix each component's starting mean and spread from the starting states folded in."""
        for comp, moments in self._initial.items():
            self._start[comp] = _Start(moments.mean(), moments.spread() or 1.0)
        self._initial = {}

    def record(self, comp: str, round_: int, name: str, state: torch.Tensor) -> bool:
        """Fold in ``name``'s state of ``comp`` after ``round_``; True when it is the first
        state of that round (a good moment to :meth:`settle`)."""
        if round_ in self._figures.get(comp, {}):
            raise RuntimeError(f"{name} reported round {round_} of {comp}, already settled")
        rounds = self._open.setdefault(comp, {})
        opened = round_ not in rounds
        if opened:
            rounds[round_] = _OpenRound(len(self._rows[comp]))
        row = self._rows[comp][name]
        open_round = rounds[round_]
        before = open_round.arrays()
        if self.hold:
            open_round.held[row] = state.detach().reshape(-1).clone()
        elif open_round.reported[row]:
            raise RuntimeError(f"{name} reported round {round_} of {comp} twice")
        else:
            open_round.moments.add(state, self._scratch_for(state))
        open_round.reported[row] = True
        self._held += open_round.arrays() - before
        self.peak_states = max(self.peak_states, self._held)
        last = self._last.setdefault(comp, {})
        last[name] = max(last.get(name, -1), round_)
        return opened

    def _scratch_for(self, state: torch.Tensor) -> np.ndarray:
        size = state.numel()
        scratch = self._scratch.get(size)
        if scratch is None:
            scratch = self._scratch[size] = np.empty(size, dtype=np.float64)
        return scratch

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
        self._held -= open_round.arrays()
        moments = open_round.moments
        for row in sorted(open_round.held):  # (kept while a re-run could replace them)
            state = open_round.held.pop(row)
            moments.add(state, self._scratch_for(state))
        drift = float(np.abs(moments.mean() - start.mean).max())
        distance = moments.spread() / start.scale
        self._figures.setdefault(comp, {})[round_] = RoundFigures(distance, drift)

    # ---------------------------------------------------------------- reading
    def figures(self, comp: str) -> Mapping[int, RoundFigures]:
        """The settled rounds of ``comp``: round -> its figures."""
        return self._figures.get(comp, {})

    def reported(self, comp: str) -> Mapping[str, int]:
        """Per node, the latest round of ``comp`` it reported."""
        return self._last.get(comp, {})
