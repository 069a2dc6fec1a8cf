"""A member's own model: the components its config holds, built and trained on its own files.

Every member derives the model's initial values and the adapters' frozen ``A`` matrices from the
federation id, so members of one federation start from the same point and their adapters stay
exactly mixable; the local batches are seeded by the member's key, so a member's run repeats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gossip.errors import ConfigError
from gossip.taskcat import TaskCatalogue
from p2pfed.config import Config
from p2pfed.continual import Schedule
from p2pfed.journal import CatalogueApplied, read
from p2pfed.model.continual import Continual
from p2pfed.model.device import CPU, check_precision, describe, resolve_device
from p2pfed.model.m3t import ENCODERS, TEXT, M3TModel, ModelSpec, TextEncoder
from p2pfed.model.tasks import load_task_data, model_tasks, unknown_tasks_message
from p2pfed.model.train import LocalTrainer, TaskData, TrainRequest, seed_for
from p2pfed.profiles import resources_of, trained_subset

if TYPE_CHECKING:
    from p2pfed.federated import FederatedNode

log = logging.getLogger(__name__)


def federation_seed(federation_id: bytes) -> int:
    return int.from_bytes(federation_id[:4], "little")


def model_spec(config: Config, federation_id: bytes,
               catalogue: TaskCatalogue | None = None) -> ModelSpec:
    """The model's spec: the built-in tasks and the buildable ones of ``catalogue``."""
    layers = tuple(config.model.lora_layers) or None
    return ModelSpec(model_tasks(catalogue), lora_seed=federation_seed(federation_id),
                     text_model=config.model.text_model, lora_layers=layers,
                     lora_targets=tuple(config.model.lora_targets))


def build_model(config: Config, holds: Sequence[str], federation_id: bytes,
                catalogue: TaskCatalogue | None = None, *,
                device: torch.device = CPU, precision: str = "fp32") -> M3TModel:
    """The components ``holds``; each starts from values drawn from the federation id and its
    name (a head of a catalogue task too), the same on every member that builds it, on
    whatever ``device``."""
    spec = model_spec(config, federation_id, catalogue)
    return M3TModel.build(spec, holds, init_seed=federation_seed(federation_id),
                          device=device, precision=precision)


