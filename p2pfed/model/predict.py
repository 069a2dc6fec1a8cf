"""A node's current model, read from its home, and its prediction for one example.

The *current model* of a component is what ``p2pfed export`` writes and ``p2pfed predict``
runs: its latest checkpoint free of forgotten members (see
:func:`p2pfed.unlearning.latest_clean_checkpoints`).  The components of one pipeline run their
rounds on their own, so their latest checkpoints may be from different rounds (an adapter at
round 25, its head at 45); a pipeline is therefore read from **one** round, the latest at which
every component of it has a clean checkpoint (:func:`common_round`).

Reading needs no daemon and writes nothing: the ledger is opened as ``export`` always opened
it (the daemon may be appending at the same time, SQLite's WAL lets both), and the states come
from the blob store.  A text adapter is loaded only onto the text model it was trained over:
the ledger's ``base-model`` entry before its checkpoint names it (:mod:`p2pfed.model.agreement`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossip.errors import ConfigError, LocalError
from p2pfed.config import Config
from p2pfed.journal import BaseModel, Checkpoint, Stored
from p2pfed.model.agreement import base_before, check_checkpoint
from p2pfed.model.data import MODALITY_FILES, load_source
from p2pfed.model.m3t import ENCODERS, TEXT, M3TModel
from p2pfed.model.tasks import LABELS, task_by_name
from p2pfed.unlearning import is_clean


def common_round(checkpoints: Iterable[Stored[Checkpoint]], forgotten: Iterable[str],
                 components: Sequence[str]) -> tuple[int, dict[str, Checkpoint]]:
    """The latest round at which every one of ``components`` has a checkpoint free of
    ``forgotten``, and those checkpoints (of a round checkpointed twice, after a rollback, the
    later entry).  :class:`LocalError` when a component has none, or they share no round."""
    forgotten = set(forgotten)
    rounds: dict[str, dict[int, Checkpoint]] = {c: {} for c in components}
    for ck in checkpoints:
        record = ck.record
        if record.component in rounds and is_clean(record.lineage, forgotten):
            rounds[record.component][record.round] = record
    missing = [c for c in components if not rounds[c]]
    if missing:
        raise LocalError(f"no checkpoint of {', '.join(missing)} yet")
    shared = set.intersection(*(set(r) for r in rounds.values()))
    if not shared:
        latest = ", ".join(f"{c} round {max(r)}" for c, r in rounds.items())
        raise LocalError(f"{', '.join(components)} have no checkpoint of one round in common "
                         f"(latest: {latest}); export the components one by one")
    best = max(shared)
    return best, {c: rounds[c][best] for c in components}


@dataclass(frozen=True)
class HomeModel:
    """Components of a node's current model, all from checkpoints of round ``round``."""

    model: M3TModel
    round: int
    components: tuple[str, ...]
    #: the text model the text adapter's checkpoint was trained over (None: no text adapter,
    #: or a checkpoint from before the ledger named it)
    base: BaseModel | None = None


def load_current(root: Path, config: Config, components: Sequence[str]) -> HomeModel:
    """Build ``components`` (with what a head's forward pass needs) from the home's checkpoints
    of one round.  :class:`LocalError` naming the home when there is none yet."""
    from gossip.identity import load_identity
    from p2pfed.blobs import BlobStore, read_state
    from p2pfed.fedstore import FederationStore
    from p2pfed.home import BLOBS_DIR, CACHE_DIR, KEY_FILE, LEDGER_FILE
    from p2pfed.journal import Forget, read
    from p2pfed.ledger import Ledger
    from p2pfed.model.local import build_model
    from p2pfed.model.train import LocalTrainer

    if config.model.kind != "m3t":
        raise ConfigError(f"{root}: [model] kind is {config.model.kind!r}; only an m3t model "
                          "has tasks to predict")
    identity = load_identity(root / KEY_FILE)
    with Ledger.open(root / LEDGER_FILE, identity, create=False) as ledger:
        forgotten = {f.record.target for f in read(ledger.entries(Forget.KIND), Forget)}
        checkpoints = list(read(ledger.entries(Checkpoint.KIND), Checkpoint))
        try:
            round_, found = common_round(checkpoints, forgotten, components)
        except LocalError as exc:
            held = sorted({c.record.component for c in checkpoints})
            raise LocalError(f"{root}: {exc} (checkpointed: {', '.join(held) or 'nothing yet'}; "
                             "the daemon checkpoints every few rounds)") from None
        federation_id = FederationStore(root).view(ledger).federation_id
        base = None
        if ENCODERS[TEXT] in found:  # (over the base model it was trained over, only)
            at = next(s.index for s in checkpoints if s.record is found[ENCODERS[TEXT]])
            base = base_before(read(ledger.entries(BaseModel.KIND), BaseModel), at)
    check_checkpoint(config, base, f"refusing to load the model of {root}", root / CACHE_DIR)
    blobs = BlobStore(root / BLOBS_DIR)
    model = build_model(config, list(components), federation_id)
    flats = LocalTrainer(model, {}, node_seed=0).flats
    for name, ck in found.items():
        flats[name].load_(read_state(blobs, ck.digest).clone())
    return HomeModel(model, round_, tuple(components), base)


