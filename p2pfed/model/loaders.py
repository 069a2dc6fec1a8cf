"""An institution's own files: the :class:`Dataset` record and a loader per source kind.

Input keys are modality names (``"text"``, ``"image"``, ``"activity"``), as in
:mod:`p2pfed.model.m3t`.  Each loader also reads an optional *group* per sample (the fairness
attribute: :mod:`p2pfed.model.fairness`): a JSON Lines field named by the option
``group_field``, a CSV column headed ``group``, an ``.npz`` array ``groups``.

Loaders raise :class:`~gossip.errors.ConfigError` with messages ``"PATH:LINE: reason"`` (or
``"PATH: reason"`` where no line applies).  They never unpickle anything.
"""

from __future__ import annotations

import csv
import json
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gossip.errors import ConfigError, LocalError
from p2pfed.config import SOURCE_KINDS

InputArray = npt.NDArray[Any] | list[str]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples of one local dataset: ``inputs[modality][i]`` goes with ``labels[i]``.

    ``labels`` is coerced to a 1-D ``int64`` array; every input must have one entry per label.
    ``groups`` (None: the file gives none) is each sample's group as a code into
    ``group_names``, the groups' names sorted; codes are this dataset's own, only names mean
    the same thing elsewhere.
    """

    name: str
    inputs: dict[str, InputArray]
    labels: npt.NDArray[np.int64]
    groups: npt.NDArray[np.int64] | None = None
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise LocalError(f"dataset {self.name!r}: labels must be a 1-D integer array")
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        n = labels.shape[0]
        for key, value in self.inputs.items():
            if len(value) != n:
                raise LocalError(
                    f"dataset {self.name!r}: input {key!r} has {len(value)} samples, "
                    f"labels have {n}"
                )
        if self.groups is None:
            if self.group_names:
                raise LocalError(f"dataset {self.name!r}: group names without groups")
            return
        groups = np.asarray(self.groups)
        if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer) \
                or groups.shape[0] != n:
            raise LocalError(f"dataset {self.name!r}: groups must be {n} integer codes")
        if list(self.group_names) != sorted(set(self.group_names)) or (
                n and (groups.min() < 0 or groups.max() >= len(self.group_names))):
            raise LocalError(f"dataset {self.name!r}: group codes must index sorted, "
                             "distinct group names")
        object.__setattr__(self, "groups", groups.astype(np.int64, copy=False))

    def group_of(self) -> list[str] | None:
        """Each sample's group name (None: no groups)."""
        if self.groups is None:
            return None
        return [self.group_names[g] for g in self.groups.tolist()]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: npt.ArrayLike) -> Dataset:
        """The samples at ``indices`` (in that order), under the same name."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"dataset {self.name!r}: index out of range for {n} samples")
        inputs: dict[str, InputArray] = {}
        for key, value in self.inputs.items():
            if isinstance(value, list):
                inputs[key] = [value[i] for i in idx.tolist()]
            else:
                inputs[key] = value[idx]
        groups = None if self.groups is None else self.groups[idx]
        return Dataset(self.name, inputs, self.labels[idx], groups, self.group_names)


def group_codes(names: Sequence[str]) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    """Each sample's group name as (codes, the distinct names sorted): ``names[i]`` is
    ``sorted_names[codes[i]]``."""
    distinct = tuple(sorted(set(names)))
    index = {name: code for code, name in enumerate(distinct)}
    return np.array([index[n] for n in names], dtype=np.int64), distinct


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def load_jsonl_text(
    path: Path | str, text_field: str = "text", label_field: str = "label",
    group_field: str | None = None,
) -> Dataset:
    """Text samples from JSON Lines: one object per line with a string and an integer label,
    and with ``group_field`` given, a group on every line (a string or an integer, read as its
    decimal text).

    Blank lines are skipped.  Input key ``"text"``; dataset name is the file's stem.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field in (text_field, label_field, group_field):
            if field is not None and field not in record:
                raise ConfigError(f"{where}: missing field {field!r}")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise ConfigError(f"{where}: field {text_field!r} must be a string")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ConfigError(f"{where}: field {label_field!r} must be a non-negative integer")
        if group_field is not None:
            groups.append(_group_name(record[group_field], where, f"field {group_field!r}"))
        texts.append(text)
        labels.append(label)
    if not labels:
        raise ConfigError(f"{path}: no samples")
    codes, names = group_codes(groups) if group_field is not None else (None, ())
    return Dataset(path.stem, {"text": texts}, np.array(labels, dtype=np.int64), codes, names)