def build_trainer(config: Config, holds: Sequence[str], federation_id: bytes,
                  node_key: bytes, base: Path,
                  catalogue: TaskCatalogue | None = None) -> LocalTrainer:
    """The model of ``holds`` and a trainer over the data files the config names.

    Texts pass through the frozen layers below the adapters once, here.  Raises
    :class:`ConfigError` for data of a task that is neither built in nor in ``catalogue``
    (the federation's task catalogue; None: not known here), data of a task this member
    does not hold, bad files, or a ``[model] device`` torch does not see here.
    """
    device = resolve_device(config.model.device)
    check_precision(device, config.model.precision)
    model = build_model(config, holds, federation_id, catalogue, device=device,
                        precision=config.model.precision)
    log.info("the model runs on %s in %s", describe(device), config.model.precision)
    unknown = sorted(set(config.data) - {t.name for t in model.spec.tasks})
    if unknown:
        raise ConfigError(unknown_tasks_message(unknown, catalogue))
    unheld = sorted(t for t in config.data if t not in model.tasks())
    if unheld:
        raise ConfigError(f"[data] names task(s) {', '.join(unheld)} whose pipeline this member "
                          f"does not hold (components.hold: {', '.join(holds)})")
    data = load_task_data(config.data, base, model.spec.tasks)
    encoder = model.modules.get(ENCODERS[TEXT])
    for name, task in list(data.items()):
        inputs = dict(task.inputs)
        if "text" in inputs:
            assert isinstance(encoder, TextEncoder)
            with model.autocast():
                inputs["text"] = encoder.encode_prefix(list(inputs["text"]))
        if "image" in inputs:
            shape = inputs["image"].shape
            if shape[1] != 1 or min(shape[2:]) < 2:
                raise ConfigError(f"[data.{name}.image]: images of shape {tuple(shape[1:])}; the "
                                  "model takes one channel (grey levels), at least 2×2 pixels")
        if "activity" in inputs:
            width = inputs["activity"].shape[-1]
            if width != model.spec.activity_features:
                raise ConfigError(f"[data.{name}.activity]: {width} features per step; the "
                                  f"model takes {model.spec.activity_features}")
        data[name] = replace(task, inputs=inputs)
    node_seed = int.from_bytes(node_key[:8], "little")
    heldout: dict[str, TaskData] = {}
    for name in sorted(data):
        data[name], kept = split_holdout(data[name], config.model.holdout,
                                         seed_for(node_seed, "holdout", name))
        if len(kept):
            heldout[name] = kept
        log.info("task %s: %d local examples to train on, %d held out", name, len(data[name]),
                 len(kept))
    # the profile's steps, batch and components, unless the config sets them (p2pfed.profiles)
    res, only = resources_of(config), trained_subset(config, holds)
    # every local task trains from the start until the federation's catalogue retires it
    continual = Continual(Schedule(dict.fromkeys(sorted(data), 0)), config.continual, node_seed)
    fairness = config.fairness
    ungrouped = sorted(name for name, task in data.items() if task.groups is None)
    if fairness.objective == "group-dro" and ungrouped:
        log.warning("[fairness] objective = group-dro, but the data of task(s) %s give no group "
                    "per example (docs/data.md): they train with erm", ", ".join(ungrouped))
    return LocalTrainer(model, data, node_seed=node_seed,
                        steps=res.steps, batch_size=res.batch_size,
                        lr=config.model.lr, only=only, heldout=heldout, continual=continual,
                        objective=fairness.objective, tilt=fairness.tilt)


class CatalogueFollower:
    """Before each training (``LocalTrainer.before_run``), the trainer's continual schedule
    follows the federation's task catalogue: a task the catalogue retires stops training at
    the round the catalogue took effect (then only its rehearsal buffer trains it, or
    nothing, by ``[continual] method``).

    ``history``: the catalogues in effect before this start, oldest first (the ledger's
    ``catalogue`` entries: a restarted daemon retires at the same rounds); ``applied()``: those
    applied since, in order (the node's, replaced whole, so reading it from the training
    thread is safe).  Each is followed at the live round it took effect at, the round its
    ledger entry names, so a restart or an unlearning re-run retires at the same rounds."""

    def __init__(self, trainer: LocalTrainer,
                 applied: Callable[[], Sequence[CatalogueApplied]],
                 history: Iterable[CatalogueApplied] = ()) -> None:
        self.trainer = trainer
        self._applied = applied
        self._count = 0
        for entry in history:
            self._follow(entry)

    def _follow(self, applied: CatalogueApplied) -> None:
        continual = self.trainer.continual
        if continual is not None:
            continual.schedule = continual.schedule.follow(applied.tasks, applied.round)

    def __call__(self, request: TrainRequest) -> None:
        applied = self._applied()
        for entry in applied[self._count:]:
            self._follow(entry)
        self._count = len(applied)


def follow_catalogue(trainer: LocalTrainer, node: FederatedNode) -> None:
    """Make ``trainer`` follow ``node``'s task catalogue, from the catalogues in its ledger."""
    history = [s.record for s in read(node.ledger.entries(CatalogueApplied.KIND),
                                      CatalogueApplied)]
    trainer.before_run = CatalogueFollower(trainer, lambda: node.catalogues[:], history)


def split_holdout(data: TaskData, share: float, seed: int) -> tuple[TaskData, TaskData]:
    """(examples to train on, examples kept aside): ``share`` of them, drawn by ``seed``, at
    most all but one (none when there are fewer than two)."""
    count = min(round(share * len(data)), len(data) - 1) if len(data) > 1 else 0
    if count == 0:
        return data, data.subset(np.arange(0))
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[count:])), data.subset(np.sort(order[:count]))
