"""Fairness: a group-aware local objective, and the measures of who the model serves well.

A member's examples may carry a *group* (a small integer per example: a gender, a region, a
language, whatever the institution records; :attr:`p2pfed.model.train.TaskData.groups`).  The
group never leaves the member: nothing here is sent, and the federation mixes models exactly as
without it.

**The objective** (``[fairness] objective = "group-dro"``): each batch is drawn evenly from the
groups present in the member's data (:func:`group_batch`: a group of 3 examples among 300 gets
half of the batch when there are two groups), and the groups' mean losses ``L_g`` are combined
by a soft maximum (:func:`group_loss`)::

    L = (1/t) · log( (1/G) · Σ_g exp(t · L_g) )

between the groups' mean (``t`` → 0) and the worst group's loss (``t`` → ∞): the stateless form
of group distributionally robust optimisation (group-DRO keeps exponentiated weights over the
groups from step to step; this one recomputes them from each batch, so an exact unlearning's
re-run and a restarted daemon train exactly as before).  ``t`` is ``[fairness] tilt``.

**The measures** (:func:`summary`: the simulator's), per task over the nodes that hold its
head: the mean accuracy (each node's accuracy per group, weighted by the groups' shares of the
population), the worst node and the 10th-percentile node, each group's accuracy (the nodes'
mean) and the worst-group gap (best group − worst group).  A daemon measures its own held-out
examples by group as each round begins (:func:`heldout_groups`; ``status``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: the local objectives (``[fairness] objective``)
OBJECTIVES = ("erm", "group-dro")
#: a group with fewer held-out examples than this is shown, but left out of the worst-group gap
#: (its accuracy is too noisy to rank it)
MIN_GROUP_EXAMPLES = 5


def group_batch(groups: np.ndarray, batch_size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows for one batch, drawn evenly from each group present in ``groups`` (with
    replacement where a group has fewer rows than its part), and the group of each row.  With
    more groups than ``batch_size``, the batch takes one row of each of ``batch_size`` groups
    drawn at random, so it never grows past ``batch_size``."""
    present = np.unique(groups)
    if len(present) > batch_size:
        present = np.sort(rng.choice(present, size=batch_size, replace=False))
    part = max(1, batch_size // len(present))
    index = []
    for g in present.tolist():
        rows = np.flatnonzero(groups == g)
        index.append(rng.choice(rows, size=part, replace=len(rows) < part))
    chosen = np.concatenate(index)
    return chosen, groups[chosen]


def group_loss(losses: torch.Tensor, groups: torch.Tensor, tilt: float) -> torch.Tensor:
    """The soft maximum over the groups in ``groups`` of their mean ``losses`` (per example):
    ``(1/t) log((1/G) Σ_g exp(t L_g))``; the groups' mean for ``t`` = 0."""
    means = torch.stack([losses[groups == g].mean() for g in torch.unique(groups).tolist()])
    if tilt <= 0.0:
        return means.mean()
    return (torch.logsumexp(tilt * means, 0) - math.log(len(means))) / tilt


def group_accuracy(correct: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    """Accuracy per group present: the share of ``correct`` among its examples."""
    return {int(g): float(correct[groups == g].mean()) for g in np.unique(groups).tolist()}


def heldout_groups(correct: np.ndarray, groups: np.ndarray, names: Sequence[str] = (),
                   min_count: int = MIN_GROUP_EXAMPLES) -> dict[str, Any]:
    """A member's held-out measures per group (``status``): each group's accuracy
    (``groups``, by name: ``names[g]``, else ``str(g)``), its number of examples
    (``group_counts``), and the worst-group gap (best − worst accuracy) over the groups of at
    least ``min_count`` examples (None: fewer than two such groups)."""
    def name(g: int) -> str:
        return names[g] if g < len(names) else str(g)

    accuracy = group_accuracy(correct, groups)
    counts = {g: int(np.count_nonzero(groups == g)) for g in accuracy}
    counted = [a for g, a in accuracy.items() if counts[g] >= min_count]
    return {
        "groups": {name(g): a for g, a in accuracy.items()},
        "group_counts": {name(g): counts[g] for g in accuracy},
        "worst_group_gap": max(counted) - min(counted) if len(counted) >= 2 else None,
    }


def summary(per_node: Mapping[str, Mapping[int, float]], population: Mapping[int, float],
            names: Mapping[int, str]) -> dict[str, object]:
    """The measures of one task: ``per_node`` node -> group -> accuracy (on a test set with
    every group), ``population`` each group's share of the training examples (weights of the
    mean), ``names`` each group's name in the result."""
    weights = {g: population.get(g, 0.0) for g in names}
    total = sum(weights.values()) or 1.0
    node_acc = {n: sum(w * accs.get(g, 0.0) for g, w in weights.items()) / total
                for n, accs in per_node.items()}
    groups = {names[g]: float(np.mean([accs[g] for accs in per_node.values() if g in accs]))
              for g in names if any(g in accs for accs in per_node.values())}
    values = sorted(node_acc.values())
    return {
        "mean": float(np.mean(values)),
        "worst_node": values[0],
        "p10_node": float(np.percentile(values, 10, method="lower")),
        "groups": groups,
        "worst_group": min(groups.values()),
        "worst_group_gap": max(groups.values()) - min(groups.values()),
        "nodes": len(values),
    }