def _group_name(value: object, where: str, what: str) -> str:
    """A group as read from a file: a non-empty string, or an integer as its decimal text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {what} (the group) must be a non-empty string or an "
                          "integer")
    return value.strip()


def load_image_array(path: Path | str) -> Dataset:
    """Images from a ``.npz`` with arrays ``images`` (N,C,H,W) or (N,H,W) and ``labels`` (N,),
    and optionally ``groups`` (N,), integers or strings.

    Loaded with ``allow_pickle=False``.  Images become ``float32`` (``uint8`` is scaled by
    1/255); (N,H,W) gains a channel axis.  Input key ``"image"``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ConfigError(f"{path}: not an .npz archive")
            missing = [k for k in ("images", "labels") if k not in archive.files]
            if missing:
                raise ConfigError(f"{path}: missing array(s) {', '.join(missing)}")
            images = np.asarray(archive["images"])
            labels = np.asarray(archive["labels"])
            groups = np.asarray(archive["groups"]) if "groups" in archive.files else None
    except ConfigError:
        raise
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"{path}: not a readable .npz archive ({exc})") from exc
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise ConfigError(f"{path}: images must have shape (N,C,H,W) or (N,H,W)")
    if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.number):
        raise ConfigError(f"{path}: images must be numeric, got {images.dtype}")
    if np.issubdtype(images.dtype, np.complexfloating):
        raise ConfigError(f"{path}: images must be real, got {images.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{path}: labels must be a 1-D integer array")
    if labels.shape[0] != images.shape[0]:
        raise ConfigError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise ConfigError(f"{path}: no samples")
    if labels.min() < 0:
        raise ConfigError(f"{path}: labels must be non-negative")
    scale = np.float32(1 / 255) if images.dtype == np.uint8 else np.float32(1)
    data = images.astype(np.float32) * scale
    if not np.all(np.isfinite(data)):
        raise ConfigError(f"{path}: images contain NaN or infinite values")
    codes, names = (None, ()) if groups is None else _array_groups(path, groups, len(labels))
    return Dataset(path.stem, {"image": data}, labels.astype(np.int64), codes, names)


def _array_groups(path: Path, groups: np.ndarray, n: int,
                  ) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    """The ``groups`` array of an ``.npz`` as codes and names."""
    if groups.ndim != 1 or not (np.issubdtype(groups.dtype, np.integer)
                                or np.issubdtype(groups.dtype, np.str_)):
        raise ConfigError(f"{path}: groups must be a 1-D array of integers or strings, "
                          f"got shape {groups.shape} of {groups.dtype}")
    if groups.shape[0] != n:
        raise ConfigError(f"{path}: {groups.shape[0]} groups but {n} labels")
    names = [str(g).strip() for g in groups.tolist()]
    if "" in names:
        raise ConfigError(f"{path}: sample {names.index('') + 1} has an empty group")
    return group_codes(names)


def load_csv_series(path: Path | str) -> Dataset:
    """Time series from CSV rows ``sample_id,step,feature1..featureK,label``.

    An optional header row starting with ``sample_id`` is skipped; blank rows are skipped.
    Rows are grouped by ``sample_id`` (samples kept in order of first appearance) and ordered by
    the integer ``step``.  Every row has the same K, every sample the same number of steps,
    one label, and no repeated step.  Input key ``"activity"``, shape (N, T, K) ``float32``.
    A header ``sample_id,step,feature1..featureK,group,label`` adds a group column: each
    sample's group, the same on all its rows (without a header, no groups).
    """
    path = Path(path)
    text = _read_text(path)
    width: int | None = None
    grouped = False
    samples: dict[str, list[tuple[int, list[float]]]] = {}
    sample_label: dict[str, int] = {}
    sample_group: dict[str, str] = {}
    first_line: dict[str, int] = {}
    reader = csv.reader(text.splitlines())
    for row in reader:
        lineno = reader.line_num
        where = f"{path}:{lineno}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if width is None and not samples and row[0].strip() == "sample_id":
            grouped = _group_header(row, where)
            width = len(row) if grouped else None
            continue
        if len(row) < 4:
            raise ConfigError(
                f"{where}: expected sample_id,step,feature1..featureK,label "
                f"(at least 4 columns), got {len(row)}"
            )
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ConfigError(f"{where}: expected {width} columns, got {len(row)}")
        sample_id, step, features, label = _series_row(row[:-2] + row[-1:] if grouped else row,
                                                       where)
        group = _group_name(row[-2], where, f"column {len(row) - 1}") if grouped else ""
        if sample_id not in samples:
            samples[sample_id] = []
            sample_label[sample_id] = label
            sample_group[sample_id] = group
            first_line[sample_id] = lineno
        elif sample_group[sample_id] != group:
            raise ConfigError(
                f"{where}: sample {sample_id!r} is in group {group!r}, "
                f"earlier rows say {sample_group[sample_id]!r}"
            )
        elif sample_label[sample_id] != label:
            raise ConfigError(
                f"{where}: sample {sample_id!r} has label {label}, "
                f"earlier rows say {sample_label[sample_id]}"
            )
        if any(s == step for s, _ in samples[sample_id]):
            raise ConfigError(f"{where}: sample {sample_id!r} repeats step {step}")
        samples[sample_id].append((step, features))
    dataset = _series_dataset(path, samples, sample_label, first_line)
    if not grouped:
        return dataset
    codes, names = group_codes([sample_group[sid] for sid in samples])
    return replace(dataset, groups=codes, group_names=names)


