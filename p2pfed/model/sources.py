"""A node's model and data from the command line: ``p2pfed init --model m3t --data …``.

``--data TASK:MODALITY:PATH`` names one file of a task's local data (repeat it per modality; a
task needs all of its modalities, see :data:`p2pfed.model.tasks.TASKS`).  :func:`with_model_data`
checks every spec against the task catalogue and the file itself, and returns the
:class:`~p2pfed.config.Config` that ``p2pfed.toml`` is written from.

How ``init`` calls it, after its own overrides and before writing ``p2pfed.toml`` (import it
there, and only when ``--model`` or ``--data`` is given: this module loads torch)::

    from p2pfed.model.sources import with_model_data

    config = with_model_data(config, model=model, data=data or [],
                             hold=tuple(hold) if hold else None)

``model`` is ``--model`` (``None`` when not given), ``data`` the ``--data`` values, ``hold``
the ``--hold`` values.  Without ``--hold`` the node holds every component the named tasks'
pipelines use; with it, the held components must include those pipelines.  Paths on the command
line are relative to the current directory and written absolute, since relative paths in
``p2pfed.toml`` are read against the node's home.  Every problem is a :class:`ConfigError` that
names the spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gossip.errors import ConfigError
from p2pfed.config import MODEL_KINDS, Config, DataSource
from p2pfed.model.data import MODALITY_FILES
from p2pfed.model.tasks import TASKS, load_task_data, task_by_name

SPEC_FORM = "TASK:MODALITY:PATH"


def parse_data_spec(spec: str, cwd: Path) -> tuple[str, str, DataSource]:
    """``TASK:MODALITY:PATH`` as (task, modality, source); the path made absolute under ``cwd``.

    The path is everything after the second colon (it may hold colons itself).
    """
    task_name, sep1, rest = spec.partition(":")
    modality, sep2, path = rest.partition(":")
    if not sep1 or not sep2 or not task_name or not modality or not path:
        raise ConfigError(f"--data {spec!r}: expected {SPEC_FORM}, e.g. topic:text:questions.jsonl")
    task = task_by_name(task_name)
    if modality not in MODALITY_FILES:
        raise ConfigError(f"--data {spec!r}: unknown modality {modality!r} "
                          f"(known: {', '.join(MODALITY_FILES)})")
    if modality not in task.modalities:
        raise ConfigError(f"--data {spec!r}: task {task.name} takes "
                          f"{' and '.join(task.modalities)}, not {modality}")
    full = (cwd / Path(path).expanduser()).resolve()
    if not full.is_file():
        raise ConfigError(f"--data {spec!r}: no file at {full}")
    kind = MODALITY_FILES[modality][0]
    return task.name, modality, DataSource(kind, str(full))


def data_sources(specs: Sequence[str], cwd: Path) -> dict[str, dict[str, DataSource]]:
    """The ``[data]`` tables of ``specs``: each task with all its modalities, once each, and
    files that load (the same checks as at start-up: format, labels, alignment)."""
    out: dict[str, dict[str, DataSource]] = {}
    for spec in specs:
        task, modality, source = parse_data_spec(spec, cwd)
        if modality in out.get(task, {}):
            raise ConfigError(f"--data {spec!r}: {task}:{modality} is already given "
                              f"({out[task][modality].path})")
        out.setdefault(task, {})[modality] = source
    for task, modalities in out.items():
        missing = [m for m in task_by_name(task).modalities if m not in modalities]
        if missing:
            raise ConfigError(f"--data: task {task} also needs "
                              f"{', '.join(f'{task}:{m}:PATH' for m in missing)} "
                              "(its files are aligned by sample order)")
    load_task_data(out, cwd)
    return out


def with_model_data(config: Config, *, model: str | None, data: Sequence[str],
                    hold: Sequence[str] | None = None, cwd: Path | None = None) -> Config:
    """``config`` with ``[model] kind = model`` and the ``[data]`` tables of ``data``.

    ``hold`` (the ``--hold`` values, ``None`` when not given) must cover the pipelines of the
    tasks in ``data``; without it, ``components.hold`` becomes those pipelines.  ``cwd``: where
    relative paths start (default: the current directory).  Returns ``config`` itself when
    neither ``model`` nor ``data`` is given.
    """
    if model is None and not data:
        return config
    if model is not None and model not in MODEL_KINDS:
        raise ConfigError(f"--model {model!r}: expected one of {', '.join(MODEL_KINDS)}")
    kind = model if model is not None else config.model.kind
    if data and kind != "m3t":
        raise ConfigError("--data trains a model: it needs --model m3t")
    sources = data_sources(data, cwd if cwd is not None else Path.cwd())
    needed = sorted({c for t in sources for c in task_by_name(t).pipeline()})
    if hold is None:
        held = tuple(needed) if needed else config.components.hold
    else:
        held = tuple(hold)
        missing = [c for c in needed if c not in held]
        if missing:
            raise ConfigError(f"--data names task(s) {', '.join(sorted(sources))}, whose "
                              f"pipeline needs --hold {' --hold '.join(missing)} as well")
    if kind == "m3t":
        from p2pfed.model.m3t import ModelSpec

        ModelSpec(TASKS).check_holdings(held)
    updated = replace(config, model=replace(config.model, kind=kind),
                      components=replace(config.components, hold=held),
                      data={**config.data, **sources})
    updated.validate()
    return updated