def parts_of(component: str) -> list[str]:
    """What exporting ``component`` builds and writes: a head's whole pipeline, else itself."""
    if component.startswith("head."):
        return task_by_name(component.removeprefix("head.")).pipeline()
    return [component]


# ---------------------------------------------------------------------------- one example
def read_example(task_name: str, paths: Sequence[Path], config: Config,
                 index: int = 0) -> dict[str, Any]:
    """Example ``index`` of the task's data files ``paths`` (one per modality, told apart by
    suffix; the formats of ``[data]``, options from the config's ``[data.<task>.<modality>]``)
    as the model's inputs (a batch of one)."""
    task = task_by_name(task_name)
    by_suffix = {suffix: m for m, (_, suffix) in MODALITY_FILES.items()}
    given: dict[str, Path] = {}
    for path in paths:
        modality = by_suffix.get(path.suffix)
        if modality not in task.modalities:
            wanted = ", ".join(f"{m} ({MODALITY_FILES[m][1]})" for m in task.modalities)
            raise ConfigError(f"{path}: task {task.name} reads {wanted}")
        if modality in given:
            raise ConfigError(f"{path}: a {modality} file is already given ({given[modality]})")
        given[modality] = path
    missing = [f"{m} ({MODALITY_FILES[m][1]})" for m in task.modalities if m not in given]
    if missing:
        raise ConfigError(f"task {task.name} also needs an --input file for "
                          f"{', '.join(missing)}")
    inputs: dict[str, Any] = {}
    for modality, path in given.items():
        source = config.data.get(task.name, {}).get(modality)
        options = dict(source.options) if source is not None else {}
        data = load_source(MODALITY_FILES[modality][0], path, **options)
        if not 0 <= index < len(data):
            raise ConfigError(f"{path}: no example {index} (it has {len(data)}, from 0)")
        value = data.inputs[modality]
        if isinstance(value, list):
            inputs[modality] = [value[index]]
        else:
            inputs[modality] = torch.from_numpy(np.ascontiguousarray(value[index : index + 1]))
    return inputs


@dataclass(frozen=True)
class Prediction:
    task: str
    round: int
    #: class probabilities, in class order: ``(label name, probability)``
    probabilities: tuple[tuple[str, float], ...]

    @property
    def label(self) -> int:
        return int(np.argmax([p for _, p in self.probabilities]))

    @property
    def name(self) -> str:
        return self.probabilities[self.label][0]

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "round": self.round, "label": self.label,
                "prediction": self.name, "probabilities": dict(self.probabilities)}


def predict(current: HomeModel, task_name: str, inputs: Mapping[str, Any]) -> Prediction:
    """The model's class probabilities (softmax of the head's logits) for one example."""
    task = task_by_name(task_name)
    model = current.model
    for module in model.modules.values():
        module.eval()
    image = inputs.get("image")
    if image is not None and (image.shape[1] != 1 or min(image.shape[2:]) < 2):
        raise ConfigError(f"images of shape {tuple(image.shape[1:])}; the model takes one "
                          "channel (grey levels), at least 2×2 pixels")
    activity = inputs.get("activity")
    if activity is not None and activity.shape[-1] != model.spec.activity_features:
        raise ConfigError(f"{activity.shape[-1]} activity features per step; the model takes "
                          f"{model.spec.activity_features}")
    with torch.no_grad():
        logits = model.forward(task.name, inputs)
    probs = torch.softmax(logits.double(), dim=-1)[0].tolist()
    return Prediction(task.name, current.round,
                      tuple(zip(LABELS[task.name], probs, strict=True)))