def _group_header(header: list[str], where: str) -> bool:
    """Does the header row name a group column?  (It must come just before the label.)"""
    names = [cell.strip() for cell in header]
    if "group" not in names:
        return False
    if len(names) < 5 or names.index("group") != len(names) - 2:
        raise ConfigError(f"{where}: the group column comes just before the label: "
                          "sample_id,step,feature1..featureK,group,label")
    return True


def _series_row(row: list[str], where: str) -> tuple[str, int, list[float], int]:
    """One CSV row of :func:`load_csv_series`: sample id, step, features, label."""
    sample_id = row[0].strip()
    try:
        step = int(row[1])
    except ValueError as exc:
        raise ConfigError(f"{where}: step {row[1]!r} is not an integer") from exc
    features: list[float] = []
    for col, cell in enumerate(row[2:-1], start=3):
        try:
            value = float(cell)
        except ValueError as exc:
            raise ConfigError(f"{where}: column {col}: {cell!r} is not a number") from exc
        if not np.isfinite(value):
            raise ConfigError(f"{where}: column {col}: {cell!r} is not finite")
        features.append(value)
    try:
        label = int(row[-1])
    except ValueError as exc:
        raise ConfigError(f"{where}: label {row[-1]!r} is not an integer") from exc
    if label < 0:
        raise ConfigError(f"{where}: label must be non-negative, got {label}")
    return sample_id, step, features, label


def _series_dataset(path: Path, samples: dict[str, list[tuple[int, list[float]]]],
                    sample_label: dict[str, int], first_line: dict[str, int]) -> Dataset:
    """The samples of :func:`load_csv_series`, each ordered by step, as one Dataset."""
    if not samples:
        raise ConfigError(f"{path}: no samples")
    ids = list(samples)
    length = len(samples[ids[0]])
    for sid in ids:
        if len(samples[sid]) != length:
            raise ConfigError(
                f"{path}:{first_line[sid]}: sample {sid!r} has {len(samples[sid])} steps, "
                f"expected {length} like sample {ids[0]!r}"
            )
    series = np.array(
        [[feats for _, feats in sorted(samples[sid], key=lambda r: r[0])] for sid in ids],
        dtype=np.float32,
    )
    labels = np.array([sample_label[sid] for sid in ids], dtype=np.int64)
    return Dataset(path.stem, {"activity": series}, labels)


def load_source(kind: str, path: Path | str, **options: str) -> Dataset:
    """Load a local data source of ``kind`` (one of :data:`SOURCE_KINDS`).

    ``options`` are passed on: ``text-jsonl`` takes ``text_field``, ``label_field`` and
    ``group_field``; the other kinds take none.
    """
    path = Path(path)
    if kind == "text-jsonl":
        unknown = sorted(set(options) - {"text_field", "label_field", "group_field"})
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) for {kind}: {', '.join(unknown)}")
        return load_jsonl_text(path, **options)
    if kind not in SOURCE_KINDS:
        raise ConfigError(
            f"{path}: unknown data source kind {kind!r}; expected one of {_join(SOURCE_KINDS)}"
        )
    if options:
        raise ConfigError(f"{path}: {kind} takes no options, got {', '.join(sorted(options))}")
    if kind == "image-npz":
        return load_image_array(path)
    return load_csv_series(path)


def _join(items: Sequence[str]) -> str:
    return ", ".join(items)
