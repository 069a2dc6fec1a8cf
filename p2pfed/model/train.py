"""Local training of the components a node holds, on its own data.

Each component's parameters are bound into its flat buffer (zero copy), so what the optimiser
writes is what the node mixes and sends, and what mixing writes is what the next forward pass
uses.  A model on another device than the CPU (``[model] device``) cannot be bound: its
parameters *shadow* the buffers (:attr:`LocalTrainer.shadow`), copied from them before each
round and each evaluation, and back into them after the round that trained them.  The buffers
stay float32 on the CPU either way, and the numbers are the same.

A round's training runs ``steps`` optimiser steps (more, each at a smaller learning rate, while
a task that started late catches up: :meth:`~p2pfed.model.continual.Continual.step_factor`,
:meth:`LocalTrainer.lr_of`) on the summed loss of every task whose
pipeline contains a component being trained, with every other component frozen (no gradient
flows through, say, the frozen text model when only a head is trained).  The node's request
(:class:`TrainRequest`, filled in by the driver) names component ``c``, round ``r``, the other
components waiting for their own round-``r`` update (in lockstep that is all of them) and the
node's forget count; the trainer trains *jointly* ``c`` and those ready ones, which then return
at once when their turn comes.  The trainer holds no reference to the node.  Training the
components of a forward pass together is far cheaper than one at a time (the text model runs
once per step, not once per component) and converges like ordinary joint training.  A
component whose round is not aligned is trained alone, so nothing ever writes into a buffer
that is being mixed.

Each task's batches are drawn from a generator seeded by (node, task, round): the same seed gives
the same numbers, whichever components happen to be trained together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gossip.catalog import ComponentSpec
from gossip.envelope import digest
from p2pfed.components import FlatComponent
from p2pfed.model.continual import Continual
from p2pfed.model.fairness import OBJECTIVES, group_batch, group_loss, heldout_groups
from p2pfed.model.m3t import M3TModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """One task's examples: per-modality inputs (arrays or lists of texts) and labels."""

    inputs: Mapping[str, Any]
    labels: np.ndarray
    #: each example's group (a small integer: the fairness study's attribute), or None; it
    #: never leaves the member: only the group-aware objective and the held-out measures read it
    groups: np.ndarray | None = None
    #: each group's name (``group_names[g]`` for group ``g``; () where the groups have none)
    group_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> TaskData:
        """The examples at ``index``, in that order."""
        return TaskData({m: _take(v, index) for m, v in self.inputs.items()},
                        self.labels[index], None if self.groups is None else self.groups[index],
                        self.group_names)

    def batch(self, index: np.ndarray) -> tuple[dict[str, Any], torch.Tensor]:
        part = self.subset(index)
        batch = {m: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                 for m, v in part.inputs.items()}
        return batch, torch.from_numpy(part.labels.astype(np.int64))


