"""Local training of the components a node holds, on its own data.

Each component's parameters are bound into its flat buffer (zero copy), so what the optimiser
writes is what the node mixes and sends, and what mixing writes is what the next forward pass
uses.  Training one component for one round runs ``steps`` optimiser steps on every task whose
pipeline contains it, with the other components frozen (so no gradient flows through, say, the
frozen text model when only a head is trained).  Batches are drawn from a generator seeded by
(node, component, round): the same seed gives the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gossip.catalog import ComponentSpec
from gossip.envelope import digest
from p2pfed.components import FlatComponent
from p2pfed.model.m3t import M3TModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """One task's examples: per-modality inputs (arrays or lists of texts) and labels."""

    inputs: Mapping[str, Any]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray) -> tuple[dict[str, Any], torch.Tensor]:
        batch: dict[str, Any] = {}
        for modality, values in self.inputs.items():
            if isinstance(values, np.ndarray):
                batch[modality] = torch.from_numpy(values[index])
            elif hasattr(values, "select"):
                batch[modality] = values.select(index)
            else:
                batch[modality] = [values[i] for i in index]
        return batch, torch.from_numpy(self.labels[index].astype(np.int64))


def seed_for(*parts: object) -> int:
    return int.from_bytes(digest(repr(parts).encode())[:8], "little") >> 1


@dataclass
class LocalTrainer:
    model: M3TModel
    data: Mapping[str, TaskData]  # task -> this node's training data
    node_seed: int
    steps: int = 5
    batch_size: int = 32
    lr: float = 3e-3

    def __post_init__(self) -> None:
        self.flats: dict[str, FlatComponent] = {}
        for name in self.model.held:
            params = self.model.parameters_of(name)
            flat = FlatComponent.from_params(ComponentSpec.from_name(name),
                                             {k: p.detach() for k, p in params.items()})
            flat.bind(params)
            self.flats[name] = flat

    def components(self) -> dict[str, FlatComponent]:
        return dict(self.flats)

    def trained_tasks(self, component: str) -> list[str]:
        return [t.name for t in self.model.spec.tasks_using(component)
                if t.name in self.model.tasks() and t.name in self.data and len(self.data[t.name])]

    def train(self, component: str, round_: int) -> float:
        """Train ``component`` for one round; returns the mean loss (nan if nothing to do)."""
        tasks = self.trained_tasks(component)
        if not tasks:
            return float("nan")
        params = self.model.parameters_of(component)
        all_params = [p for m in self.model.modules.values() for p in m.parameters()]
        flags = [p.requires_grad for p in all_params]
        for p in all_params:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        rng = np.random.default_rng(seed_for(self.node_seed, component, round_))
        opt = torch.optim.Adam(params.values(), lr=self.lr)
        losses = []
        try:
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros(())
                for task in tasks:
                    data = self.data[task]
                    index = rng.choice(len(data), size=min(self.batch_size, len(data)),
                                       replace=len(data) < self.batch_size)
                    batch, labels = data.batch(index)
                    loss = loss + nn.functional.cross_entropy(self.model.forward(task, batch),
                                                              labels)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                losses.append(float(loss) / len(tasks))
        finally:
            for p, flag in zip(all_params, flags, strict=True):
                p.requires_grad_(flag)
        return float(np.mean(losses))

    @torch.no_grad()
    def accuracy(self, task: str, data: TaskData, batch_size: int = 256) -> float:
        correct = 0
        for start in range(0, len(data), batch_size):
            index = np.arange(start, min(start + batch_size, len(data)))
            batch, labels = data.batch(index)
            pred = self.model.forward(task, batch).argmax(-1)
            correct += int((pred == labels).sum())
        return correct / max(len(data), 1)
