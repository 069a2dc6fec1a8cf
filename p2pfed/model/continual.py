"""Continual learning: tasks that start and retire while the federation runs, without forgetting.

A :class:`~p2pfed.continual.Schedule` says when each task starts training and when it
retires (its data is gone: a semester ended, a curriculum was dropped).  Shared components (the
text adapter, the backbone) keep training for the tasks still active, and so drift away from
what the retired tasks need: *catastrophic forgetting*.  Two local remedies, selectable in
``[continual]`` (:class:`~p2pfed.continual.ContinualSettings`), and both together:

* **rehearsal** — when a task retires, each member keeps a bounded buffer of its own examples
  of the task (``buffer`` examples, class-balanced or uniform, drawn from a generator seeded by
  the member and the task) and keeps training the task's loss on them.  Nothing leaves the
  member: the buffer is a subset of its own data.
* **ewc** — consensus-anchored elastic weight consolidation.  At each phase boundary (a round
  where the set of active tasks changes) a member takes the component's state as the round
  begins — the consensus its neighbours mixed — as the anchor θ*, estimates a diagonal Fisher
  information F of the tasks active before the boundary on its own data (mean squared gradient
  of their loss over ``fisher_batches`` seeded batches, scaled to mean 1 per component, summed
  over boundaries as in online EWC), and adds ``(ewc_lambda / 2) · Σ F (θ − θ*)²`` to its loss.

Exact unlearning: everything here is a deterministic function of the member's data, its seed
and the component states at the boundary, so an unlearning re-run recomputes it.  An anchor (and
its Fisher) captured at round ``c`` of the component is dropped when a request of a newer forget
epoch asks for round ``c`` or earlier: the re-run passes that round again and captures anew from
the re-run's state (states before the re-run's first round are unchanged by it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from p2pfed.components import FlatComponent
from p2pfed.continual import METHODS, ContinualSettings, Schedule

__all__ = ["METHODS", "Continual", "ContinualSettings", "Schedule"]

@dataclass
class _Anchor:
    captured: int  # the component's round when it was captured
    epoch: int
    theta: torch.Tensor
    fisher: torch.Tensor


#: ``loss_of(task, round, rng) -> loss``: the loss of one seeded batch of what ``task``
#: trained on in ``round`` (the trainer's)
LossOf = Callable[[str, int, np.random.Generator], torch.Tensor]


class Continual:
    """One member's continual-learning state: its rehearsal buffers and EWC anchors."""

    def __init__(self, schedule: Schedule, settings: ContinualSettings, node_seed: int) -> None:
        self.schedule = schedule
        self.settings = settings
        self.node_seed = node_seed
        self._buffers: dict[str, np.ndarray] = {}  # task -> rows of the member's data kept
        self._anchors: dict[str, list[_Anchor]] = {}  # component -> one per boundary passed
        self._epoch: dict[str, int] = {}  # component -> the forget epoch last trained in
        #: component -> (θ*, summed F) per parameter, for the penalty (until anchors change)
        self._terms: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    # ---------------------------------------------------------------- which tasks train
    def scheduled(self, task: str) -> bool:
        """Does ``task`` ever train under the schedule?"""
        return task in self.schedule.starts

    def trains(self, task: str, round_: int) -> bool:
        """Does ``task``'s loss take part in round ``round_`` (active, or rehearsed)?"""
        return self.schedule.active(task, round_) or (
            self.settings.rehearsal and self.schedule.retired(task, round_))

    def step_factor(self, tasks: Sequence[str], round_: int) -> int:
        """How many times the usual steps a round training ``tasks`` runs: ``catch_up`` while
        one of them, started late, is catching up (:meth:`Schedule.catching_up`), else 1."""
        factor, limit = self.settings.catch_up, self.settings.catch_up_rounds
        if any(self.schedule.catching_up(t, round_, factor, limit) for t in tasks):
            return factor
        return 1

    def rows(self, task: str, round_: int, labels: np.ndarray) -> np.ndarray | None:
        """The rows of the member's data of ``task`` that round ``round_`` trains on: all of
        them while it is active, the rehearsal buffer once it retired (None: nothing)."""
        if self.schedule.active(task, round_):
            return None
        if not self.trains(task, round_):
            return np.zeros(0, dtype=np.int64)
        return self.buffer(task, labels)

    def buffer(self, task: str, labels: np.ndarray) -> np.ndarray:
        """The rows kept of a retired task: at most ``buffer``, seeded by member and task;
        class-balanced takes the classes in turn, each in a seeded order."""
        rows = self._buffers.get(task)
        if rows is None:
            size = min(self.settings.buffer, len(labels))
            rng = np.random.default_rng(_seed(self.node_seed, "rehearsal", task))
            order = rng.permutation(len(labels))
            if self.settings.sampling == "uniform":
                rows = np.sort(order[:size])
            else:
                by_class = [order[labels[order] == k] for k in np.unique(labels)]
                taken = [row for group in _round_robin(by_class) for row in group][:size]
                rows = np.sort(np.asarray(taken, dtype=np.int64))
            self._buffers[task] = rows
        return rows

    # ---------------------------------------------------------------- EWC
    def prepare(self, components: Mapping[str, FlatComponent], round_: int, epoch: int,
                tasks: Sequence[str], loss_of: LossOf,
                params_of: Callable[[str], Mapping[str, nn.Parameter]]) -> None:
        """Before a round that trains ``components``: drop anchors an unlearning re-run
        replaces, and capture an anchor for each boundary passed since the last one.
        ``tasks``: the member's tasks (the Fisher is of those that trained before the boundary)."""
        if not self.settings.ewc:
            return
        for name in components:
            if self._epoch.get(name, epoch) != epoch:
                self._anchors[name] = [a for a in self._anchors.get(name, [])
                                       if a.captured < round_]
                self._terms.pop(name, None)
            self._epoch[name] = epoch
        bounds = [b for b in self.schedule.boundaries() if b <= round_]
        if not bounds:
            return
        due = [n for n in components
               if not self._anchors.get(n) or self._anchors[n][-1].captured < bounds[-1]]
        old = [t for t in tasks if self.trains(t, bounds[-1] - 1)]  # (before the boundary)
        if not due or not old:
            return
        fishers = self._fisher(due, bounds[-1], old, loss_of, params_of)
        for name in due:
            self._anchors.setdefault(name, []).append(_Anchor(
                round_, epoch, components[name].flat.detach().clone(), fishers[name]))
            self._terms.pop(name, None)

    def _fisher(self, names: Sequence[str], boundary: int, tasks: Sequence[str],
                loss_of: LossOf, params_of: Callable[[str], Mapping[str, nn.Parameter]]
                ) -> dict[str, torch.Tensor]:
        params = {n: params_of(n) for n in names}
        flat = [p for ps in params.values() for p in ps.values()]
        sums = {n: {k: torch.zeros_like(p) for k, p in ps.items()} for n, ps in params.items()}
        saved = [p.requires_grad for p in flat]
        for p in flat:
            p.requires_grad_(True)
        try:
            for task in tasks:
                rng = np.random.default_rng(_seed(self.node_seed, "fisher", task, boundary))
                for _ in range(self.settings.fisher_batches):
                    loss = loss_of(task, boundary - 1, rng)
                    grads = torch.autograd.grad(loss, flat, allow_unused=True)
                    it = iter(grads)
                    for n, ps in params.items():
                        for k in ps:
                            g = next(it)
                            if g is not None:
                                sums[n][k] += g.detach() ** 2
        finally:
            for p, flag in zip(flat, saved, strict=True):
                p.requires_grad_(flag)
        out: dict[str, torch.Tensor] = {}
        for n, parts in sums.items():  # (kept on the CPU, as the anchor θ* is)
            f = torch.cat([parts[k].reshape(-1) for k in params[n]]).cpu()
            mean = float(f.mean())
            out[n] = f / mean if mean > 0.0 else f
        return out

    def penalty(self, components: Mapping[str, FlatComponent],
                params_of: Callable[[str], Mapping[str, nn.Parameter]]) -> torch.Tensor | None:
        """``(λ/2) Σ F (θ − θ*)²`` over the trained ``components`` with anchors (None: none)."""
        if not self.settings.ewc or self.settings.ewc_lambda == 0.0:
            return None
        total: torch.Tensor | None = None
        for name, comp in components.items():
            params = params_of(name)
            terms = self._penalty_terms(name, comp, next(iter(params.values())).device)
            if terms is None:
                continue
            theta, weights = terms
            for key, p in params.items():
                term = (weights[key] * (p - theta[key]) ** 2).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * self.settings.ewc_lambda * total

    def _penalty_terms(self, name: str, comp: FlatComponent, device: torch.device
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """θ* and the summed F of ``name``, per parameter, on ``device`` (the parameters'):
        cached until its anchors change."""
        anchors = self._anchors.get(name)
        if not anchors:
            return None
        terms = self._terms.get(name)
        if terms is None:
            fisher = torch.stack([a.fisher for a in anchors]).sum(0)
            theta = FlatComponent(comp.spec, comp.layout, anchors[-1].theta).views()
            weights = FlatComponent(comp.spec, comp.layout, fisher).views()
            terms = self._terms[name] = ({k: v.to(device) for k, v in theta.items()},
                                         {k: v.to(device) for k, v in weights.items()})
        return terms

    def anchors(self) -> dict[str, list[int]]:
        """Per component, the rounds its anchors were captured at (for status and tests)."""
        return {n: [a.captured for a in anchors] for n, anchors in sorted(self._anchors.items())
                if anchors}


def _round_robin(groups: Sequence[np.ndarray]) -> list[list[int]]:
    """Rows taken one per group in turn: ``[[g0[0], g1[0], ...], [g0[1], ...], ...]``."""
    depth = max((len(g) for g in groups), default=0)
    return [[int(g[i]) for g in groups if i < len(g)] for i in range(depth)]


def _seed(*parts: object) -> int:
    from p2pfed.model.train import seed_for

    return seed_for(*parts)