def _take(values: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of one modality's inputs: an array, cached texts, or a list."""
    if isinstance(values, np.ndarray):
        return values[index]
    if hasattr(values, "select"):
        return values.select(index)
    return [values[i] for i in index]


def seed_for(*parts: object) -> int:
    return int.from_bytes(digest(repr(parts).encode())[:8], "little") >> 1


@dataclass(frozen=True)
class TrainRequest:
    """The node's request to train ``component`` for ``round``, with what the node knew then.

    ``ready``: the other components waiting for their own update of ``round`` (free to be
    trained with ``component``, since nothing is mixing into them).  ``epoch``: the node's
    forget count; after a rollback a round is trained again, not taken as done already.
    """

    component: str
    round: int
    ready: frozenset[str] = frozenset()
    epoch: int = 0
    #: train this many times the steps: the node makes up the rounds it skipped just before
    #: (:attr:`p2pfed.node.Train.steps`)
    make_up: int = 1
    #: the local objective and tilt to train with, as the node records the round (None: the
    #: trainer's own ``objective`` and ``tilt``)
    objective: tuple[str, float] | None = None


@dataclass
class LocalTrainer:
    model: M3TModel
    data: Mapping[str, TaskData]  # task -> this node's training data
    node_seed: int
    steps: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    #: train only these (None: every held component some local task uses)
    only: frozenset[str] | None = None
    #: train on logits shifted by the log of the local label frequencies (balanced softmax):
    #: a member whose data is mostly one class then learns what tells the classes apart, not
    #: that its class is common, so its update does not drag its neighbours towards that class
    logit_adjust: bool = True
    #: with a known number of rounds, the learning rate follows a cosine from ``lr`` down to
    #: nearly zero, so the last rounds mostly mix and the members end close to their consensus
    total_rounds: int | None = None
    #: task -> examples kept aside (never trained on): each round that trains the task first
    #: measures the model's accuracy on them
    heldout: Mapping[str, TaskData] = field(default_factory=dict)
    #: continual learning: which tasks train in which round, rehearsal and EWC
    #: (:mod:`p2pfed.model.continual`); None: every task with data trains every round
    continual: Continual | None = None
    #: called with each request before it is carried out (the daemon: follow the catalogue)
    before_run: Callable[[TrainRequest], None] | None = None
    #: what ``status`` says of the model (``model``: :func:`p2pfed.model.device.about`)
    about: dict[str, Any] = field(default_factory=dict)
    #: the local objective: "erm" (the mean loss) or "group-dro" (with the examples' groups:
    #: each batch drawn evenly from the groups present, and the groups' losses combined by a
    #: soft maximum; :func:`p2pfed.model.fairness.group_loss`)
    objective: str = "erm"
    #: group-dro: how hard the soft maximum leans on the worst group (0: the groups' mean)
    tilt: float = 1.0
    #: the parameters shadow the flat buffers (copied to and from them) instead of being bound
    #: into them; None: exactly when the model is not on the CPU (a buffer mixed and sent is
    #: on the CPU).  True on the CPU gives the same numbers as binding (a test's check).
    shadow: bool | None = None

    def __post_init__(self) -> None:
        if self.shadow is None:
            self.shadow = self.model.device.type != "cpu"
        self.flats: dict[str, FlatComponent] = {}
        for name in self.model.held:
            params = self.model.parameters_of(name)
            flat = FlatComponent.from_params(ComponentSpec.from_name(name),
                                             {k: p.detach() for k, p in params.items()})
            if not self.shadow:
                flat.bind(params)
            self.flats[name] = flat
        self._trained: dict[str, tuple[int, int]] = {}  # component -> (epoch, round) trained
        #: component -> (epoch, round, its relative loss that round): :meth:`loss_of`
        self._losses: dict[str, tuple[int, int, float]] = {}
        #: the objective of the round being trained (None: ``objective`` and ``tilt``)
        self._round_objective: tuple[str, float] | None = None
        self._priors: dict[str, torch.Tensor] = {}
        self._kept: dict[str, TaskData] = {}  # task -> its rehearsal buffer (continual)
        #: task -> what its last training round found (``status``); replaced whole, so the
        #: event loop may read it while a training thread writes
        self.progress: dict[str, dict[str, Any]] = {}

    def components(self) -> dict[str, FlatComponent]:
        return dict(self.flats)

    def trained_tasks(self, component: str, round_: int | None = None) -> list[str]:
        """The local tasks whose loss trains ``component`` (in round ``round_``; None: in
        some round)."""
        tasks = [t.name for t in self.model.spec.tasks_using(component)
                 if t.name in self.model.tasks() and t.name in self.data
                 and len(self.data[t.name])]
        if self.continual is None:
            return tasks
        if round_ is None:
            return [t for t in tasks if self.continual.scheduled(t)]
        return [t for t in tasks if self.continual.trains(t, round_)]

    def round_data(self, task: str, round_: int) -> TaskData:
        """What ``task`` trains on in round ``round_``: the member's data, or once the task
        retired its rehearsal buffer (continual learning)."""
        data = self.data[task]
        if self.continual is None:
            return data
        rows = self.continual.rows(task, round_, data.labels)
        if rows is None:
            return data
        kept = self._kept.get(task)
        if kept is None or len(kept) != len(rows):
            kept = self._kept[task] = data.subset(rows)
        return kept

    def trainable(self) -> list[str]:
        """The held components that some local task trains."""
        return [c for c in self.model.held if self.trained_tasks(c)
                and (self.only is None or c in self.only)]

    def run(self, request: TrainRequest) -> float:
        """Carry out the node's request: train its component with the ready ones not trained
        yet this round; returns the mean loss (nan: trained already, with another one)."""
        if self.before_run is not None:
            self.before_run(request)
        key = (request.epoch, request.round)
        if self._trained.get(request.component) == key:
            return float("nan")  # already trained jointly with another component this round
        group = [request.component] + [
            c for c in self.trainable()
            if c != request.component and c in request.ready and self._trained.get(c) != key
        ]
        return self.train_round(group, request.round, epoch=request.epoch,
                                make_up=request.make_up, objective=request.objective)

    def train(self, component: str, round_: int) -> float:
        """Train ``component`` for ``round_`` with no other component ready (outside a node)."""
        return self.run(TrainRequest(component, round_))

    def train_round(self, components: Sequence[str], round_: int, *, epoch: int = 0,
                    make_up: int = 1, objective: tuple[str, float] | None = None) -> float:
        """Train ``components`` jointly for one round (``make_up`` times the steps: rounds
        skipped before it made up; ``objective``: the local objective and tilt, else the
        trainer's own); returns the mean loss (nan: nothing)."""
        if objective is not None and objective[0] not in OBJECTIVES:
            raise ValueError(f"unknown local objective {objective[0]!r}")
        self._round_objective = objective
        group = sorted(set(components))
        for c in group:
            self._trained[c] = (epoch, round_)
        tasks = sorted({t for c in group for t in self.trained_tasks(c, round_)})
        if not tasks:
            return float("nan")
        params = [p for c in group for p in self.model.parameters_of(c).values()]
        # The other components in these forward passes are only read, but in the daemon the
        # event loop may mix new values into their buffers meanwhile: read private snapshots
        # (shadowing parameters are such snapshots, of every component in the round)
        frozen = sorted({c for t in tasks for c in self.model.spec.task(t).pipeline()}
                        - set(group))
        if self.shadow:
            self._load_shadows([*group, *frozen])
        else:
            for c in frozen:
                self.flats[c].clone().bind(self.model.parameters_of(c))
        all_params = [p for m in self.model.modules.values() for p in m.parameters()]
        flags = [p.requires_grad for p in all_params]
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        rngs = {t: np.random.default_rng(seed_for(self.node_seed, t, round_)) for t in tasks}
        factor = 1 if self.continual is None else self.continual.step_factor(tasks, round_)
        opt = torch.optim.Adam(params, lr=self.lr_of(round_, factor))
        losses = []
        per_task: dict[str, list[float]] = {t: [] for t in tasks}
        trained = {c: self.flats[c] for c in group}
        try:
            if self.continual is not None and self.continual.settings.ewc:  # (its anchors)
                used = sorted({t for c in group for t in self.trained_tasks(c)})
                self.continual.prepare(trained, round_, epoch, used, self._loss,
                                       self.model.parameters_of)
            measured = self._heldout_measures(tasks)  # the model as the round begins
            for _ in range(self.steps * factor * max(make_up, 1)):
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros(())
                for task in tasks:
                    task_loss = self._loss(task, round_, rngs[task])
                    per_task[task].append(float(task_loss.detach()))
                    loss = loss + task_loss
                if self.continual is not None:
                    penalty = self.continual.penalty(trained, self.model.parameters_of)
                    if penalty is not None:
                        loss = loss + penalty.to(loss.device)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                losses.append(float(loss.detach()) / len(tasks))
        finally:
            for p, flag in zip(all_params, flags, strict=True):
                p.requires_grad_(flag)
            if self.shadow:
                self._save_shadows(group)  # (what the steps taken so far made of them)
            else:
                for c in frozen:
                    self.flats[c].bind(self.model.parameters_of(c))  # back to the live buffers
        # each task's mean loss over a uniform guess's (log of its classes), for loss mixing;
        # none for a component no task trained this round or one a diverged loss trained
        means = {t: float(np.mean(per_task[t])) for t in tasks}
        for c in group:
            own = [means[t] / math.log(max(self.model.spec.task(t).classes, 2))
                   for t in self.trained_tasks(c, round_) if t in means]
            if own and all(map(math.isfinite, own)):
                self._losses[c] = (epoch, round_, float(np.mean([min(1.0, x) for x in own])))
        for task in tasks:
            measures = measured.get(task, {})
            self.progress[task] = {
                "round": round_, "loss": float(np.mean(per_task[task])),
                "examples": len(self.data[task]), "heldout": len(self.heldout.get(task, ())),
                "accuracy": measures.get("accuracy"),
                "accuracy_round": round_ if task in measured else None,
                **{k: v for k, v in measures.items() if k != "accuracy"},
            }
            held = "" if not measures else f", held-out accuracy {measures['accuracy']:.3f}"
            if measures.get("worst_group_gap") is not None:
                held += f" (worst-group gap {measures['worst_group_gap']:.3f})"
            log.info("round %d: trained %s on %d examples of %s: loss %.4f%s", round_,
                     ", ".join(group), len(self.data[task]), task,
                     self.progress[task]["loss"], held)
        return float(np.mean(losses))

    def loss_of(self, component: str, epoch: int, round_: int) -> float | None:
        """How badly the model fitted this member's data when ``component`` trained in round
        ``round_`` (epoch ``epoch``): the mean loss of the round's batches over the loss of a
        uniform guess (log of the classes), averaged over the tasks it trained, at most 1; None
        when it did not train then.  ``[fairness] mixing = "loss"`` leans on it
        (:func:`p2pfed.mixing.leaned_weights`)."""
        got = self._losses.get(component)
        return got[2] if got is not None and got[:2] == (epoch, round_) else None

    def _loss(self, task: str, round_: int, rng: np.random.Generator) -> torch.Tensor:
        """The loss of one batch drawn by ``rng`` from what ``task`` trains on in ``round_``."""
        data = self.round_data(task, round_)
        name, tilt = self._round_objective or (self.objective, self.tilt)
        if name == "group-dro" and data.groups is not None:
            index, groups = group_batch(data.groups, self.batch_size, rng)
        else:
            index, groups = rng.choice(len(data), size=min(self.batch_size, len(data)),
                                       replace=len(data) < self.batch_size), None
        batch, labels = data.batch(index)
        logits = self.model.forward(task, batch)
        if self.logit_adjust:
            logits = logits + self._log_prior(task, logits.shape[-1])
        if groups is None:
            return nn.functional.cross_entropy(logits, labels)
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        return group_loss(losses, torch.from_numpy(groups), tilt)

    def _heldout_measures(self, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per task of ``tasks`` with held-out examples: the model's ``accuracy`` on them and,
        where they have groups, the per-group measures of
        :func:`~p2pfed.model.fairness.heldout_groups`."""
        out: dict[str, dict[str, Any]] = {}
        for task in tasks:
            held = self.heldout.get(task)
            if held is None or not len(held):
                continue
            correct = self._correct(task, held)
            out[task] = {"accuracy": float(correct.sum()) / len(held)}
            if held.groups is not None:
                out[task] |= heldout_groups(correct, held.groups, held.group_names)
        return out

    def lr_of(self, round_: int, factor: int) -> float:
        """The learning rate of round ``round_``, which trains ``factor`` times the steps
        (:meth:`~p2pfed.model.continual.Continual.step_factor`): :meth:`lr_at`, times
        ``[continual] catch_up_lr`` while a task catches up (its steps are more, each smaller:
        fewer steps at the full rate between two mixes keep the holders together)."""
        lr = self.lr_at(round_)
        if self.continual is not None and factor > 1:
            lr *= self.continual.settings.catch_up_lr
        return lr

    def lr_at(self, round_: int) -> float:
        """The learning rate of round ``round_``: a cosine over the run, or with a continual
        schedule over each phase (a new task starts at the full rate, as it would alone)."""
        if not self.total_rounds:
            return self.lr
        start, end = 0, self.total_rounds
        if self.continual is not None:
            phases = self.continual.schedule.phases(self.total_rounds)
            start, end = next(((a, b) for a, b in phases if round_ < b), phases[-1])
        progress = min(max(round_ - start, 0), end - start) / max(end - start, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _log_prior(self, task: str, classes: int) -> torch.Tensor:
        prior = self._priors.get(task)
        if prior is None:
            counts = np.bincount(self.data[task].labels, minlength=classes)[:classes]
            freq = (counts + 1.0) / (counts.sum() + classes)  # add-one: no class is impossible
            prior = self._priors[task] = torch.from_numpy(np.log(freq).astype(np.float32))
        return prior

    def accuracy(self, task: str, data: TaskData, batch_size: int = 256) -> float:
        return float(self.correct(task, data, batch_size).sum()) / max(len(data), 1)

    def correct(self, task: str, data: TaskData, batch_size: int = 256) -> np.ndarray:
        """Per example of ``data``: does the model predict its label?"""
        if self.shadow:
            self._load_shadows(self.model.spec.task(task).pipeline())
        return self._correct(task, data, batch_size)

    @torch.no_grad()
    def _correct(self, task: str, data: TaskData, batch_size: int = 256) -> np.ndarray:
        """:meth:`correct` with the parameters as they are (within a round: its snapshots)."""
        hits = []
        for start in range(0, len(data), batch_size):
            index = np.arange(start, min(start + batch_size, len(data)))
            batch, labels = data.batch(index)
            pred = self.model.forward(task, batch).argmax(-1)
            hits.append((pred == labels).numpy())
        return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)

    @torch.no_grad()
    def _load_shadows(self, components: Sequence[str]) -> None:
        """Shadow mode: the buffers of ``components`` into their parameters."""
        for c in components:
            views = self.flats[c].views()
            for key, p in self.model.parameters_of(c).items():
                p.copy_(views[key])

    @torch.no_grad()
    def _save_shadows(self, components: Sequence[str]) -> None:
        """Shadow mode: the parameters of ``components`` into their buffers."""
        for c in components:
            views = self.flats[c].views()
            for key, p in self.model.parameters_of(c).items():
                views[key].copy_(p)
