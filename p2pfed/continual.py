"""What a continual-learning run is told: the task schedule and the method (torch-free).

A :class:`Schedule` says when each task starts training and when it retires; the simulator
takes one (``simulate --continual``), a daemon derives one from its federation's task
catalogue.  :class:`ContinualSettings` is ``[continual]`` in ``p2pfed.toml`` (and ``simulate
--method``).  The methods themselves are in :mod:`p2pfed.model.continual`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from gossip.errors import ConfigError

METHODS = ("naive", "rehearsal", "ewc", "rehearsal+ewc")
SAMPLINGS = ("balanced", "uniform")
#: the largest round a schedule may name
MAX_ROUND = 1_000_000


@dataclass(frozen=True)
class Schedule:
    """When each task starts training (``starts``) and retires (``retires``).  A task is active
    in rounds ``start <= r < retire``; a task not in ``starts`` never trains."""

    starts: Mapping[str, int]
    retires: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, known: Sequence[str]) -> Schedule:
        """``topic@0,engagement@15,digits@30,retire:topic@30`` (ConfigError naming the item)."""
        starts: dict[str, int] = {}
        retires: dict[str, int] = {}
        items = [i.strip() for i in text.split(",") if i.strip()]
        if not items:
            raise ConfigError("an empty schedule; write e.g. topic@0,engagement@15")
        for item in items:
            what, at, round_text = item.rpartition("@")
            retire = what.startswith("retire:")
            task = what.removeprefix("retire:")
            if not at or not task or not round_text.isdigit():
                raise ConfigError(f"schedule item {item!r}: write TASK@ROUND or "
                                  "retire:TASK@ROUND")
            round_ = int(round_text)
            if round_ > MAX_ROUND:
                raise ConfigError(f"schedule item {item!r}: round above {MAX_ROUND}")
            if task not in known:
                raise ConfigError(f"schedule item {item!r}: unknown task {task!r} "
                                  f"(known: {', '.join(known)})")
            table = retires if retire else starts
            if task in table:
                raise ConfigError(f"schedule item {item!r}: {task} "
                                  f"{'retires' if retire else 'starts'} twice")
            table[task] = round_
        for task, end in retires.items():
            if task not in starts:
                raise ConfigError(f"retire:{task}@{end}: {task} never starts")
            if end <= starts[task]:
                raise ConfigError(f"retire:{task}@{end}: it must retire after it starts "
                                  f"(round {starts[task]})")
        return cls(starts, retires)

    def text(self) -> str:
        items = [f"{t}@{r}" for t, r in sorted(self.starts.items(), key=lambda i: (i[1], i[0]))]
        items += [f"retire:{t}@{r}"
                  for t, r in sorted(self.retires.items(), key=lambda i: (i[1], i[0]))]
        return ",".join(items)

    def active(self, task: str, round_: int) -> bool:
        start = self.starts.get(task)
        return start is not None and start <= round_ < self.retires.get(task, MAX_ROUND + 1)

    def retired(self, task: str, round_: int) -> bool:
        return task in self.retires and round_ >= self.retires[task]

    def catching_up(self, task: str, round_: int, factor: int, limit: int = MAX_ROUND) -> bool:
        """Is ``task``, started late, still catching up in round ``round_``?  A task that
        starts at round ``s > 0`` trains ``factor`` times the steps per round until its extra
        steps make up the ``s`` rounds it missed against training from round 0 (its first
        ``ceil(s / (factor - 1))`` active rounds), for at most ``limit`` rounds (a task added
        to a federation that ran for a year needs to converge, not to replay the year);
        never with ``factor`` 1."""
        start = self.starts.get(task)
        if factor <= 1 or not start or not self.active(task, round_):
            return False
        return (round_ - start) * (factor - 1) < start and round_ - start < limit

    def boundaries(self) -> list[int]:
        """The rounds (> 0) at which the set of active tasks changes."""
        return sorted({r for r in (*self.starts.values(), *self.retires.values()) if r > 0})

    def phases(self, rounds: int) -> list[tuple[int, int]]:
        """The phases of a run of ``rounds`` rounds: ``[start, end)`` round ranges."""
        cuts = [0, *(b for b in self.boundaries() if b < rounds), rounds]
        return list(pairwise(cuts))

    def follow(self, catalogue: Mapping[str, Mapping[str, object]], round_: int) -> Schedule:
        """This schedule after a task catalogue (task -> its ``phase``, as ``p2pfed status``
        shows it) took effect at round ``round_``: a task it retires retires there (never
        before it started), a task it lists as active that had not started starts there.
        Tasks it does not name keep their place (a catalogue governs only what it names)."""
        starts, retires = dict(self.starts), dict(self.retires)
        for task, row in catalogue.items():
            phase = row.get("phase")
            if phase == "active" and task not in starts:
                starts[task] = round_
            elif phase == "retired" and task in starts and task not in retires:
                retires[task] = max(round_, starts[task] + 1)
        return Schedule(starts, retires)

    def joint(self) -> Schedule:
        """Every scheduled task from round 0, none retired: joint training, the reference."""
        return Schedule({t: 0 for t in self.starts})


@dataclass(frozen=True)
class ContinualSettings:
    """``[continual]``: the method and its sizes (the default chosen by measurement,
    docs/continual.md)."""

    method: str = "rehearsal"
    #: examples of each retired task a member keeps (rehearsal)
    buffer: int = 64
    sampling: str = "balanced"
    ewc_lambda: float = 1.0
    #: seeded batches per Fisher estimate (each of the trainer's batch size)
    fisher_batches: int = 4
    #: a task that starts late trains this many times the steps per round until it has made
    #: up the rounds it missed (:meth:`Schedule.catching_up`; 1: off) ...
    catch_up: int = 3
    #: ... for at most this many rounds ...
    catch_up_rounds: int = 10
    #: ... at this fraction of the round's learning rate (more local steps between two mixes
    #: at the full rate let the holders drift apart: docs/continual.md#catching-up)
    catch_up_lr: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown continual method {self.method!r}; "
                              f"choose from {', '.join(METHODS)}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"unknown rehearsal sampling {self.sampling!r}; "
                              f"choose from {', '.join(SAMPLINGS)}")
        if not 1 <= self.buffer <= 1_000_000:
            raise ConfigError("continual.buffer must be in 1..1000000")
        if not (self.ewc_lambda >= 0.0 and math.isfinite(self.ewc_lambda)):
            raise ConfigError("continual.ewc_lambda must be a finite number >= 0")
        if not 1 <= self.fisher_batches <= 1000:
            raise ConfigError("continual.fisher_batches must be in 1..1000")
        if not 1 <= self.catch_up <= 10:
            raise ConfigError("continual.catch_up must be in 1..10")
        if not 1 <= self.catch_up_rounds <= 1000:
            raise ConfigError("continual.catch_up_rounds must be in 1..1000")
        if not (0.0 < self.catch_up_lr <= 1.0):
            raise ConfigError("continual.catch_up_lr must be in (0, 1]")

    @property
    def rehearsal(self) -> bool:
        return "rehearsal" in self.method

    @property
    def ewc(self) -> bool:
        return "ewc" in self.method
