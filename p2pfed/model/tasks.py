"""The task catalogue, and a node's own training data read from the files its config names.

The catalogue (:data:`TASKS`) fixes each task's modalities, number of classes and pipeline, so
every member of a federation builds the same components; the tasks an admin adds to the
federation's task catalogue (:mod:`gossip.taskcat`) join them (:func:`model_tasks`).

A node's ``p2pfed.toml`` names, per task it trains, one file per modality::

    [data.engagement.activity]
    kind = "series-csv"
    path = "/srv/school/activity.csv"

    [data.engagement.text]
    kind = "text-jsonl"
    path = "/srv/school/notes.jsonl"

The files of a multi-modal task are aligned by sample order and must agree on every label, and
on every sample's group where more than one of them gives groups.
Problems are :class:`ConfigError` naming the file (and line, where the loader knows it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gossip.errors import ConfigError
from gossip.taskcat import Task, TaskCatalogue
from p2pfed.config import DataSource
from p2pfed.model.data import ACTIVITY_CLASSES, Dataset, load_source
from p2pfed.model.m3t import TaskSpec
from p2pfed.model.questions import TOPICS
from p2pfed.model.train import TaskData

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("digits", ("image",), 10, backbone=True),
    TaskSpec("topic", ("text",), len(TOPICS)),
    TaskSpec("engagement", ("activity", "text"), len(ACTIVITY_CLASSES), backbone=True),
)

#: what each class number of a task means (``labels[i]`` is class ``i``)
LABELS: dict[str, tuple[str, ...]] = {
    "digits": tuple(str(d) for d in range(10)),
    "topic": TOPICS,
    "engagement": ACTIVITY_CLASSES,
}


def task_by_name(name: str, tasks: Sequence[TaskSpec] = TASKS) -> TaskSpec:
    for task in tasks:
        if task.name == name:
            return task
    raise ConfigError(f"unknown task {name!r} (known: {', '.join(t.name for t in tasks)})")


def catalogue_task(task: Task) -> TaskSpec | None:
    """A task of the federation's catalogue as the model's (None: one the model cannot
    build: its components are not each modality's encoder, optionally ``backbone`` and
    ``prompt.<name>``, and its head)."""
    comps = set(task.components)
    spec = TaskSpec(task.name, tuple(task.modalities), task.classes,
                    backbone="backbone" in comps, prompt=f"prompt.{task.name}" in comps)
    return spec if set(spec.pipeline()) == comps else None


def model_tasks(catalogue: TaskCatalogue | None) -> tuple[TaskSpec, ...]:
    """The built-in tasks and those of the federation's task catalogue the model can build,
    active or retired (a retired task's components stay held; the trainer stops training
    it).  A catalogue task named like a built-in one is the built-in one."""
    if catalogue is None:
        return TASKS
    builtin = {t.name for t in TASKS}
    extra = [spec for name, task in sorted(catalogue.tasks.items())
             if name not in builtin and (spec := catalogue_task(task)) is not None]
    return TASKS + tuple(extra)


def unknown_tasks_message(names: Sequence[str], catalogue: TaskCatalogue | None) -> str:
    """Why ``[data.<name>]`` tables are refused: tasks neither built in nor in the catalogue."""
    tables = ", ".join(f"[data.{n}]" for n in names)
    builtin = ", ".join(t.name for t in TASKS)
    if catalogue is None:
        return (f"{tables}: no such task (built-in tasks: {builtin}); a task added with "
                "'p2pfed task add' is known once this home has the federation's catalogue "
                "(after 'p2pfed join', from the members)")
    listed = ", ".join(sorted(catalogue.tasks)) or "none"
    return (f"{tables}: no such task: not a built-in task ({builtin}) nor one of the "
            f"federation's task catalogue (version {catalogue.version}: {listed}; "
            "'p2pfed task list')")


def load_task_data(sources: Mapping[str, Mapping[str, DataSource]],
                   base: Path, tasks: Sequence[TaskSpec] = TASKS) -> dict[str, TaskData]:
    """Read every configured task's files (relative paths are under ``base``)."""
    out: dict[str, TaskData] = {}
    for name, modalities in sorted(sources.items()):
        task = task_by_name(name, tasks)
        if set(modalities) != set(task.modalities):
            raise ConfigError(f"[data.{name}] needs exactly the modalities "
                              f"{', '.join(task.modalities)}; got {', '.join(sorted(modalities))}")
        inputs: dict[str, Any] = {}
        labels: np.ndarray | None = None
        grouped: tuple[Path, Dataset] | None = None  # the first file that gives groups
        first = ""
        for modality in task.modalities:
            src = modalities[modality]
            path = Path(src.path) if Path(src.path).is_absolute() else base / src.path
            data = load_source(src.kind, path, **dict(src.options))
            if modality not in data.inputs:
                raise ConfigError(f"{path}: a {src.kind} file gives {', '.join(data.inputs)}, "
                                  f"not {modality}")
            if int(data.labels.max()) >= task.classes:
                row = int(np.argmax(data.labels >= task.classes))
                raise ConfigError(f"{path}: sample {row + 1} has label {data.labels[row]}; "
                                  f"task {name} has classes 0..{task.classes - 1}")
            if labels is None:
                labels, first = data.labels, str(path)
            elif len(data.labels) != len(labels):
                raise ConfigError(f"{path}: {len(data.labels)} samples, but {first} has "
                                  f"{len(labels)} (files of one task are aligned by order)")
            elif not np.array_equal(data.labels, labels):
                row = int(np.argmax(data.labels != labels))
                raise ConfigError(f"{path}: sample {row + 1} is labelled {data.labels[row]} "
                                  f"but {labels[row]} in {first}")
            inputs[modality] = data.inputs[modality]
            if data.groups is not None:
                if grouped is not None:
                    _check_groups(path, data, *grouped)
                else:
                    grouped = path, data
        assert labels is not None
        out[name] = TaskData(inputs, labels) if grouped is None else \
            TaskData(inputs, labels, grouped[1].groups, grouped[1].group_names)
    return out


def _check_groups(path: Path, data: Dataset, first_path: Path, first: Dataset) -> None:
    """ConfigError unless ``data`` (read from ``path``) puts every sample in the group that
    ``first``, an earlier file of the same task, puts it in."""
    ours, theirs = data.group_of() or [], first.group_of() or []
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            raise ConfigError(f"{path}: sample {row + 1} is in group {a!r} but {b!r} in "
                              f"{first_path}")
